"""One recipe per model kind (the `_target_` of each conf/model/<name>.yaml); see within/pipeline/recipe.py."""
