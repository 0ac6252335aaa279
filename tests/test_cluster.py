"""Cluster launching (docs/cluster.md): hydra/launcher=slurm's sbatch script, trainer=ddp under SLURM,
a 2-job sweep through submitit's local executor, one run directory per job, and a W&B run id that a
requeued job finds again."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_cfg
from within.pipeline.loggers import WANDB_ID_FILE, build_loggers, run_dir_id, wandb_run_id

ROOT = Path(__file__).resolve().parents[1]
SLURM = ["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
         "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=720"]


class Submitted(Exception):
    """Stands in for sbatch: carries the script submitit would have submitted."""


def sbatch_script(tmp_path: Path, overrides: list[str], monkeypatch, n_jobs: int = 2) -> str:
    """The sbatch file that Hydra's SlurmLauncher, built from this config, hands to sbatch for a sweep
    of `n_jobs` jobs (submitit's own parameter mapping and `_make_sbatch_string`, no sbatch run)."""
    from submitit.slurm.slurm import SlurmExecutor

    def capture(self, command):
        raise Submitted(self._make_submission_file_text(command, "test"))

    monkeypatch.setattr(SlurmExecutor, "_submit_command", capture)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is on the PATH"
    cfg = compose_cfg("train", [*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], out_dir=tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as sent:
        launcher.launch([[f"seed={i}"] for i in range(n_jobs)], initial_job_idx=0)
    return str(sent.value)


def sbatch_lines(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_slurm_launcher_renders_nodes_gpus_time_partition_and_one_task_per_gpu(tmp_path, monkeypatch):
    script = sbatch_script(tmp_path, SLURM, monkeypatch)
    lines = sbatch_lines(script)
    assert lines["nodes"] == "2"
    assert lines["gpus-per-node"] == "4"
    assert lines["ntasks-per-node"] == "4"  # one DDP process per GPU
    assert lines["time"] == "720"
    assert lines["partition"] == "gpu"
    assert lines["signal"] == "USR2@120"  # submitit's requeue signal, 120 s before the limit
    assert lines["array"] == "0-1%2"  # the sweep's 2 jobs, both at once (array_parallelism caps it at 16)
    assert lines["cpus-per-task"] == "8" and lines["mem"] == "64GB"
    assert "srun" in script.splitlines()[-1]


def test_slurm_launcher_defaults_leave_the_partition_to_the_cluster(tmp_path, monkeypatch):
    lines = sbatch_lines(sbatch_script(tmp_path, ["hydra/launcher=slurm"], monkeypatch, n_jobs=1))
    assert "partition" not in lines
    assert (lines["nodes"], lines["gpus-per-node"], lines["ntasks-per-node"], lines["time"]) == ("1", "1", "1", "240")


def test_ddp_trainer_takes_num_nodes_and_devices_from_the_launcher(tmp_path):
    cfg = compose_cfg("train", SLURM, out_dir=tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    cfg = compose_cfg("train", ["trainer=ddp"], out_dir=tmp_path)  # no submitit launcher: one node, all GPUs
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (1, "auto")
    cfg = compose_cfg("train", ["trainer=ddp", "hydra/launcher=submitit_local"], out_dir=tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (1, 1)


SRUN_ENV = {  # what srun sets in rank 5 of a 2-node x 4-task job
    "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "1234",
    "SLURM_NODELIST": "node[01-02]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
}


def test_trainer_built_by_within_under_srun_uses_lightnings_slurm_environment(tmp_path, monkeypatch):
    """The Trainer within instantiates from trainer=ddp sees srun's variables and uses SLURMEnvironment:
    world size nodes x tasks, the global rank from SLURM_PROCID, the master on the first node.
    (accelerator=cpu so it builds here; the GPUs change the device, not the cluster environment.)"""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it to 5; restored after
    for key, value in SRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = compose_cfg("train", [*SLURM, "trainer.accelerator=cpu", "trainer.precision=32-true",
                                "trainer.sync_batchnorm=false", "hydra.launcher.gpus_per_node=4"], out_dir=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (env.global_rank(), env.local_rank(), env.node_rank()) == (5, 1, 1)
    assert env.main_address == "node01"
    assert not trainer.is_global_zero


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WITHIN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_job_sweep_through_submitit_local_executor(tmp_path):
    res = _run_cli(["-m", "hydra/launcher=submitit_local", "model.net.hidden_dims=[8],[16]", "data.source.n=3000",
                    "data.batch_size=512", "trainer.max_epochs=1", "postfit=[]", "logger=none",
                    "extras.print_config=false", "hydra.launcher.timeout_min=10"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1  # one sweep directory, one run directory per job, nothing else
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    for job in jobs:
        metrics = (sweeps[0] / job / "report" / "metrics.json")
        assert metrics.is_file()
        assert (sweeps[0] / job / "bundle" / "model.safetensors").is_file()
    assert list((sweeps[0] / ".submitit").glob("*/*_result.pkl"))  # it went through submitit
    assert not (tmp_path / "outputs" / "train" / "runs").exists()  # no stray single-run directories


def test_wandb_run_id_is_the_same_for_every_rank_and_for_a_requeued_job(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    run = tmp_path / "multiruns" / "2026-01-01_00-00-00" / "0"
    other = tmp_path / "multiruns" / "2026-01-01_00-00-00" / "1"
    first = run_dir_id(run)
    assert len(first) == 8 and first.isalnum() and first == first.lower()
    assert first == run_dir_id(run) != run_dir_id(other)

    cfg = OmegaConf.create({"logger": {"wandb": {"_target_": "builtins.dict", "id": None}}})
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # rank 1 starts first: it writes nothing
    build_loggers(cfg, run, ckpt_path=None)
    assert cfg.logger.wandb.id == first and not (run / WANDB_ID_FILE).exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    cfg = OmegaConf.create({"logger": {"wandb": {"_target_": "builtins.dict", "id": None}}})
    build_loggers(cfg, run, ckpt_path=None)
    assert cfg.logger.wandb.id == first and (run / WANDB_ID_FILE).read_text() == first
    assert cfg.logger.wandb.resume == "allow"
    # the requeued job: same run directory, ckpt_path=auto found its last.ckpt there
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert wandb_run_id(str(run / "checkpoints" / "last.ckpt"), run) == first
    # a saved id wins over the derived one (a run started before ids were derived, or moved)
    (other / "checkpoints").mkdir(parents=True)
    (other / WANDB_ID_FILE).write_text("abcd1234")
    assert wandb_run_id(str(other / "checkpoints" / "last.ckpt"), tmp_path / "new_run") == "abcd1234"


def test_wandb_offline_run_resumes_under_the_same_id(tmp_path, monkeypatch):
    """W&B itself (offline): a job and its requeue write to one run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    ids = []
    for attempt in range(2):  # the first attempt, then the requeued one
        cfg = compose_cfg("train", ["logger=wandb"], out_dir=run)
        loggers = build_loggers(cfg, run, ckpt_path=None)
        (lg,) = loggers
        lg.log_metrics({"train/loss": 1.0 / (attempt + 1)}, step=attempt)
        ids.append(lg.experiment.id)
        import wandb

        wandb.finish()
    assert ids[0] == ids[1] == run_dir_id(run)
    assert len(list((run / "wandb").glob(f"offline-run-*-{ids[0]}"))) == 2  # one W&B run, two attempts


def test_single_run_directory_is_the_slurm_job_in_every_rank_and_after_a_requeue(tmp_path, monkeypatch):
    """`python train.py trainer=ddp` under srun: each rank composes its own config, and a start-time name
    would differ by a second between ranks (duplicate run directories) and after a requeue."""
    from hydra.core.global_hydra import GlobalHydra

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    stamp = compose_cfg("train", [], out_dir=tmp_path).hydra.run.dir.rsplit("/", 1)[-1]
    assert len(stamp) == 19 and stamp[4] == "-" and stamp[10] == "_"  # YYYY-MM-DD_HH-MM-SS outside SLURM
    dirs = set()
    for rank in range(2):  # two ranks, then rank 0 again after a requeue
        for key, value in {**SRUN_ENV, "SLURM_PROCID": str(rank)}.items():
            monkeypatch.setenv(key, value)
        GlobalHydra.instance().clear()
        dirs.add(compose_cfg("train", [], out_dir=tmp_path).hydra.run.dir)
    assert len(dirs) == 1 and dirs.pop().endswith("/train/runs/slurm-1234")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert compose_cfg("train", [], out_dir=tmp_path).hydra.run.dir.endswith("/runs/slurm-1200_3")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty bash: one shell, many runs
    assert "slurm-" not in compose_cfg("train", [], out_dir=tmp_path).hydra.run.dir


def test_ddp_ranks_of_an_in_process_sweep_job_rerun_that_job_not_the_sweep(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from within.pipeline.train import ddp_ranks_join_this_job

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    compose_cfg("train", ["trainer=ddp_cpu", "model.net.hidden_dims=[8]"], out_dir=tmp_path)
    hc = HydraConfig.get()
    with read_write(hc), open_dict(hc):
        hc.runtime.output_dir = str(tmp_path / "multiruns" / "t" / "0")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "trainer=ddp_cpu", "model.net.hidden_dims=[8],[16]"])
    ddp_ranks_join_this_job()
    # what Lightning's launcher re-runs for rank 1: this job's overrides as one run, in its directory
    assert sys.argv == ["train.py", "trainer=ddp_cpu", "model.net.hidden_dims=[8]", "hydra.mode=RUN"]
    assert HydraConfig.get().run.dir == str(tmp_path / "multiruns" / "t" / "0")


@pytest.mark.slow
def test_ddp_sweep_makes_one_directory_per_job(tmp_path):
    res = _run_cli(["-m", "trainer=ddp_cpu", "model.net.hidden_dims=[8],[16]", "data.source.n=2000",
                    "data.batch_size=256", "trainer.max_epochs=1", "postfit=[]", "logger=none",
                    "extras.print_config=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # rank 1 did not start a sweep of its own
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweeps[0] / j / "bundle" / "model.safetensors").is_file() for j in ("0", "1"))
    assert not (tmp_path / "outputs" / "train" / "runs").exists()
