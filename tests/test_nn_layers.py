"""Blocks on their own: embedding sharing, Dice, the activation unit, MBA regularisation."""

from __future__ import annotations

import pytest
import torch

from models.nn.attention import ActivationUnit
from models.nn.layers import (
    MLP,
    Dice,
    EmbeddingCollection,
    build_optimizers,
    split_parameters,
)
from tests.test_nn_support import random_batch, tiny_schema


def _trained_dice(dim: int = 5) -> Dice:
    torch.manual_seed(0)
    dice = Dice(dim)
    with torch.no_grad():
        dice.alpha.uniform_(-0.5, 0.5)
    dice.train()
    for _ in range(50):
        dice(torch.randn(64, dim) * 3 + 1)
    return dice.eval()


def test_behaviour_sequence_reads_the_ad_tables():
    schema = tiny_schema()
    emb = EmbeddingCollection(schema)
    assert set(emb.tables) == {f.name for f in schema.tables()}
    ids = torch.tensor([[3, 7, 0]])
    hist = emb.embed("hist_ad_id", ids)
    target = emb.embed("ad_id", torch.tensor([3, 7, 0]))
    assert torch.equal(hist[0], target)
    assert torch.count_nonzero(hist[0, 2]) == 0  # padding row is zero
    keys = list(emb.state_dict())
    assert sum("ad_id" in k for k in keys) == 1  # the shared table is stored once


def test_group_lookup_shapes_and_integer_ids_only():
    schema = tiny_schema()
    emb = EmbeddingCollection(schema)
    batch = random_batch(schema, size=4, length=5)
    assert emb(batch, "ad").shape == (4, 8 + 4 + 2)
    assert emb(batch, "behaviour").shape == (4, 5, 8 + 4)
    with pytest.raises(TypeError, match="ad_id"):
        emb.embed("ad_id", batch["ad_id"].float())
    with pytest.raises(KeyError, match="gender"):
        emb({"age_bucket": batch["age_bucket"]}, "user")


def test_sparse_tables_go_to_sparse_adam():
    schema = tiny_schema()
    model = torch.nn.ModuleDict({"emb": EmbeddingCollection(schema, sparse=True),
                                 "mlp": MLP(4, (3,))})
    sparse, dense = split_parameters(model)
    assert {id(p) for p in sparse} == {id(t.weight) for t in model["emb"].tables.values()}
    assert len(sparse) + len(dense) == len(list(model.parameters()))
    kinds = [type(o).__name__ for o in build_optimizers(model)]
    assert kinds == ["SparseAdam", "Adam"]


def test_mlp_output_width_and_sequence_inputs():
    mlp = MLP(6, (5, 4), "dice", out_dim=1)
    assert mlp(torch.randn(3, 6)).shape == (3, 1)
    assert mlp(torch.randn(3, 7, 6)).shape == (3, 7, 1)


def test_dice_uses_batch_statistics_in_training_only():
    dice = _trained_dice()
    x = torch.randn(16, 5)
    alone = torch.cat([dice(x[i:i + 1]) for i in range(16)])
    assert torch.allclose(dice(x), alone, atol=1e-6)  # eval: rows independent
    dice.train()
    shifted = dice(torch.cat([x, x + 10.0]))[:16]
    assert not torch.allclose(shifted, dice(x), atol=1e-3)  # training: batch stats matter
    assert torch.isfinite(dice(x[:1])).all()  # one training row does not crash


def test_dice_is_relu_like_with_zero_alpha_and_linear_for_large_inputs():
    dice = Dice(3).eval()  # running mean 0, var 1
    x = torch.tensor([[50.0, -50.0, 0.0]])
    assert torch.allclose(dice(x), torch.tensor([[50.0, 0.0, 0.0]]), atol=1e-6)


def test_dice_serving_path_follows_training_and_loaded_statistics():
    """Inference (no autograd) takes the in-place path with cached constants; it must equal
    the autograd path after the statistics move by training or by `load_state_dict`."""
    dice = _trained_dice()
    x = torch.randn(4, 7, 5) * 2
    with torch.inference_mode():
        served = dice(x)
    assert torch.allclose(served, dice(x).detach(), atol=1e-6)
    dice.train()
    dice(torch.randn(64, 5) * 5 - 2)  # running statistics move in place
    dice.eval()
    with torch.no_grad():
        dice.alpha.add_(0.3)
        moved = dice(x)
    assert not torch.allclose(moved, served, atol=1e-3)
    assert torch.allclose(moved, dice(x).detach(), atol=1e-6)
    with torch.inference_mode():  # a bundle loaded for serving: inference tensors
        loaded = Dice(5).eval()
        loaded.load_state_dict(dice.state_dict())
        assert torch.allclose(loaded(x), moved, atol=1e-6)


