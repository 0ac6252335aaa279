"""Rich console output for runs."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

ORDER = ("data", "features", "model", "calibrator", "privacy", "callbacks", "logger", "trainer", "paths", "extras")


def print_config(cfg: DictConfig, resolve: bool = True) -> None:
    """The composed config as a tree, main groups first; the feature list is summarised."""
    import rich
    import rich.tree
    import rich.syntax

    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key))
        node = cfg[key]
        if key == "features" and node is not None:
            fields = node.get("fields") or []
            kinds: dict[str, int] = {}
            for f in fields:
                kinds[f["type"]] = kinds.get(f["type"], 0) + 1
            branch.add(f"{len(fields)} fields: {kinds}; label={node.get('label')}")
            continue
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
