"""Thin orchestration behind train.py and evaluate.py."""
from within.pipeline.config import register_resolvers

register_resolvers()
