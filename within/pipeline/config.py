"""Config checks that run before any training: unknown keys and wrong types fail naming the key.

Hydra's struct mode already rejects a misspelled key on the command line. This module catches
the rest: typos inside YAML files and values of the wrong type. Every node with a `_target_`
is checked against the signature of the class it builds, so a new option needs no schema edit.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TRAIN_KEYS = {
    "task_name": str, "tags": list, "seed": int, "ckpt_path": (str, type(None)), "train": bool,
    "test": bool, "postfit": list, "postfit_strict": bool, "data": dict, "features": dict, "model": dict, "calibrator": dict,
    "privacy": dict, "callbacks": (dict, type(None)), "logger": (dict, type(None)), "trainer": dict,
    "paths": dict, "extras": dict, "experiment": (dict, type(None)), "hparams_search": (dict, type(None)),
    "debug": (dict, type(None)), "optimized_metric": (str, type(None)),
    "intervals": dict, "quantize": dict, "export": dict, "text_model": dict, "update": dict,
    "fairness": dict, "attribution": dict, "explain": dict,
    "optuna_trial": (dict, type(None)),  # set per job by the pruning sweeper (hparams_search=optuna)
}
EVALUATE_KEYS = {
    "task_name": str, "tags": list, "seed": int, "bundle": (str, type(None)), "ckpt_path": (str, type(None)),
    "split": str, "data": dict, "features": dict, "logger": (dict, type(None)), "paths": dict, "extras": dict,
    "text_model": dict,
}


class ConfigError(ValueError):
    """A config key or value that would fail (or silently misbehave) later; the message names the key."""


def project_root() -> str:
    """The checkout holding conf/ (editable install), else the working directory."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[2]
    return str(here if (here / "conf").is_dir() else Path.cwd())


