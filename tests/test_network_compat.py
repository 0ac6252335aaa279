"""Networks saved before the shared embedding table and lean_single_modality still load, and score as
they did: LEGACY_KWARGS rebuilds the old structure, TabularEncoder folds per-field tables into one."""
from __future__ import annotations

import numpy as np
import torch

from within.models.network import build_net
from within.nn.predictor import AdPredictorNN

TAB = {"n_num": 3, "cat_cardinalities": [5, 300, 40]}


def old_state(net: AdPredictorNN) -> dict[str, torch.Tensor]:
    """`net`'s state as the per-field layout wrote it: tabular.embeddings.<i>.weight [card_i, width_i]."""
    state = dict(net.state_dict())
    enc = net.tabular
    del state["tabular.table.weight"]
    for i in range(len(enc.cat_cardinalities)):
        state[f"tabular.embeddings.{i}.weight"] = enc.field_embedding(i).detach().clone()
    return state


def batch(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in TAB["cat_cardinalities"]], 1)
    return {"cat": cat, "num": torch.randn(n, 3, generator=g)}


def test_an_old_tabular_only_network_loads_with_its_attention_and_vector_and_scores_the_same():
    torch.manual_seed(0)
    saved = AdPredictorNN(TAB, hidden_dims=[16], lean_single_modality=False).eval()
    assert saved.attention is not None and saved.tabular.proj is not None  # the old structure
    kwargs = {k: v for k, v in saved.init_kwargs.items() if k != "lean_single_modality"}  # an old bundle's
    rebuilt = build_net("AdPredictorNN", kwargs).eval()
    rebuilt.load_state_dict(old_state(saved), strict=True)
    x = batch()
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(x).numpy(), saved(x).numpy(), rtol=0, atol=1e-6)


def test_the_lean_default_drops_only_what_one_modality_cannot_use():
    lean = AdPredictorNN(TAB, hidden_dims=[16])
    assert lean.attention is None and lean.tabular.proj is None and "tabular" not in lean.missing
    assert lean.fused_dim == lean.tabular.raw_dim  # the tower reads the raw block alone
    crossed = AdPredictorNN(TAB, hidden_dims=[16], cross_layers=1)
    assert crossed.tabular.proj is not None  # the cross layers multiply the vector's entries: kept
    multi = AdPredictorNN({**TAB, "text_fields": 1, "text_buckets": 64}, hidden_dims=[16])
    assert multi.attention is not None and multi.tabular.proj is not None
    x = batch()
    x["mask_tabular"] = torch.arange(32) % 2 == 0
    emb = lean.eval().embed_inputs(x)
    with torch.no_grad():
        out = lean(x)
        np.testing.assert_allclose(lean.forward_embedded(emb).numpy() + emb["wide"].sum(1).numpy(), out.numpy(),
                                   atol=1e-5)
        # a missing row's tabular input is zeros: every missing row scores the same
        assert torch.allclose(out[1::2], out[1].expand(16))


def test_the_shared_table_gives_each_field_its_own_rows_and_a_zero_pad():
    from within.nn.encoders import TabularEncoder

    enc = TabularEncoder([5, 300, 40], n_num=0, out_dim=0, embedding_dims=[2, 8, 5])
    cat = batch()["cat"]
    raw = enc.embed(cat)
    assert raw.shape == (32, 15)
    start = 0
    for i, width in enumerate(enc.embedding_dims):
        table = enc.field_embedding(i)
        assert table.shape == (enc.cat_cardinalities[i], width)
        assert torch.equal(raw[:, start:start + width], table[cat[:, i]])
        start += width
    assert torch.equal(enc.embed(torch.zeros(2, 3, dtype=torch.long)), torch.zeros(2, 15))  # pad: zeros
    rows = enc.rows(cat)
    assert len(set(rows[:, 0].tolist()) & set(rows[:, 1].tolist()) - {0}) == 0  # fields never share a row


def test_the_recipe_records_kwargs_that_rebuild_the_network_it_trained():
    """train.py's bundle rebuilds the trained structure: a tabular-only (lean) network, whose config
    does not name lean_single_modality, must not come back with LEGACY_KWARGS' old structure."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["model.net.hidden_dims=[16]"])
    recipe = instantiate(cfg.model, _recursive_=False)
    module, net_class, net_kwargs = recipe.build_module(cfg, dict(TAB))
    rebuilt = build_net(net_class, net_kwargs)
    trained = {k: tuple(v.shape) for k, v in module.net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == trained
    assert module.net.attention is None and rebuilt.attention is None
