"""The HTTP API over a ScoringService (FastAPI on uvicorn).

POST /predict, /predict_with_intervals (?alpha=0.1), /explain: one ad (JSON object) or a batch
(JSON array); POST /outcome {request_id, actual} for the monitor; GET /health, /metadata,
/metrics (Prometheus text). Every answer carries a `request_id` (the client's `X-Request-ID`
header when it sends a well-formed one). A refused request gets a JSON body whose `detail`
names the field; an error of the server gets "internal server error" and the request id, never
a traceback (that goes to the server's log).

Scoring runs in the event loop: one ad is ~0.1-0.3 ms of CPU, less than a thread hop and its
GIL hand-over cost on a 2-core machine; ONNX Runtime drops the GIL while it runs.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from within.serve.metrics import ServeMetrics
from within.serve.schemas import Explanation, Outcome, Problem, Score, ScoreInterval
from within.serve.service import RequestError, ScoringService, jsonable

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_ERRORS = {code: {"model": Problem} for code in (413, 422, 500, 501)}


def request_id_of(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex


def create_app(service: ScoringService) -> FastAPI:
    """The FastAPI app serving `service`."""
    model = service.served.model
    metrics = ServeMetrics(getattr(model, "model_name", "model"), service.model_version)
    app = FastAPI(title="within prediction API", version=service.model_version,
                  description=f"Calibrated ad scores from {type(model).__name__} {service.model_version}")
    app.state.service, app.state.metrics = service, metrics
    ad_schema = service.Ad.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [ad_schema, {"type": "array", "items": ad_schema, "maxItems": service.max_batch}]}}}}}

    async def handle(endpoint: str, request: Request, score: Callable[[list, bool, str], dict[str, Any]],
                     background: BackgroundTasks | None = None) -> Response:
        rid = request_id_of(request)
        start = time.perf_counter()
        n_ads, status = 0, 200
        try:
            records, batch = service.parse(await request.body())
            n_ads = len(records)
            content = score(records, batch, rid)
            if background is not None and service.monitor is not None:
                background.add_task(service.log_predictions, content, batch)
        except RequestError as err:
            status, content = err.status, err.content(rid)
        except Exception:  # the client gets the request id; the log gets the traceback
            log.exception("request %s on %s failed", rid, endpoint)
            status = 500
            content = {"detail": "internal server error; the server log holds the details under this request_id",
                       "request_id": rid}
        metrics.observe(endpoint, status, time.perf_counter() - start, n_ads)
        return JSONResponse(content, status_code=status, headers={"x-request-id": rid},
                            background=background if status == 200 else None)

    @app.post("/predict", response_model=Score, responses=_ERRORS, openapi_extra=body)
    async def predict(request: Request, background: BackgroundTasks) -> Response:
        """Calibrated click probability of one ad (`score`) or of each ad of a batch (`scores`)."""
        return await handle("predict", request, service.predict, background)

    @app.post("/predict_with_intervals", response_model=ScoreInterval, responses=_ERRORS, openapi_extra=body)
    async def predict_with_intervals(request: Request, background: BackgroundTasks,
                                     alpha: float | None = None) -> Response:
        """Score and a central 1 - alpha interval for the true click probability."""
        return await handle("predict_with_intervals", request,
                            lambda r, b, rid: service.predict_with_intervals(r, b, rid, alpha=alpha), background)

    @app.post("/explain", response_model=Explanation, responses=_ERRORS, openapi_extra=body)
    async def explain(request: Request) -> Response:
        """Feature attributions of one ad or of each ad of a batch (from the configured explainer)."""
        return await handle("explain", request, service.explain)

    @app.post("/outcome", responses=_ERRORS)
    async def outcome(item: Outcome, request: Request) -> Response:
        """The observed outcome of an earlier prediction, for the monitor."""
        try:
            return JSONResponse(service.outcome(item.request_id, item.actual))
        except RequestError as err:
            return JSONResponse(err.content(request_id_of(request)), status_code=err.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_version": service.model_version}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        """Model version, feature spec, training metrics, privacy report, limits."""
        return service.metadata()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), "msg": e["msg"],
                   "type": e["type"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "msg": "invalid request"}
        return JSONResponse(jsonable({"detail": f"field '{first['field']}': {first['msg']}", "errors": errors,
                                      "request_id": request_id_of(request)}), status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        log.error("request %s failed", rid, exc_info=exc)
        return JSONResponse({"detail": "internal server error", "request_id": rid}, status_code=500)

    return app


__all__ = ["create_app", "request_id_of"]
