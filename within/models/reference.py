"""A model's reference sample: training rows kept in the bundle for explanations and global importance.

Stored as `reference.parquet` (raw rows of the spec's fields; images as their uint8 bytes, since a
field's channels and size are in the spec), so reading it runs no code and needs no processor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.models.base import BundleError

REFERENCE_FILE = "reference.parquet"


def write_reference(frame: pd.DataFrame, spec: Any, bundle: Path) -> Path:
    """The spec's fields of `frame` (and its label) as bundle/reference.parquet."""
    cols = [c for c in [*spec.names, spec.label, spec.weight] if c and c in frame.columns]
    out = frame[cols].reset_index(drop=True).copy()
    for f in spec.image:
        if f.name in out:
            out[f.name] = [None if v is None else np.ascontiguousarray(np.asarray(v, dtype=np.uint8)).tobytes()
                           for v in out[f.name]]
    path = bundle / REFERENCE_FILE
    out.to_parquet(path, index=False)
    return path


def read_reference(bundle: Path, spec: Any) -> pd.DataFrame | None:
    """bundle/reference.parquet as raw rows (images rebuilt from their bytes), or None."""
    path = bundle / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not a readable parquet file ({err})") from err
    for f in spec.image:
        if f.name in frame:
            shape = (f.channels, f.size, f.size)
            frame[f.name] = [None if b is None else np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in frame[f.name]]
    return frame


def sample_reference(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame | None:
    """Up to `rows` rows of `frame`, drawn at random (fixed seed); None when rows <= 0."""
    if rows <= 0 or frame is None or not len(frame):
        return None
    return frame.sample(n=min(rows, len(frame)), random_state=seed)