def _unit(softmax: bool = False, dim: int = 6) -> ActivationUnit:
    torch.manual_seed(1)
    unit = ActivationUnit(dim, (8, 4), "dice", softmax)
    unit.train()
    for _ in range(5):  # give Dice non-trivial running statistics
        unit(torch.randn(32, dim), torch.randn(32, 5, dim), torch.rand(32, 5) > 0.3)
    return unit.eval()


@pytest.mark.parametrize("softmax", [False, True])
def test_padded_positions_get_exactly_zero_weight(softmax):
    unit = _unit(softmax)
    keys = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    w = unit.weights(torch.randn(3, 6), keys, mask)
    assert torch.all(w[~mask] == 0)
    assert torch.all(w[mask] != 0)
    if softmax:
        assert torch.allclose(w.sum(-1), torch.ones(3))


@pytest.mark.parametrize("softmax", [False, True])
def test_empty_history_pools_to_finite_zeros(softmax):
    unit = _unit(softmax)
    mask = torch.tensor([[False] * 5, [True] * 5])
    pooled = unit(torch.randn(2, 6), torch.randn(2, 5, 6), mask)
    assert torch.isfinite(pooled).all()
    assert torch.count_nonzero(pooled[0]) == 0
    all_empty = unit(torch.randn(2, 6), torch.randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.count_nonzero(all_empty) == 0
    cand = unit.pool_candidates(torch.randn(4, 6), torch.randn(5, 6), torch.zeros(5, dtype=bool))
    assert cand.shape == (4, 6) and torch.count_nonzero(cand) == 0


def test_pooling_ignores_whatever_sits_in_padded_keys():
    unit = _unit()
    query, keys = torch.randn(2, 6), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = keys.clone()
    noisy[~mask] = 100.0
    assert torch.allclose(unit(query, keys, mask), unit(query, noisy, mask))
    longer = torch.cat([keys, torch.randn(2, 4, 6)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    assert torch.allclose(unit(query, keys, mask), unit(query, longer, longer_mask), atol=1e-6)


@pytest.mark.parametrize("softmax", [False, True])
def test_decomposed_pooling_equals_undecomposed(softmax):
    unit = _unit(softmax)
    cand, hist = torch.randn(7, 6), torch.randn(5, 6)
    mask = torch.tensor([True, True, False, True, False])
    fast = unit.pool_candidates(cand, hist, mask)
    slow = unit(cand, hist.unsqueeze(0).expand(7, 5, 6), mask.unsqueeze(0).expand(7, 5))
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_mba_l2_touches_only_present_rows_scaled_by_frequency():
    schema = tiny_schema()
    emb = EmbeddingCollection(schema)
    batch = random_batch(schema, size=4, length=3)
    batch["ad_id"] = torch.tensor([5, 5, 9, 9])
    batch["hist_ad_id"] = torch.tensor([[5, 0, 0], [7, 0, 0], [0, 0, 0], [0, 0, 0]])
    lam = 0.1
    emb.mba_l2(batch, lam).backward()
    grad = emb.tables["ad_id"].weight.grad
    weight = emb.tables["ad_id"].weight.detach()
    present = {5: 3, 9: 2, 7: 1}  # ad_id and hist_ad_id share the table: counts add up
    for row, count in present.items():
        assert torch.allclose(grad[row], 2 * lam * weight[row] / count)
    absent = [r for r in range(grad.shape[0]) if r not in present]
    assert torch.count_nonzero(grad[absent]) == 0  # includes the padding row 0


def test_mba_l2_keeps_gradients_sparse_for_sparse_tables():
    schema = tiny_schema()
    emb = EmbeddingCollection(schema, sparse=True)
    emb.mba_l2(random_batch(schema), 1e-3).backward()
    assert emb.tables["ad_id"].weight.grad.is_sparse
