"""Training throughput against a CTR library: within, DeepCTR-Torch's DeepFM, and a plain loop.

Two generated streams, the same rows and fields for every arm, batch 1024, one epoch per arm:

* `ipinyou`: 16 categorical fields with iPinYou's field names and vocabularies scaled to ~130k
  ids in total, as the full dataset has (IP, domain and slot ids carry most of them);
* `criteo`: 13 numeric (log-normal counts) + 26 categorical fields, vocabularies from 3 to 40k ids.

Values are Zipf-distributed ids; the click logit is a sum of per-id effects (larger for small
vocabularies), two pairwise interactions and, for criteo, linear terms in log counts, solved for a
CTR of ~4%. The last `--test-rows` rows are the held-out slice every arm is scored on (test AUC).

Arms, timed alternately (`--repeats`, the order rotated each repeat), median epoch each:

* `within`: what `python train.py` runs: AdDataModule (the FeatureProcessor fitted on train, whole
  batches gathered by index), AdPredictorNN with conf/model/nn.yaml's settings, AdScoreModule under
  a Lightning Trainer (no progress bar, no validation inside the timed epoch). `--within KEY=VALUE`
  overrides model.* settings (e.g. model.sparse_embeddings=true);
* `plain`: the same network and batches in a bare PyTorch loop (forward, loss, backward, step):
  the ceiling for the Lightning path;
* `deepfm`: deepctr_torch.models.DeepFM (its defaults: 4-wide embeddings, DNN 256-128, Adam) fitted
  with its own `fit` on the same rows (categorical ids as integers, numerics log1p + min-max scaled,
  as its examples do). Skipped with a message when deepctr-torch is not installed
  (`pip install --no-deps deepctr-torch`, the `bench` extra).

Writes benchmarks/results/ctr_throughput.{json,md}: samples/s per arm and shape, the ratios
within/deepfm (target >= 1.5) and within/plain (target >= 0.85), and test AUC. A ratio is the median
over repeats of the ratio of that repeat's adjacent epochs: this machine's speed drifts by up to 1.5x
over minutes, and a ratio of two epochs seconds apart cancels most of it (docs/throughput.md).

    nice -n 10 python -m benchmarks.ctr_throughput [--rows 200000] [--test-rows 50000] [--repeats 7]
    python -m benchmarks.ctr_throughput --rows 20000 --test-rows 5000 --repeats 1 --results-dir /tmp/ct
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from scipy.optimize import brentq
from scipy.special import expit

from benchmarks.common import compose, load_average, machine, parser, write_json, write_markdown
from benchmarks.common import plain_epoch as run_plain_epoch
from within.calibration.metrics import auc

NAME = "ctr_throughput"
BATCH = 1024
IPINYOU = {  # field -> vocabulary size (sum ~130k)
    "weekday": 7, "hour": 24, "useragent": 40, "IP": 36_000, "region": 35, "city": 370, "adexchange": 5,
    "domain": 33_000, "slotid": 60_000, "slotwidth": 21, "slotheight": 14, "slotvisibility": 11,
    "slotformat": 4, "creative": 130, "advertiser": 9, "slotprice": 4,
}
CRITEO_CARDS = [1_400, 550, 40_000, 25_000, 300, 24, 12_000, 630, 3, 9_000, 5_200, 30_000, 3_100, 27,
                11_000, 20_000, 10, 5_600, 2_100, 4, 28_000, 17, 15, 14_000, 100, 9_500]


def make_shape(shape: str, rows: int, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(frame, features spec) of one generated stream; ids are ints, numerics counts."""
    rng = np.random.default_rng([seed, 0 if shape == "ipinyou" else 1])
    if shape == "ipinyou":
        cards, n_num = dict(IPINYOU), 0
    elif shape == "criteo":
        cards, n_num = {f"C{i + 1}": c for i, c in enumerate(CRITEO_CARDS)}, 13
    else:
        raise SystemExit(f"--shapes: unknown shape {shape!r}; use ipinyou and/or criteo")
    cols: dict[str, np.ndarray] = {}
    eta = np.zeros(rows)
    for name, card in cards.items():
        p = 1.0 / np.arange(1, card + 1) ** 1.05
        ids = rng.choice(card, size=rows, p=p / p.sum())
        effect = rng.normal(0.0, 0.5 if card < 1_000 else 0.3, card)
        cols[name], eta = ids, eta + effect[ids]
    names = list(cards)
    for a, b in ((names[0], names[1]), (names[2], names[-1])):  # pairwise interactions of small fields
        table = rng.normal(0.0, 0.4, (cards[a], cards[b]))
        eta += table[cols[a], cols[b]]
    for j in range(n_num):
        counts = np.floor(rng.lognormal(1.0 + 0.2 * j, 1.2, rows))
        cols[f"I{j + 1}"] = counts
        eta += rng.normal(0.0, 0.25) * (np.log1p(counts) - np.log1p(counts).mean())
    b0 = brentq(lambda b: expit(b + eta).mean() - 0.04, -30, 30)
    cols["clicked"] = (rng.random(rows) < expit(b0 + eta)).astype(np.int64)
    fields = [{"name": n, "type": "categorical"} for n in cards]
    fields += [{"name": f"I{j + 1}", "type": "numeric", "transform": "log1p"} for j in range(n_num)]
    return pd.DataFrame(cols), {"label": "clicked", "weight": None, "time": None, "truth": None, "fields": fields}


