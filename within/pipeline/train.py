"""The training run, for every model kind: seed -> loggers -> the model kind's recipe fits ->
bundle -> post-fit steps (calibrate ... export), the bundle rewritten after each -> test report.

`model=` names the recipe (its `_target_`); everything here is shared by all of them. Only rank 0
runs the post-fit steps and writes report/ and bundle/.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from within.models.reference import sample_reference
from within.pipeline.bundle import write_bundle
from within.pipeline.config import ConfigError, register_resolvers, validate_config
from within.pipeline.loggers import build_loggers, close_loggers
from within.pipeline.recipe import FitResult, Recipe, TrainRun
from within.pipeline.report import write_metrics, write_report_pages, write_test_report
from within.postfit import (
    PostfitContext,
    check_steps,
    postfit_test_metrics,
    report_sections,
    run_steps,
    status_section,
)

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """'auto' resumes this run directory's last.ckpt when present (pre-empted cluster jobs)."""
    if ckpt_path == "auto":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: {ckpt_path} does not exist")
    return ckpt_path


def build_recipe(cfg: DictConfig) -> Recipe:
    """The model kind's recipe: `model._target_`, its config nodes handed over unbuilt."""
    recipe = instantiate(cfg.model, _recursive_=False)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"model._target_: {cfg.model._target_} is not a recipe (it has no fit(run)); "
                          "see within/pipeline/recipe.py")
    return recipe


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config without Hydra's own node (its sweep keys only resolve inside a sweep)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def calibrator_factory(cfg: DictConfig) -> Any:
    """() -> a fresh configured calibrator, or None (calibrator=none)."""
    node = cfg.get("calibrator")
    if not node or "_target_" not in node:
        return None
    return lambda: instantiate(node, _convert_="all")


