"""Training throughput of AdScoreModule under Lightning vs a plain PyTorch loop over the same
model, data and optimizer, in one process; plus peak RSS and predict latency.

Writes benchmarks/results/train_throughput.json (`lightning_vs_plain_ratio` = Lightning samples/s
divided by plain samples/s; 1.0 means no overhead).

    python benchmarks/train_throughput.py [--rows 200000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from within.data.datamodule import AdDataModule
from within.data.simulator import simulate
from within.lit.module import AdScoreModule, binomial_logloss
from within.models.predictor import AdScorePredictor
from within.nn.predictor import AdPredictorNN

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"


def net_kwargs() -> dict:
    # nested under `model` so the net's ${model.hidden_dims} interpolation resolves
    cfg = OmegaConf.to_container(OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "nn.yaml")}),
                                 resolve=True)["model"]
    kwargs = dict(cfg["net"])
    kwargs.pop("_target_")
    return kwargs


def make_net(input_dim: dict) -> AdPredictorNN:
    torch.manual_seed(0)
    return AdPredictorNN(input_dim=input_dim, **net_kwargs())


def optimizer_factory(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-5)


def plain_epoch(dm: AdDataModule) -> float:
    net = make_net(dm.processor.input_dim).train()
    opt = optimizer_factory(net.parameters())
    loader = dm.train_dataloader()
    n = 0
    start = time.perf_counter()
    for batch in loader:
        logits = net(batch).float()
        loss = binomial_logloss(logits, batch["label"], batch["weight"]) / batch["weight"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(logits)
    return n / (time.perf_counter() - start)


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(dm: AdDataModule) -> float:
    module = AdScoreModule(net=make_net(dm.processor.input_dim), optimizer=optimizer_factory)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return dm.n_train / timer.seconds


def latency(predictor: AdScorePredictor, rows, repeats: int) -> dict[str, float]:
    predictor.predict(rows)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.predict(rows)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    L.seed_everything(0, workers=True)

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "features" / "synthetic.yaml"))
    frame = simulate(n=args.rows, seed=7)
    dm = AdDataModule(source=frame, features=spec, split={"method": "time", "val_frac": 0.1, "test_frac": 0.1},
                      batch_size=1024, seed=0)
    dm.setup()

    plain, light = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(plain_epoch(dm))
        light.append(lightning_epoch(dm))
    plain_sps, light_sps = statistics.median(plain), statistics.median(light)

    predictor = AdScorePredictor(processor=dm.processor, net=make_net(dm.processor.input_dim).eval())
    test = dm.frames["test"].drop(columns=["clicked", "true_ctr"])
    one = test.iloc[0].to_dict()
    batch = test.iloc[:1024]
    result = {
        "rows_train": dm.n_train,
        "batch_size": dm.batch_size,
        "torch_threads": torch.get_num_threads(),
        "plain_samples_per_s": plain_sps,
        "lightning_samples_per_s": light_sps,
        "plain_runs": plain,
        "lightning_runs": light,
        "lightning_vs_plain_ratio": light_sps / plain_sps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "predict_one_ad": latency(predictor, one, 200),
        "predict_1024_ads": latency(predictor, batch, 30),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
