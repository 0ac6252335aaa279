"""Which raw feature each processed input of a network belongs to, and each feature's modality.

A network sees categorical embeddings, numeric columns (and missing indicators), per-field text
vectors, images and per-modality presence masks; people think in the spec's fields. `FieldLayout`
sums the attribution of every processed input into the field it came from:

- a categorical (or embedded group) field: its embedding's columns plus its first-order (wide) term;
- a numeric field: its scaled column plus its `__missing` indicator, if any;
- a text field: its vector (token bag or sentence embedding), all dimensions;
- an image field: all its pixels;
- `<modality>:present`: the modality's presence mask (nonzero only where the row and the
  reference rows disagree on whether the modality is there).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from within.features.spec import FeatureSpec

MODALITY_OF_TYPE = {"numeric": "tabular", "categorical": "tabular", "group": "tabular", "text": "text",
                    "image": "image"}


def presence_name(modality: str) -> str:
    return f"{modality}:present"


def field_modalities(spec: FeatureSpec, names: list[str]) -> list[str]:
    """The modality (tabular, text, image) of each name: a spec field or a `<modality>:present` entry."""
    types = {f.name: f.type for f in spec.fields}
    out = []
    for name in names:
        if name in types:
            out.append(MODALITY_OF_TYPE[types[name]])
        elif name.endswith(":present"):
            out.append(name.split(":", 1)[0])
        else:
            raise KeyError(f"field_modalities: {name!r} is neither a field of the spec nor a presence entry")
    return out


@dataclasses.dataclass(frozen=True)
class FieldLayout:
    """Field index of every embedded input of an AdPredictorNN (see `AdPredictorNN.embed_inputs`)."""

    names: list[str]
    tabular: np.ndarray          # [raw_dim] field index of each column of `tabular`
    wide: np.ndarray             # [n_cat] field index of each column of `wide`
    text: np.ndarray             # [text_fields]
    image: np.ndarray            # [image_fields]
    masks: dict[str, int]        # modality -> index of its presence entry
    hierarchy: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # [levels]

    @classmethod
    def of(cls, processor: Any, net: Any) -> FieldLayout:
        spec = processor.spec
        names: list[str] = []

        def index(name: str) -> int:
            if name not in names:
                names.append(name)
            return names.index(name)

        categorical = [f.name for f in spec.categorical]
        dims = list(net.tabular.embedding_dims) if "tabular" in net.modalities else []
        tab = [index(name) for name, d in zip(categorical, dims) for _ in range(d)]
        # numeric columns are named `field` or `field__missing` (FeatureProcessor.num_columns)
        tab += [index(col.removesuffix("__missing")) for col in processor.num_columns]
        wide = [names.index(name) for name in categorical] if getattr(net, "wide", None) is not None else []
        text = [index(f.name) for f in spec.text] if "text" in net.modalities else []
        image = [index(f.name) for f in spec.image] if "image" in net.modalities else []
        masks = {m: index(presence_name(m)) for m in net.modalities}
        layer = getattr(net, "hierarchy", None)
        hierarchy = [index(name) for name in layer.fields] if layer is not None else []
        return cls(names, np.asarray(tab, np.int64), np.asarray(wide, np.int64), np.asarray(text, np.int64),
                   np.asarray(image, np.int64), masks, np.asarray(hierarchy, np.int64))

    def to_fields(self, attributions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Sum per-input attributions ({embedded key: [N, ...]}) into fields: [N, len(names)]."""
        n = len(next(iter(attributions.values())))
        out = np.zeros((n, len(self.names)))
        for key, values in attributions.items():
            a = np.asarray(values, dtype=np.float64).reshape(n, -1)
            if key.startswith("mask_"):
                cols = np.full(a.shape[1], self.masks[key.removeprefix("mask_")])
            elif key in ("text", "image"):  # field-major: [N, fields, ...] flattened
                per_field = getattr(self, key)
                cols = np.repeat(per_field, a.shape[1] // max(len(per_field), 1))
            elif key in ("tabular", "wide", "hierarchy"):
                cols = getattr(self, key)
            else:
                raise KeyError(f"FieldLayout.to_fields: unknown embedded input {key!r}")
            np.add.at(out.T, cols, a.T)
        return out