def run_train_job(cfg: DictConfig) -> float | None:
    """train.py's entry. A single run raises as usual. In a multirun sweep a crashed job writes its
    traceback to <job dir>/error.txt and then:
    - under the Optuna sweeper, raises on: the sweeper records the trial as TrialState.FAIL and goes on
      (hparams_search/optuna.yaml sets max_failure_rate: 1.0). A NaN return would not do: optuna 2.10's
      `tell` fails the trial and raises, and the sweeper's second `tell` then ends the whole sweep;
    - under Hydra's basic sweeper (a grid), returns NaN, which that sweeper would otherwise re-raise.
    A trial stopped by its pruner (optuna.TrialPruned) is no crash: it raises on without an error.txt,
    and the sweeper records TrialState.PRUNED. The DDP ranks 1.. of such a trial run as single runs
    (ddp_ranks_join_this_job) and end quietly, since rank 0 speaks for the trial."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:
        try:
            return run_train(cfg)
        except Exception as err:
            if not (cfg.get("optuna_trial") and is_pruned(err)):
                raise
            log.info("%s (this rank ends; rank 0 reports the trial)", err)
            return None
    argv, env = list(sys.argv), {k: os.environ.get(k) for k in DDP_ENV}
    try:
        ddp_ranks_join_this_job()
        return run_train(cfg)
    except Exception as err:
        if is_pruned(err):  # the trial's pruner stopped it: not a crash, so no error.txt
            log.info("%s; the sweeper records it as pruned", err)
            raise
        import traceback

        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        log.exception("sweep job failed; recorded in %s/error.txt and the sweep goes on", out)
        if is_optuna_sweep():
            raise
        return float("nan")
    finally:
        sys.argv = argv
        end_process_group(env)


# what Lightning's subprocess launcher writes into os.environ (lightning/fabric/strategies/launchers)
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_ranks_join_this_job() -> None:
    """A sweep job run in-process (Hydra's basic launcher) that trains with DDP on one node: Lightning
    starts ranks 1.. by re-running `sys.argv` plus `hydra.run.dir=<hydra.run.dir>`. That would be the
    sweep command, `-m` included: each rank would start a sweep of its own, in a second sweep directory.
    Here the ranks instead get this job's overrides as a single run, in this job's directory (so one
    run directory per job). Under SLURM, srun starts the ranks and nothing is re-run. Under submitit's
    launchers the job is not this process's `sys.argv`, so it is left alone."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    hc = HydraConfig.get()
    if not str(hc.launcher.get("_target_", "")).endswith("BasicLauncher") or os.environ.get("LOCAL_RANK"):
        return
    sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir


def end_process_group(env: dict[str, str | None]) -> None:
    """The next sweep job in this process starts a fresh DDP world: the last job's process group goes,
    and so do the variables Lightning's launcher set (with LOCAL_RANK left behind, the next job would
    take its ranks as started from outside and wait for them forever)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def is_pruned(err: Exception) -> bool:
    """`err` is the pruning callback's optuna.TrialPruned (within/lit/pruning.py)."""
    from optuna import TrialPruned

    return isinstance(err, TrialPruned)


def is_optuna_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


def objective_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The sweep objective `optimized_metric` from the run's metrics; a name the run did not log is a
    config error that lists the names it did log (else a sweep would optimise nothing)."""
    objective = cfg.get("optimized_metric")
    if not objective:
        return None
    if objective not in metrics:
        names = ", ".join(sorted(k for k in metrics if k.startswith(("val/", "test/")))[:30])
        raise ConfigError(f"optimized_metric: the run logged no {objective!r}; set it to one of: {names}")
    return float(metrics[objective])


def run_train(cfg: DictConfig, source: Any = None, init: Any = None) -> float | None:
    """Entry point behind train.py; returns the sweep objective (cfg.optimized_metric) if set.

    `source`: an in-memory DataFrame to train on instead of the configured data source.
    `init`: a fitted model to start from (within/pipeline/update.py's warm start).
    """
    register_resolvers()
    validate_config(cfg, "train")
    try:  # a typo fails now, not after the fit
        check_steps(list(cfg.get("postfit") or []))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    recipe = build_recipe(cfg)
    L.seed_everything(cfg.seed, workers=True)
    loggers = build_loggers(cfg, out_dir, ckpt_path)
    if cfg.extras.get("print_config"):
        from lightning.pytorch.utilities import rank_zero_only

        from within.pipeline.console import print_config

        if rank_zero_only.rank == 0:
            print_config(cfg)
    try:
        result = recipe.fit(TrainRun(cfg=cfg, out_dir=out_dir, source=source, loggers=loggers, ckpt_path=ckpt_path,
                                     init=init))
        if result.model is None:  # not rank 0
            return None
        result.metadata["versions"] = version_history(init, result, out_dir)
        result.model.model_version = str(result.metadata["versions"][-1]["version"])
        ctx = finish(cfg, result, out_dir, loggers)
    finally:
        close_loggers(loggers)
    print(out_dir, flush=True)  # the last line: where everything is
    return objective_value(cfg, ctx.metrics)


def version_history(init: Any, result: FitResult, out_dir: Path) -> list[dict[str, Any]]:
    """The model's versions: the fit, then one entry per update, each with the rows it trained on."""
    import datetime as dt

    before = list((getattr(init, "metadata", None) or {}).get("versions", [])) if init is not None else []
    rows = {name: len(frame) for name, frame in result.frames.items()}
    entry = {"version": len(before) + 1, "kind": "update" if init is not None else "fit",
             "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "train_rows": rows.get("train", 0),
             "rows": rows, "run_dir": str(out_dir)}
    entry["total_train_rows"] = entry["train_rows"] + (before[-1].get("total_train_rows", 0) if before else 0)
    return before + [entry]


def finish(cfg: DictConfig, result: FitResult, out_dir: Path, loggers: list[Any]) -> PostfitContext:
    """Bundle, post-fit steps and test report for a fitted model; the model is never lost to a step."""
    strict = bool(cfg.get("postfit_strict", False))
    alpha = float((cfg.get("intervals") or {}).get("alpha", 0.1))
    ctx = PostfitContext(model=result.model, frames=result.frames, out_dir=out_dir, config=run_config(cfg),
                         calibrator_factory=calibrator_factory(cfg), metrics=dict(result.metrics),
                         metadata=dict(result.metadata))
    explain = cfg.get("explain") or {}
    result.model.reference = sample_reference(result.frames.get("train"), int(explain.get("reference_rows", 256)),
                                              seed=int(cfg.seed))
    write_bundle(ctx)  # the fitted model is on disk before any step runs

    def sections(metrics: dict[str, float]) -> dict[str, Any]:
        status = ctx.metadata.get("postfit", [])
        return {**result.summary, **report_sections(metrics, alpha=alpha),
                **({"Post-fit steps": status_section(status)} if status else {})}

    def score_test(c: PostfitContext) -> None:
        if not cfg.get("test", True):
            return
        try:
            own_spec = getattr(c.model, "spec", None) is not None  # an ad-score model: the steps' metrics too
            scored = write_test_report(c.model, c.frames["test"], c.report_dir, history=result.history,
                                       metrics=c.metrics, spec=result.spec,
                                       extra_metrics=(lambda f: postfit_test_metrics(c, f)) if own_spec else None,
                                       sections=sections)
        except Exception as err:
            if strict:
                raise
            c.metadata["test_report"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            log.error("test report failed (%s: %s); the bundle is kept", type(err).__name__, err)
            return
        for lg in loggers:
            lg.log_metrics(scored, step=result.log_step)

    run_steps(list(cfg.get("postfit") or []), ctx, score_test, after_step=write_bundle, strict=strict)
    write_bundle(ctx)
    # the final word: every step's status, and the metrics steps added after the test scoring
    write_metrics(ctx.metrics, ctx.report_dir)
    write_report_pages(ctx.report_dir, ctx.metrics, extra=sections(ctx.metrics))
    return ctx