def datamodule(df: pd.DataFrame, spec: dict[str, Any], test_rows: int) -> Any:
    """AdDataModule over the rows in order: train first, the last `test_rows` rows held out."""
    from within.data.datamodule import AdDataModule

    dm = AdDataModule(df, features=spec, batch_size=BATCH, seed=0,
                      split={"method": "time", "val_frac": 0.0, "calib_frac": 0.0, "test_frac": test_rows / len(df)})
    dm.setup("fit")
    return dm


def build_net(cfg: Any, dm: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(cfg.model.net, input_dim=dm.processor.input_dim, _convert_="all")


def net_auc(net: torch.nn.Module, dm: Any) -> float:
    net.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            scores.append(torch.sigmoid(net(batch)).numpy())
            labels.append(batch["label"].numpy())
    return float(auc(np.concatenate(scores), np.concatenate(labels)))


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def within_epoch(cfg: Any, dm: Any) -> tuple[float, float]:
    """(samples/s, test AUC) of one epoch of within's Lightning path."""
    from within.pipeline.recipes.nn import NNRecipe

    recipe = instantiate(cfg.model, _recursive_=False)
    assert isinstance(recipe, NNRecipe)
    torch.manual_seed(0)
    module, _, _ = recipe.build_module(cfg, dm.processor.input_dim)
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return dm.n_train / timer.seconds, net_auc(module.net, dm)


def plain_epoch(cfg: Any, dm: Any) -> tuple[float, float]:
    """(samples/s, test AUC) of the same network and batches in a bare loop."""
    from within.lit.optim import build_optimizer, sparse_parameters

    net = build_net(cfg, dm).train()
    opt = build_optimizer(instantiate(cfg.model.optimizer), [p for p in net.parameters() if p.requires_grad],
                          sparse_parameters(net))
    return run_plain_epoch(net, opt, dm.train_dataloader()), net_auc(net, dm)


def deepfm_inputs(dm: Any, spec: dict[str, Any]) -> tuple[list[Any], dict[str, dict], dict[str, np.ndarray]]:
    """DeepCTR-Torch feature columns and {split: {column: array}} (integer ids, scaled numerics)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat

    cats = [f["name"] for f in spec["fields"] if f["type"] == "categorical"]
    nums = [f["name"] for f in spec["fields"] if f["type"] == "numeric"]
    train, test = dm.frames["train"], dm.frames["test"]
    lo = {c: np.log1p(train[c].to_numpy()).min() for c in nums}
    hi = {c: np.log1p(train[c].to_numpy()).max() for c in nums}
    cards = {c: int(max(train[c].max(), test[c].max())) + 1 for c in cats}

    def arrays(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        out = {c: frame[c].to_numpy(dtype=np.int64) for c in cats}
        out.update({c: ((np.log1p(frame[c].to_numpy()) - lo[c]) / max(hi[c] - lo[c], 1e-9)).astype(np.float32)
                    for c in nums})
        return out

    columns = [SparseFeat(c, vocabulary_size=cards[c]) for c in cats] + [DenseFeat(c, 1) for c in nums]
    labels = {"train": train["clicked"].to_numpy(np.float32), "test": test["clicked"].to_numpy(np.float32)}
    return columns, {"train": arrays(train), "test": arrays(test)}, labels


def deepfm_epoch(columns: list[Any], x: dict[str, dict], y: dict[str, np.ndarray]) -> tuple[float, float]:
    from deepctr_torch.models import DeepFM

    torch.manual_seed(0)
    model = DeepFM(columns, columns, task="binary", device="cpu", seed=0)
    model.compile("adam", "binary_crossentropy")
    n = len(y["train"])
    start = time.perf_counter()
    model.fit(x["train"], y["train"], batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
    sps = n / (time.perf_counter() - start)
    p = model.predict(x["test"], batch_size=8192).reshape(-1)
    return sps, float(auc(p, y["test"]))


def have_deepctr() -> bool:
    try:
        import deepctr_torch  # noqa: F401
    except ImportError:
        print("deepfm: deepctr-torch is not installed; skipping that arm "
              "(pip install --no-deps deepctr-torch, the `bench` extra)")
        return False
    return True


def run_shape(shape: str, args: Any, cfg: Any, arms: list[str]) -> dict[str, Any]:
    df, spec = make_shape(shape, args.rows + args.test_rows, seed=args.seed)
    dm = datamodule(df, spec, args.test_rows)
    fd = deepfm_inputs(dm, spec) if "deepfm" in arms else None
    runs: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    from rich.progress import track

    for r in track(range(args.repeats), description=f"{shape}: {', '.join(arms)}"):
        # interleaved, the order rotated each repeat: drift hits every arm alike, and no arm always runs first
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            if arm == "within":
                runs[arm].append(within_epoch(cfg, dm))
            elif arm == "plain":
                runs[arm].append(plain_epoch(cfg, dm))
            else:
                runs[arm].append(deepfm_epoch(*fd))
    out: dict[str, Any] = {"train_rows": dm.n_train, "test_rows": len(dm.frames["test"]),
                           "ids": int(sum(dm.processor.input_dim["cat_cardinalities"])),
                           "ctr": float(df["clicked"].mean())}
    for arm, rs in runs.items():
        out[arm] = {"samples_per_s": statistics.median(r[0] for r in rs), "runs": [r[0] for r in rs],
                    "test_auc": rs[-1][1]}
    for other in ("plain", "deepfm"):
        if other in runs:  # the ratio of each repeat's adjacent epochs, then the median over repeats
            paired = [w[0] / o[0] for w, o in zip(runs["within"], runs[other])]
            out[f"within_vs_{other}"] = statistics.median(paired)
            out[f"within_vs_{other}_runs"] = paired
    if "deepfm" in runs:
        out["auc_within_minus_deepfm"] = out["within"]["test_auc"] - out["deepfm"]["test_auc"]
    print(shape, {k: v for k, v in out.items() if k not in runs}, {a: out[a] for a in runs}, flush=True)
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=200_000, help="training rows per shape")
    ap.add_argument("--test-rows", type=int, default=50_000, help="held-out rows per shape")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved epochs per arm (ratios: median over repeats)")
    ap.add_argument("--shapes", nargs="+", default=["ipinyou", "criteo"])
    ap.add_argument("--within", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for the within and plain arms, e.g. model.sparse_embeddings=true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = ["within", "plain"] + (["deepfm"] if have_deepctr() else [])
    cfg = compose(list(args.within))
    result: dict[str, Any] = {"batch_size": BATCH, "threads": args.threads, "repeats": args.repeats,
                              "within_overrides": list(args.within), "shapes": {}}
    for shape in args.shapes:
        result["shapes"][shape] = run_shape(shape, args, cfg, arms)
    result["targets"] = {"within_vs_deepfm_min": 1.5, "within_vs_plain_min": 0.85}
    result["met"] = all(r.get("within_vs_deepfm", 1.5) >= 1.5 and r.get("within_vs_plain", 0.85) >= 0.85
                        and r.get("auc_within_minus_deepfm", 0.0) >= 0.0 for r in result["shapes"].values())
    result["load_average"], result["machine"] = load_average(), machine()
    path = write_json(NAME, result, args.results_dir)
    lines = ["| shape | arm | samples/s | test AUC |", "|---|---|---:|---:|"]
    for shape, r in result["shapes"].items():
        lines += [f"| {shape} | {a} | {r[a]['samples_per_s']:,.0f} | {r[a]['test_auc']:.4f} |" for a in arms]
    lines.append("")
    for shape, r in result["shapes"].items():
        ratios = [f"within/{k.split('_vs_')[1]} {r[k]:.2f}x (repeats {min(r[k + '_runs']):.2f} to "
                  f"{max(r[k + '_runs']):.2f})" for k in ("within_vs_deepfm", "within_vs_plain") if k in r]
        lines.append(f"- {shape} ({r['train_rows']:,} train rows, {r['ids']:,} ids): {', '.join(ratios)}")
    lines.append(f"\nwithin overrides: {list(args.within) or 'none'}; {args.threads} threads; "
                 f"load average {result['load_average']}.")
    write_markdown(NAME, "\n".join(lines) + "\n", args.results_dir)
    print(path)


if __name__ == "__main__":
    main()
