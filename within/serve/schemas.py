"""Request and response schemas, generated from a bundle's FeatureSpec (pydantic).

One ad is a JSON object with one key per spec field: numeric -> number, categorical / group ->
string or integer, text -> string, image -> nested [C][S][S] list (uint8 0-255, or floats in
[0, 1]) or the base64 of the C*S*S raw bytes (channels first). Optional fields may be null or
left out. A batch is a JSON array of such objects. Keys outside the spec are refused by default
(`extra="forbid"`): a typo in an optional field would otherwise be scored as a missing value.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, create_model

from within.features.spec import FeatureSpec, FieldSpec

MAX_CATEGORY_CHARS = 512
MAX_TEXT_CHARS = 10_000


def _category(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(  # noqa: TRY004 - pydantic turns ValueError (not TypeError) into a 422 entry
            f"expected a category (string or integer), got {type(v).__name__}")
    if isinstance(v, str) and len(v) > MAX_CATEGORY_CHARS:
        raise ValueError(f"category longer than {MAX_CATEGORY_CHARS} characters")
    return v


Category = Annotated[
    str | int | float,
    PlainValidator(_category),
    WithJsonSchema({"anyOf": [{"type": "string", "maxLength": MAX_CATEGORY_CHARS}, {"type": "integer"}]}),
]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True, max_length=MAX_TEXT_CHARS)]


def image_type(f: FieldSpec) -> Any:
    """A pydantic type that turns a nested list or base64 raw bytes into a (C, S, S) array."""
    shape = (f.channels, f.size, f.size)

    def to_array(v: Any) -> np.ndarray:
        if isinstance(v, str):
            try:
                raw = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ValueError(f"not valid base64 ({err})") from None
            if len(raw) != int(np.prod(shape)):
                raise ValueError(f"{len(raw)} bytes; expected {int(np.prod(shape))} = C*S*S raw uint8 for shape {shape}")
            return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        if not isinstance(v, list):
            raise ValueError(  # noqa: TRY004 - pydantic turns ValueError (not TypeError) into a 422 entry
                f"expected a nested [C][S][S] list or a base64 string, got {type(v).__name__}")
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"expected a nested [C][S][S] list of numbers of shape {shape}") from None
        if arr.shape != shape:
            raise ValueError(f"shape {arr.shape}, expected {shape} (channels first)")
        if not np.isfinite(arr).all():
            raise ValueError("pixels must be finite numbers")
        if arr.min() >= 0 and arr.max() <= 1:
            return arr
        if arr.min() < 0 or arr.max() > 255 or not np.array_equal(arr, np.round(arr)):
            raise ValueError("pixels must be integers in 0..255 or floats in [0, 1]")
        return arr.astype(np.uint8)

    schema = {"anyOf": [{"type": "array", "description": f"[{shape[0]}][{shape[1]}][{shape[2]}] pixels",
                         "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
                        {"type": "string", "contentEncoding": "base64"}]}
    return Annotated[Any, PlainValidator(to_array), WithJsonSchema(schema)]


def _field_type(f: FieldSpec) -> Any:
    if f.type == "numeric":
        return Number
    if f.type in ("categorical", "group"):
        return Category
    if f.type == "text":
        return Text
    return image_type(f)


def ad_model(spec: FeatureSpec, extra_columns: Sequence[str] = (), extra: str = "forbid",
             example: dict[str, Any] | None = None) -> type[BaseModel]:
    """The pydantic model of one ad. Python attribute names are `f0, f1, ...` with the spec names
    as aliases, so any field name works (even one that shadows a BaseModel attribute).
    `extra_columns`: raw columns the calibrator reads beyond the spec (optional categories)."""
    if extra not in ("forbid", "ignore"):
        raise ValueError(f"serve.extra_fields: must be 'forbid' or 'ignore', got {extra!r}")
    fields: dict[str, Any] = {}
    for i, f in enumerate(spec.fields):
        typ = _field_type(f)
        desc = f"{f.type}" + ("" if f.required else " (optional: null or absent = missing)")
        if f.required:
            fields[f"f{i}"] = (typ, Field(..., alias=f.name, description=desc))
        else:
            fields[f"f{i}"] = (typ | None, Field(None, alias=f.name, description=desc))
    for j, name in enumerate(c for c in extra_columns if c not in spec.names):
        fields[f"x{j}"] = (Category | None, Field(None, alias=name, description="read by the calibrator"))
    config = ConfigDict(extra=extra, populate_by_name=False,
                        json_schema_extra={"examples": [example]} if example else None)
    return create_model("Ad", __config__=config, **fields)


def alias_map(model: type[BaseModel]) -> list[tuple[str, str]]:
    """(attribute, spec name) pairs: `{name: ad.__dict__[attr]}` is the record dict of an ad."""
    return [(attr, info.alias or attr) for attr, info in model.model_fields.items()]


class Score(BaseModel):
    request_id: str
    model_version: str
    score: float | None = None
    scores: list[float] | None = None


class ScoreInterval(Score):
    alpha: float
    lower: float | None = None
    upper: float | None = None
    lowers: list[float] | None = None
    uppers: list[float] | None = None


class Explanation(BaseModel):
    request_id: str
    model_version: str
    explanation: dict[str, Any] | None = None
    explanations: list[dict[str, Any]] | None = None


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=200)
    actual: float = Field(..., ge=0, le=1, allow_inf_nan=False)


class Problem(BaseModel):
    """Every error answer: `detail` names the field and the fix; `errors` lists each field."""
    detail: str
    request_id: str
    errors: list[dict[str, Any]] | None = None


__all__ = ["Explanation", "Outcome", "Problem", "Score", "ScoreInterval", "ad_model", "alias_map", "image_type"]
