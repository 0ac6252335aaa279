"""What every benchmark shares: where results and data live, config composition, JSON output."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA_DIR = Path(os.environ.get("WITHIN_DATA_DIR", ROOT.parent / "shared" / "data"))


def compose(overrides: list[str] | tuple[str, ...] = (), out_dir: Path | str | None = None,
            config_name: str = "train") -> Any:
    """conf/<config_name>.yaml plus overrides, as `train.py` composes it, with the shared data folder."""
    from within.pipeline.api import compose_config

    return compose_config(list(overrides), output_dir=out_dir, data_dir=DATA_DIR, config_name=config_name)


def machine() -> dict[str, Any]:
    """Where a figure was measured: timings are only comparable within one run on one machine."""
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def write_json(name: str, result: dict[str, Any], results_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (indented, NaN as null)."""
    out = Path(results_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=2) + "\n")
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj
