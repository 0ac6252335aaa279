"""Real-time prediction service over a saved bundle: RecordEncoder -> ONNX Runtime -> calibration."""
from within.serve.app import create_app
from within.serve.loading import Served, load_model, load_served
from within.serve.server import build_service, run_server
from within.serve.service import RequestError, ScoringService

__all__ = ["RequestError", "ScoringService", "Served", "build_service", "create_app", "load_model", "load_served",
           "run_server"]
