"""Start the prediction service from a Hydra config (conf/serve.yaml): `python serve.py bundle=PATH`."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from within.serve.app import create_app
from within.serve.loading import load_served
from within.serve.service import ScoringService

log = logging.getLogger(__name__)
CONFIG_ENV = "WITHIN_SERVE_CONFIG"  # the resolved config, for uvicorn worker processes (workers > 1)
ENGINES = ("fastapi",)


def _plain(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "_metadata"):  # an omegaconf node
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _instantiate(node: Any, **kwargs: Any) -> Any:
    if not node:
        return None
    from hydra.utils import instantiate

    return instantiate(node, **kwargs)


def build_service(cfg: Any) -> ScoringService:
    """Load the bundle, check its ONNX scorer, and wrap it with the config's limits and plug-ins."""
    cfg = _plain(cfg)
    if not cfg.get("bundle"):
        raise FileNotFoundError("bundle: not set; run python serve.py bundle=outputs/train/runs/<ts>/bundle")
    served = load_served(cfg["bundle"], threads=int(cfg.get("threads", 1)))
    try:
        explainer = _instantiate(cfg.get("explainer"), model=served.model)
    except ValueError as err:  # e.g. a bundle without a reference sample: serve scores, answer /explain 501
        log.warning("serving without /explain: %s", err)
        explainer = None
    monitor = _instantiate(cfg.get("monitor"))
    return ScoringService(served, max_batch=int(cfg.get("max_batch", 1024)),
                          max_body_bytes=int(cfg.get("max_body_bytes", 32 * 2**20)),
                          alpha=float(cfg.get("alpha", 0.1)), extra_fields=str(cfg.get("extra_fields", "forbid")),
                          explainer=explainer, monitor=monitor)


def app_from_environment() -> Any:
    """uvicorn factory for worker processes: the app for the config in $WITHIN_SERVE_CONFIG."""
    return create_app(build_service(json.loads(os.environ[CONFIG_ENV])))


def run_server(cfg: Any) -> None:
    """Serve until interrupted; prints the address first."""
    import uvicorn

    cfg = _plain(cfg)
    engine = cfg.get("engine", "fastapi")
    if engine not in ENGINES:
        raise ValueError(f"serve.engine: {engine!r} is not one of {ENGINES}")
    host, port, workers = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 8000)), int(cfg.get("workers", 1))
    if workers < 1:
        raise ValueError(f"serve.workers: must be >= 1, got {workers}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s, reachable from other machines; there is no authentication", host)
    opts = {"host": host, "port": port, "log_level": str(cfg.get("log_level", "warning")),
            "access_log": bool(cfg.get("access_log", False))}
    if workers == 1:
        app = create_app(build_service(cfg))
        print(f"serving {cfg['bundle']} on http://{host}:{port} (docs: /docs)", flush=True)
        uvicorn.run(app, **opts)
        return
    os.environ[CONFIG_ENV] = json.dumps(cfg)
    print(f"serving {cfg['bundle']} on http://{host}:{port} with {workers} workers", flush=True)
    uvicorn.run("within.serve.server:app_from_environment", factory=True, workers=workers, **opts)


__all__ = ["CONFIG_ENV", "app_from_environment", "build_service", "run_server"]
