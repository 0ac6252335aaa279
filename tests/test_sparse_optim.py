"""Sparse embeddings + LazyAdam beside the configured optimizer (within/lit/optim.py)."""
from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from within.data.datamodule import AdDataModule
from within.lit.module import AdScoreModule
from within.lit.optim import SparseDenseOptimizer, build_optimizer, sparse_parameters
from within.nn.predictor import AdPredictorNN

INPUT = {"n_num": 2, "cat_cardinalities": [50, 2000]}


def _batch(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"num": torch.randn(n, 2, generator=g), "cat": torch.stack([torch.randint(2, 50, (n,), generator=g),
                                                                       torch.randint(2, 40, (n,), generator=g)], 1),
            "label": torch.randint(0, 2, (n,), generator=g).float(), "weight": torch.ones(n)}


def test_sparse_tables_get_sparse_gradients_and_only_touched_rows_move():
    net = AdPredictorNN(INPUT, hidden_dims=[16], sparse_embeddings=True)
    sparse = sparse_parameters(net)
    assert len(sparse) == 2  # the categorical fields' shared table and the wide table
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.01), list(net.parameters()), sparse)
    assert isinstance(opt, SparseDenseOptimizer)
    big = net.tabular.table.weight
    before, head = big.detach().clone(), net.head.weight.detach().clone()
    batch = _batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch), batch["label"])
    opt.zero_grad()
    loss.backward()
    assert big.grad.is_sparse and not net.head.weight.grad.is_sparse
    opt.step()
    moved = (big.detach() != before).any(dim=1)
    touched = torch.zeros(len(big), dtype=torch.bool)
    touched[net.tabular.rows(batch["cat"]).unique()] = True
    assert torch.equal(moved, touched)  # ids 40..1999 of field 1 are never seen: untouched, not decayed
    assert touched.sum() < 100 and len(big) > 2000
    assert not torch.equal(net.head.weight, head)
    state = opt.state_dict()
    assert set(state) == {"dense", "sparse"} and state["sparse"]["state"]
    fresh = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.01), list(net.parameters()), sparse)
    fresh.load_state_dict(state)
    assert fresh.sparse.state_dict()["state"].keys() == state["sparse"]["state"].keys()
    with pytest.raises(ValueError, match="same model.net.sparse_embeddings"):
        fresh.load_state_dict(state["dense"])
    with pytest.raises(ValueError, match="privacy=dp"):
        AdPredictorNN(INPUT, sparse_embeddings=True, dp_compatible=True)


def test_dense_default_is_unchanged():
    net = AdPredictorNN(INPUT, hidden_dims=[16])
    assert sparse_parameters(net) == []
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.01), list(net.parameters()), [])
    assert type(opt) is torch.optim.AdamW


def _fit(tmp_path, sparse: bool):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.integers(0, 500, 3000).astype(str), "b": rng.integers(0, 5, 3000).astype(str),
                       "x": rng.normal(size=3000)})
    df["y"] = (rng.random(3000) < 0.2 + 0.3 * (df["b"] == "1")).astype(int)
    spec = {"label": "y", "time": None, "weight": None, "truth": None,
            "fields": [{"name": "a", "type": "categorical"}, {"name": "b", "type": "categorical"},
                       {"name": "x", "type": "numeric"}]}
    dm = AdDataModule(df, features=spec, batch_size=256, split={"method": "random", "val_frac": 0.1, "test_frac": 0.1})
    dm.setup("fit")
    torch.manual_seed(0)
    net = AdPredictorNN(dm.processor.input_dim, hidden_dims=[16], sparse_embeddings=sparse)
    module = AdScoreModule(net, functools.partial(torch.optim.AdamW, lr=0.01),
                           scheduler=functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_lightning_fit_with_sparse_embeddings_and_a_scheduler(tmp_path):
    trainer = _fit(tmp_path / "sparse", sparse=True)
    opt = trainer.optimizers[0]
    assert isinstance(opt, SparseDenseOptimizer)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0025] * len(opt.param_groups))  # both moved
    # 300 val rows put the AUC's SE near 0.035 (both arms score about 0.53 here): the sparse fit must
    # land within that noise of the dense fit of the same seed, not above a fixed bar
    dense = _fit(tmp_path / "dense", sparse=False)
    gap = float(trainer.callback_metrics["val/auc"]) - float(dense.callback_metrics["val/auc"])
    assert abs(gap) < 0.05


def test_lazy_adam_takes_the_steps_sparse_adam_takes():
    """The same update as torch.optim.SparseAdam (duplicate ids summed, pad rows untouched, bias
    correction per step), with the same state keys; dense gradients are refused."""
    from within.lit.optim import LazyAdam

    torch.manual_seed(0)
    ours, ref = (torch.nn.Embedding(300, 6, sparse=True, padding_idx=0) for _ in range(2))
    ref.weight.data.copy_(ours.weight.data)
    opt, ref_opt = LazyAdam(ours.parameters(), lr=0.02), torch.optim.SparseAdam(ref.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(3)
    for step in range(15):
        ids = torch.randint(0, 300, (128, 4), generator=g)
        ids[:8] = 0  # padding rows get no gradient
        scale = float(step + 1)
        for emb, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            (emb(ids) ** 2).sum().mul(scale).backward()
            o.step()
    assert torch.allclose(ours.weight, ref.weight, atol=1e-6)
    assert ours.weight[0].abs().max() == 0
    assert set(opt.state_dict()["state"][0]) == set(ref_opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    dense = torch.nn.Parameter(torch.zeros(3, 2))
    dense.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        LazyAdam([dense]).step()