def made_dir(path: str) -> str:
    """`${within.made_dir:PATH}`: PATH, created when absent. Optuna opens its SQLite storage before any
    job has made outputs/, and SQLite cannot create the folder the file goes in."""
    from pathlib import Path

    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def launcher_setting(key: str, default: Any = None) -> Any:
    """`${within.launcher:KEY,DEFAULT}`: a submitit launcher's setting (nodes, tasks_per_node, ...) for
    the trainer, so trainer=ddp's num_nodes and devices are the processes the launcher starts. Outside
    a submitit launcher (a local run, Hydra's basic launcher), or where the launcher leaves KEY unset,
    DEFAULT."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return default
    launcher = HydraConfig.get().get("launcher") or {}
    if "submitit" not in str(launcher.get("_target_", "")):
        return default
    value = launcher.get(key)
    return default if value is None else value


def run_stamp() -> str:
    """`${within.run_stamp:}`: a single run's directory name. In a SLURM job step (srun: every DDP rank is
    a task that composes its own config) `slurm-<job id>`, or `slurm-<array job>_<task>`: the same in
    every rank, so they share one run directory, and the same again when SLURM requeues the job, so
    ckpt_path=auto and the W&B run id pick it up. Elsewhere (and in an interactive `srun --pty bash`,
    which Lightning does not treat as SLURM either) the start time, YYYY-MM-DD_HH-MM-SS."""
    import datetime as dt

    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if job and "SLURM_PROCID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return f"slurm-{job}"
    return dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("within.run_stamp"):
        OmegaConf.register_new_resolver("within.run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("within.made_dir"):
        OmegaConf.register_new_resolver("within.made_dir", made_dir)
    if not OmegaConf.has_resolver("within.launcher"):
        OmegaConf.register_new_resolver("within.launcher", launcher_setting)
    if not OmegaConf.has_resolver("within.root"):
        # Not ${hydra:runtime.cwd}: the sweeper resolves sweep dirs before any job has a runtime.
        OmegaConf.register_new_resolver("within.root", project_root)
    if not OmegaConf.has_resolver("within.wandb_offline"):
        # W&B without an account: offline unless a key is configured.
        OmegaConf.register_new_resolver("within.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))


def validate_config(cfg: DictConfig, kind: str = "train") -> None:
    allowed = TRAIN_KEYS if kind == "train" else EVALUATE_KEYS
    for key in cfg:
        if key == "hydra":
            continue
        if key not in allowed:
            raise ConfigError(f"config key '{key}' is unknown{_suggest(key, allowed)}")
        _check_type(key, cfg[key], allowed[key])
    for key in ("data", "model", "trainer", "calibrator"):
        if key in cfg and cfg[key] is not None:
            _check_targets(cfg[key], key)
    for group in ("callbacks", "logger"):
        node = cfg.get(group)
        if node:
            for name, sub in node.items():
                if isinstance(sub, DictConfig):
                    _check_targets(sub, f"{group}.{name}")
    if kind == "train":
        _check_train_semantics(cfg)


def _check_train_semantics(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    if int(trainer.get("max_epochs", 1) or 1) < 1 and not trainer.get("fast_dev_run"):
        raise ConfigError(f"trainer.max_epochs: must be >= 1, got {trainer.max_epochs}")
    if int(cfg.data.get("batch_size", 1)) < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {cfg.data.batch_size}")
    if "intervals" in (cfg.get("postfit") or []) and cfg.get("intervals"):
        # before training, not after it: a typo here would otherwise cost the whole fit
        from within.postfit.intervals import check_splits

        try:
            check_splits(cfg.intervals.get("splits", ["val", "calib"]))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        power = cfg.intervals.get("weight_power", 0.5)
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not 0 <= power <= 1:
            raise ConfigError(f"intervals.weight_power: must be in [0, 1] (0: w^2-weighted, 1: row average), got {power!r}")
    if "quantize" in (cfg.get("postfit") or []) and cfg.get("quantize"):
        alpha = cfg.quantize.get("smooth_alpha", 0.5)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise ConfigError(f"quantize.smooth_alpha: must be in [0, 1] (SmoothQuant strength; 0.5 is the paper's "
                              f"default), got {alpha!r}")
        rows = cfg.quantize.get("calibration_rows", 4096)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ConfigError(f"quantize.calibration_rows: must be an integer >= 1 (calib rows for SmoothQuant's "
                              f"activation ranges), got {rows!r}")
    if "attribution" in (cfg.get("postfit") or []) and cfg.get("attribution"):
        rows = cfg.attribution.get("n_rows", 200)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ConfigError(f"attribution.n_rows: must be an integer >= 1 (test rows explained), got {rows!r}")
        from within.explain.attribution import METHODS

        method = cfg.attribution.get("method", "auto")
        if method not in METHODS:
            raise ConfigError(f"attribution.method: must be one of {list(METHODS)}, got {method!r}")


def _check_type(key: str, value: Any, expected: Any) -> None:
    expected = expected if isinstance(expected, tuple) else (expected,)
    kinds = {dict: DictConfig, list: ListConfig}
    ok = any(isinstance(value, kinds.get(t, t)) for t in expected)
    if isinstance(value, bool) and bool not in expected and int in expected:
        ok = False
    if not ok:
        names = " or ".join("mapping" if t is dict else "list" if t is list else t.__name__ for t in expected)
        raise ConfigError(f"config key '{key}': expected {names}, got {type(value).__name__} {value!r}")


def _resolve_target(path: str, where: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}._target_: cannot import {path!r} ({err})") from err


def _check_targets(node: Any, where: str) -> None:
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_targets(item, f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if target is not None:
        _check_call(_resolve_target(str(target), where), node, where)
    for key in node:
        if key in ("_target_", "_partial_", "_recursive_", "_convert_", "_args_"):
            continue
        value = node._get_node(key)
        if isinstance(value, (DictConfig, ListConfig)):
            _check_targets(node[key], f"{where}.{key}")


def _check_call(fn: Any, node: DictConfig, where: str) -> None:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward refs in third-party code: skip type checks only
        hints = {}
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in params:
            if takes_kwargs:
                continue
            raise ConfigError(
                f"{where}.{key}: {getattr(fn, '__qualname__', fn)} has no parameter '{key}'"
                f"{_suggest(str(key), set(params) - {'self'})}"
            )
        if key in hints and not OmegaConf.is_missing(node, key):
            value = node._get_node(key)
            if isinstance(value, (DictConfig, ListConfig)) or OmegaConf.is_interpolation(node, key):
                continue
            _check_value(f"{where}.{key}", node[key], hints[key])


def _check_value(where: str, value: Any, hint: Any) -> None:
    """Reject a scalar whose type cannot match a simple annotation (int / float / bool / str)."""
    allowed = _simple_types(hint)
    if not allowed or value is None and type(None) in allowed:
        return
    if value is None:
        raise ConfigError(f"{where}: must not be null (expected {_names(allowed)})")
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = bool(allowed & {int, float})
    elif isinstance(value, float):
        ok = float in allowed
    else:
        ok = type(value) in allowed
    if not ok:
        raise ConfigError(f"{where}: expected {_names(allowed)}, got {type(value).__name__} {value!r}")


def _simple_types(hint: Any) -> set[type] | None:
    simple = {int, float, bool, str, type(None)}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_simple_types(a) for a in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return set().union(*parts)
    if hint in simple:
        return {hint}
    return None


def _names(types_: set[type]) -> str:
    return " or ".join(sorted("null" if t is type(None) else t.__name__ for t in types_))


def _suggest(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, sorted(map(str, options)), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
