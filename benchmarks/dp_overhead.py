"""DP-SGD overhead of AdPredictorNN: step time and peak memory, non-DP vs DP.

Writes benchmarks/results/dp_overhead.json: step time (forward + backward + optimizer step, median
of `--repeats`) and peak memory, non-DP vs DP, at batch 256 and 1024, for each grad_sample_mode
(ghost | hooks | functorch); `ratio` is the DP step time over the non-DP one at the same batch, in
the same process. CPU peak memory is the process's max RSS growth during the timed steps (psutil),
GPU peak is torch.cuda's. The privacy-utility sweep is benchmarks/dp_utility.py.

    python -m benchmarks.dp_overhead                   # minutes
    python -m benchmarks.dp_overhead --repeats 2 --modes ghost --results-dir /tmp/dp   # a trial run
"""
from __future__ import annotations

import statistics
import time

import psutil
import torch

from benchmarks.common import machine, parser, write_json

NAME = "dp_overhead"


def step_times(batch_size: int, mode: str | None, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per training step (and peak memory) of AdPredictorNN; mode None = non-DP."""
    from within.lit.losses import RowLoss, row_losses
    from within.nn.predictor import AdPredictorNN
    from within.privacy.engine import make_private

    torch.manual_seed(0)
    input_dim = {"n_num": 8, "cat_cardinalities": [50, 20, 200, 10, 6, 4], "text_fields": 2, "text_buckets": 4096,
                 "image_fields": 1, "image_channels": 3, "image_size": 16}
    net = AdPredictorNN(input_dim, dp_compatible=mode is not None).to(device)
    batch = {k: v.to(device) for k, v in AdPredictorNN.example_batch(input_dim, batch_size, seed=1).items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    pt = None
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch_size * 10)),
                                             batch_size=batch_size)
        pt = make_private(net, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                          expected_batch_size=batch_size, delta=1e-6, grad_sample_mode=mode, criterion=RowLoss())
        opt = pt.optimizer

    def step() -> None:
        logits = net(batch).float()
        if pt is not None and pt.criterion is not None:
            pt.criterion(logits, batch["label"], batch["weight"]).backward()
        else:
            row_losses(logits, batch["label"], batch["weight"]).mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up (allocations, first-call dispatch)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak_rss = rss0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak_rss = max(peak_rss, proc.memory_info().rss)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss - rss0
    if pt is not None:
        pt.close()
    return {"step_s": statistics.median(times), "peak_mem_mb": peak / 2**20,
            "grad_sample_mode": pt.grad_sample_mode if pt is not None else None}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="ghost,hooks,functorch")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overhead = []
    for bs in (256, 1024):
        base = step_times(bs, None, args.repeats, device)
        overhead.append({"batch_size": bs, "mode": "non_dp", **base, "ratio": 1.0})
        for mode in args.modes.split(","):
            r = step_times(bs, mode, args.repeats, device)
            overhead.append({"batch_size": bs, "mode": mode, **r, "ratio": r["step_s"] / base["step_s"]})
            print(overhead[-1], flush=True)
    result = {"device": device, "repeats": args.repeats, "machine": machine(), "overhead": overhead}
    print(f"wrote {write_json(NAME, result, args.results_dir)}")


if __name__ == "__main__":
    main()
