"""IndexAddEmbedding: nn.Embedding's forward and gradient, through zeros + index_add_ on CPU."""
from __future__ import annotations

import torch
from torch import nn

from within.nn.lookup import IndexAddEmbedding


def pair(padding_idx: int | None = 0, sparse: bool = False) -> tuple[nn.Embedding, IndexAddEmbedding]:
    torch.manual_seed(0)
    ref = nn.Embedding(50, 6, padding_idx=padding_idx, sparse=sparse)
    fast = IndexAddEmbedding(50, 6, padding_idx=padding_idx, sparse=sparse)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_forward_and_gradient_match_nn_embedding_with_repeats_and_the_pad_row():
    for padding_idx in (0, None):
        ref, fast = pair(padding_idx)
        idx = torch.tensor([[0, 3, 3, 7], [7, 0, 49, 3]])     # repeats and the pad index
        g = torch.randn(2, 4, 6)
        out_ref, out_fast = ref(idx), fast(idx)
        assert torch.equal(out_ref, out_fast)
        out_ref.backward(g)
        out_fast.backward(g)
        assert torch.allclose(ref.weight.grad, fast.weight.grad, atol=1e-6)
        if padding_idx is not None:
            assert torch.count_nonzero(fast.weight.grad[padding_idx]) == 0
        assert torch.count_nonzero(fast.weight.grad[1]) == 0   # an untouched row gets no gradient


def test_it_takes_the_fast_path_only_for_a_dense_cpu_training_gradient():
    ref, fast = pair()
    idx = torch.tensor([[1, 2]])
    assert fast(idx).grad_fn.name().endswith("_IndexAddLookupBackward")
    with torch.no_grad():
        assert fast(idx).grad_fn is None
    _, sparse = pair(sparse=True)
    out = sparse(idx)
    assert "Embedding" in out.grad_fn.name()
    out.sum().backward()
    assert sparse.weight.grad.is_sparse
    assert list(fast.state_dict()) == list(ref.state_dict()) == ["weight"]


def test_dp_networks_keep_plain_embeddings_for_opacus():
    from within.nn.predictor import AdPredictorNN

    dims = {"cat_cardinalities": [5, 9], "n_num": 1}
    plain = AdPredictorNN(input_dim=dims, hidden_dims=[8])
    dp = AdPredictorNN(input_dim=dims, hidden_dims=[8], dp_compatible=True)
    assert type(plain.tabular.table) is IndexAddEmbedding and type(plain.wide) is IndexAddEmbedding
    assert type(dp.tabular.table) is nn.Embedding and type(dp.wide) is nn.Embedding
