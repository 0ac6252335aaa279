"""ScoringService: the HTTP-free core of the prediction API.

It parses a JSON body (one ad object, or an array of them), validates it with the pydantic
schema generated from the bundle's FeatureSpec, scores it through the OnnxScorer, and shapes the
answer. Every refusal is a RequestError whose `detail` names the field and the fix; the web
layer (within/serve/app.py) only moves bytes and counts.
"""
from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from within.features.spec import FeatureError
from within.serve.loading import Served
from within.serve.schemas import ad_model, alias_map

log = logging.getLogger(__name__)
_FIELD_IN_MESSAGE = re.compile(r"field '([^']+)'")
_PRETTY = {"missing": "required but missing", "extra_forbidden": "not a field of this model",
           "model_type": "expected an ad (a JSON object)"}


class RequestError(Exception):
    """A refused request: HTTP status, a one-line detail naming the field, and per-field errors."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors

    def content(self, request_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail, "request_id": request_id}
        if self.errors:
            out["errors"] = self.errors
        return out


class ScoringService:
    """Parse, validate and score requests for one served bundle.

    Args:
        served: the loaded model and its checked OnnxScorer (within.serve.loading.load_served).
        max_batch: most ads in one request; a larger batch is refused (413) with the limit.
        max_body_bytes: largest request body read (413 beyond it).
        alpha: default interval level for /predict_with_intervals (central 1 - alpha).
        extra_fields: "forbid" (a key outside the spec is a 422 naming it) or "ignore".
        explainer: callable(records: list[dict]) -> list[dict] (one explanation per ad), or None.
        monitor: an object with `log_prediction(prediction, request_id=...)` and
            `log_outcome(request_id, actual)` (thread-safe), or None.
    """

    def __init__(self, served: Served, max_batch: int = 1024, max_body_bytes: int = 32 * 2**20, alpha: float = 0.1,
                 extra_fields: str = "forbid", explainer: Callable[[list[dict]], list[dict]] | None = None,
                 monitor: Any = None) -> None:
        if int(max_batch) < 1:
            raise ValueError(f"serve.max_batch: must be >= 1, got {max_batch}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"serve.alpha: must be in (0, 1), got {alpha}")
        self.served = served
        self.scorer = served.scorer
        self.max_batch = int(max_batch)
        self.max_body_bytes = int(max_body_bytes)
        self.alpha = float(alpha)
        self.extra_fields = extra_fields
        self.explainer = explainer
        self.monitor = monitor
        spec = served.model.processor.spec
        extra_columns = [c for c in self.scorer.group_names if c not in spec.names]
        example = served.scorer.encoder.example_records(1)[0]
        example = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in example.items()}
        self.Ad = ad_model(spec, extra_columns=extra_columns, extra=extra_fields, example=example)
        self._aliases = alias_map(self.Ad)
        self._names = {name for _, name in self._aliases}
        self._batch = TypeAdapter(list[self.Ad])

    @property
    def model_version(self) -> str:
        return self.served.model_version

    # ---- parsing ------------------------------------------------------------------------
    def parse(self, body: bytes) -> tuple[list[dict[str, Any]], bool]:
        """(records, is_batch) from a JSON body; RequestError on anything the model cannot score."""
        if len(body) > self.max_body_bytes:
            raise RequestError(413, f"body: {len(body)} bytes exceeds max_body_bytes={self.max_body_bytes}; "
                                    "send fewer ads per request")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(422, f"field 'body': not valid JSON ({err})",
                               [{"field": "body", "msg": "not valid JSON", "type": "json_invalid"}]) from None
        if isinstance(data, list):
            if not data:
                raise RequestError(422, "field 'body': empty batch; send one ad object or a non-empty array of ads",
                                   [{"field": "body", "msg": "empty batch", "type": "too_short"}])
            if len(data) > self.max_batch:
                raise RequestError(413, f"body: batch of {len(data)} ads exceeds max_batch={self.max_batch}; "
                                        f"split it into requests of at most {self.max_batch} ads")
            try:
                ads = self._batch.validate_python(data)
            except ValidationError as err:
                raise self._invalid(err, batch=True) from None
            return [self._record(ad) for ad in ads], True
        if isinstance(data, dict):
            try:
                ad = self.Ad.model_validate(data)
            except ValidationError as err:
                raise self._invalid(err, batch=False) from None
            return [self._record(ad)], False
        raise RequestError(422, f"field 'body': expected one ad (a JSON object) or a batch (a JSON array of ad "
                                f"objects), got a JSON {type(data).__name__}",
                           [{"field": "body", "msg": "expected an object or an array", "type": "model_type"}])

    def _record(self, ad: Any) -> dict[str, Any]:
        values = ad.__dict__
        return {name: values[attr] for attr, name in self._aliases}

    def _invalid(self, err: ValidationError, batch: bool) -> RequestError:
        errors = []
        for e in err.errors(include_url=False):
            loc = list(e["loc"])
            index = loc.pop(0) if batch and loc and isinstance(loc[0], int) else None
            name = next((str(p) for p in loc if isinstance(p, str)), None)
            msg = _PRETTY.get(e["type"], e["msg"].removeprefix("Value error, "))
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, sorted(self._names), n=1)
                msg += f"; did you mean '{close[0]}'?" if close else f" (extra_fields={self.extra_fields})"
            if index is None:
                field = name or "body"
            else:
                field = f"[{index}].{name}" if name else f"[{index}]"
            entry = {"field": field, "msg": msg, "type": e["type"]}
            if entry not in errors:
                errors.append(entry)
        first = errors[0]
        more = f" (and {len(errors) - 1} more, see errors)" if len(errors) > 1 else ""
        return RequestError(422, f"field '{first['field']}': {first['msg']}{more}", errors)

    @staticmethod
    def feature_error(err: FeatureError, batch: bool) -> RequestError:
        """A value the schema let through but the encoder refused (image shape, ...), as a 422."""
        text = str(err)
        match = _FIELD_IN_MESSAGE.search(text)
        field = match.group(1) if match else "body"
        return RequestError(422, text, [{"field": field, "msg": text, "type": "feature_error"}])

    # ---- scoring ------------------------------------------------------------------------
    def predict(self, records: list[dict[str, Any]], batch: bool, request_id: str) -> dict[str, Any]:
        p = self._call(self.scorer.predict, records, batch)
        out: dict[str, Any] = {"request_id": request_id, "model_version": self.model_version}
        if batch:
            out["scores"] = p.tolist()
        else:
            out["score"] = float(p[0])
        return out

    def predict_with_intervals(self, records: list[dict[str, Any]], batch: bool, request_id: str,
                               alpha: float | None = None) -> dict[str, Any]:
        alpha = self.alpha if alpha is None else alpha
        if not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
            raise RequestError(422, f"field 'alpha': must be in (0, 1) (0.1 for 90% intervals), got {alpha}",
                               [{"field": "alpha", "msg": "must be in (0, 1)", "type": "value_error"}])
        if self.scorer.intervals is None:
            raise RequestError(501, "predict_with_intervals: this bundle has no intervals; train it with the "
                                    "post-fit step `intervals` (postfit: [calibrate, intervals, ..., export])")
        p, lo, hi = self._call(lambda r: self.scorer.predict_with_intervals(r, alpha=alpha), records, batch)
        out: dict[str, Any] = {"request_id": request_id, "model_version": self.model_version, "alpha": alpha}
        if batch:
            out.update(scores=p.tolist(), lowers=lo.tolist(), uppers=hi.tolist())
        else:
            out.update(score=float(p[0]), lower=float(lo[0]), upper=float(hi[0]))
        return out

    def explain(self, records: list[dict[str, Any]], batch: bool, request_id: str) -> dict[str, Any]:
        if self.explainer is None:
            raise RequestError(501, "explain: this server has no explainer; start it with explainer=... "
                                    "(a callable records -> one explanation dict per ad)")
        explanations = self._call(self.explainer, records, batch)
        if len(explanations) != len(records):
            raise RuntimeError(f"explainer returned {len(explanations)} explanations for {len(records)} ads")
        out: dict[str, Any] = {"request_id": request_id, "model_version": self.model_version}
        explanations = [jsonable(e) for e in explanations]
        if batch:
            out["explanations"] = explanations
        else:
            out["explanation"] = explanations[0]
        return out

    def outcome(self, request_id: str, actual: float) -> dict[str, Any]:
        if self.monitor is None:
            raise RequestError(501, "outcome: this server has no monitor; start it with monitor=...")
        self.monitor.log_outcome(request_id, actual)
        return {"request_id": request_id, "logged": True}

    @staticmethod
    def _call(fn: Callable, records: list[dict[str, Any]], batch: bool) -> Any:
        try:
            return fn(records)
        except FeatureError as err:
            raise ScoringService.feature_error(err, batch) from None

    def log_predictions(self, content: dict[str, Any], batch: bool) -> None:
        """An answer's scores to the monitor (the app calls this after sending it); the ads of a
        batch are logged as `<request_id>/<index>`."""
        if self.monitor is None:
            return
        request_id = content["request_id"]
        scores = content["scores"] if batch else [content["score"]]
        for i, score in enumerate(scores):
            self.monitor.log_prediction(prediction=score, request_id=f"{request_id}/{i}" if batch else request_id)

    # ---- description --------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        model, meta = self.served.model, dict(getattr(self.served.model, "metadata", {}) or {})
        return jsonable({
            "model_name": getattr(model, "model_name", None),
            "model_version": self.model_version,
            "model_class": type(model).__name__,
            "bundle": str(self.served.bundle),
            "onnx_graph": self.served.graph,
            "onnx_check_max_abs_diff": self.served.check_max_abs_diff,
            "spec": model.processor.spec.to_dict(),
            "metrics": meta.get("metrics", {}),
            "privacy": meta.get("privacy", {"enabled": False}),
            "calibration": meta.get("calibration"),
            "intervals": self.scorer.intervals is not None,
            "library_versions": meta.get("library_versions", {}),
            "limits": {"max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes},
            "extra_fields": self.extra_fields,
            "explain": self.explainer is not None,
            "monitor": self.monitor is not None,
        })


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples as plain JSON values (explanations, metadata)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


__all__ = ["RequestError", "ScoringService", "jsonable"]
