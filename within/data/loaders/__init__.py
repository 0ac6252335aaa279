"""Real-data loaders: each `load(root, download=False, **opts) -> pandas.DataFrame`.

A loader's columns match `conf/features/<name>.yaml` (label `clicked`; aggregated data adds
`impressions`). Data configs call them through Hydra (`conf/data/<name>.yaml`, `source:`).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from within.data.loaders import advertising, avazu, criteo, csv_file, ipinyou, kag_conversion, telco

LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "ipinyou": ipinyou.load,
    "criteo": criteo.load,
    "avazu": avazu.load,
    "advertising": advertising.load,
    "kag_conversion": kag_conversion.load,
    "csv": csv_file.load,
    "telco": telco.load,
}

__all__ = ["LOADERS"]
