"""Training throughput of AdScoreModule under Lightning vs a plain PyTorch loop over the same
model, data and optimizer, in one process; plus peak RSS and predict latency.

The network and optimizer are model=nn's defaults (conf/model/nn.yaml), the rows the default
simulator world's (seed 7, time split, val 10%, test 10%). The two loops alternate `--repeats`
times, so drift in machine load hits both alike; each figure is the median epoch.

Writes benchmarks/results/train_throughput.json (`lightning_vs_plain_ratio` = Lightning samples/s
divided by plain samples/s; 1.0 means no overhead).

    python -m benchmarks.train_throughput [--rows 200000] [--repeats 3]
    python -m benchmarks.train_throughput --rows 6000 --repeats 1 --results-dir /tmp/tt   # a trial run
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

from benchmarks.common import compose, machine, parser, write_json
from benchmarks.common import plain_epoch as run_plain_epoch
from within.lit.module import AdScoreModule
from within.models.network import NetworkModel
from within.pipeline.data import build_datamodule

NAME = "train_throughput"


def make_net(cfg: Any, input_dim: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(cfg.model.net, input_dim=input_dim, _convert_="all")


def plain_epoch(cfg: Any, dm: Any) -> float:
    net = make_net(cfg, dm.processor.input_dim).train()
    return run_plain_epoch(net, instantiate(cfg.model.optimizer)(net.parameters()), dm.train_dataloader())


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(cfg: Any, dm: Any) -> float:
    module = AdScoreModule(net=make_net(cfg, dm.processor.input_dim), optimizer=instantiate(cfg.model.optimizer))
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return dm.n_train / timer.seconds


def latency(model: NetworkModel, rows: Any, repeats: int) -> dict[str, float]:
    model.predict(rows)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(rows)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    L.seed_everything(0, workers=True)
    cfg = compose([f"data.source.n={args.rows}", "seed=0", "data.source.seed=7", "data.batch_size=1024",
                   "data.split={method:time,val_frac:0.1,calib_frac:0.0,test_frac:0.1}"])
    dm = build_datamodule(cfg)
    dm.setup()

    plain, light = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(plain_epoch(cfg, dm))
        light.append(lightning_epoch(cfg, dm))
    plain_sps, light_sps = statistics.median(plain), statistics.median(light)

    model = NetworkModel(processor=dm.processor, net=make_net(cfg, dm.processor.input_dim).eval())
    test = dm.frames["test"].drop(columns=[dm.spec.label, dm.spec.truth])
    result = {
        "rows_train": dm.n_train,
        "batch_size": dm.batch_size,
        "plain_samples_per_s": plain_sps,
        "lightning_samples_per_s": light_sps,
        "plain_runs": plain,
        "lightning_runs": light,
        "lightning_vs_plain_ratio": light_sps / plain_sps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "predict_one_ad": latency(model, test.iloc[0].to_dict(), 200),
        "predict_1024_ads": latency(model, test.iloc[:1024], 30),
        "machine": machine(),
    }
    print(result)
    print(f"wrote {write_json(NAME, result, args.results_dir)}")


if __name__ == "__main__":
    main()
