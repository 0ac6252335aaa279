"""The specification's AdScorePredictor usage example, run as written after a fit on simulator rows."""
from __future__ import annotations

import numpy as np
import torch

from within import AdScorePredictor
from within.data.simulator import simulate

SMALL = ["trainer.max_epochs=1", "model.size=2", "model.member.net.hidden_dims=[16]", "data.batch_size=512",
         "logger=none", "postfit=[calibrate,intervals,ensemble]", "explain.reference_rows=64"]


def test_the_spec_example_runs_as_written(tmp_path):
    df = simulate(n=3000, seed=21)

    # --- the spec's example, verbatim (its import line is within's) --------------------------
    predictor = AdScorePredictor(
        feature_config={
            "text_features": ["headline", "description"],
            "image_features": ["main_image"],
            "numerical_features": ["budget", "bid"]
        },
        model_type="ensemble",
        calibration=True,
        explainable=True
    )
    # -----------------------------------------------------------------------------------------
    predictor.fit(df, output_dir=tmp_path, overrides=SMALL)
    image_tensor = torch.rand(3, 16, 16)  # the spec leaves it undefined: one 16x16 RGB creative in [0, 1]

    # --- the spec's example, verbatim --------------------------------------------------------
    ad_features = {
        "headline": "Limited time offer on premium products",
        "description": "Shop now for exclusive deals on our top-rated items",
        "main_image": image_tensor,
        "budget": 500.0,
        "bid": 0.75
    }

    score = predictor.predict(ad_features)

    score, lower_bound, upper_bound = predictor.predict_with_intervals(ad_features)

    explanation = predictor.explain(ad_features)
    # -----------------------------------------------------------------------------------------
    assert isinstance(score, float) and 0.0 < lower_bound <= score <= upper_bound < 1.0
    assert set(explanation["attributions"]) == {"headline", "description", "main_image", "budget", "bid"}
    assert set(explanation["modalities"]) == {"text", "image", "tabular"}
    total = explanation["base_value"] + sum(explanation["attributions"].values())
    assert abs(total - explanation["logit"]) <= explanation["additivity_gap"] + 1e-6
    importance = predictor.get_feature_importance()
    assert set(importance["fields"]) == set(explanation["attributions"])
    assert np.isfinite(list(importance["fields"].values())).all()
