"""Rich console output for runs."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

ORDER = ("data", "features", "model", "calibrator", "privacy", "callbacks", "logger", "trainer", "paths", "extras")


def print_config(cfg: DictConfig, resolve: bool = True) -> None:
    """The composed config as a tree, main groups first; the feature list is summarised."""
    import rich
    import rich.syntax
    import rich.tree

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


def exit_on_user_error(job, cfg: DictConfig):
    """Run `job(cfg)`; a bad config key or value, feature spec, input row, privacy setting or bundle,
    or a missing file (errors whose message already names the key and the fix), ends the process with
    that message and exit code 2, not under a traceback. HYDRA_FULL_ERROR=1 keeps the traceback."""
    import os
    import sys

    try:
        return job(cfg)
    except (ValueError, FileNotFoundError) as err:
        from within.features.spec import FeatureError
        from within.models.base import BundleError
        from within.pipeline.config import ConfigError
        from within.privacy.engine import PrivacyConfigError

        if not isinstance(err, (ConfigError, FeatureError, PrivacyConfigError, BundleError, FileNotFoundError)) \
                or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
