"""lm_head's int8 rows: ranked by how much their rounding moves the next-token distribution."""

import numpy as np
import pytest
import torch

from edge.graph.plan import WeightPlan
from edge.quantize import head_rows
from edge.quantize.blockwise import QuantSpec, quantize
from edge.sources import open_source

INT4 = QuantSpec(4, 32, symmetric=False)
INT8 = QuantSpec(8, 32, symmetric=True)


def _kl_with_int8_rows(hidden, head, ids):
    deq = quantize(head.numpy(), INT4).dequantize()
    deq[ids] = quantize(head.numpy()[ids], INT8).dequantize()
    ref = torch.log_softmax(hidden @ head.T, -1)
    art = torch.log_softmax(hidden @ torch.from_numpy(deq).T, -1)
    return float((ref.exp() * (ref - art)).sum(-1).mean())


def test_ranked_int8_rows_move_the_distribution_less_than_the_first_rows():
    # the likely tokens sit at high ids, as most Chinese tokens do in Qwen's vocabulary
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(2000, 64, generator=gen)
    likely = torch.arange(1500, 1600)
    hidden = 3 * head[likely[torch.randint(0, 100, (256,), generator=gen)]] + torch.randn(256, 64, generator=gen)
    order = np.argsort(-head_rows.importance(hidden, head, INT4).numpy(), kind="stable")
    ranked = np.sort(order[:100])
    assert len(set(ranked) & set(likely.tolist())) > 80
    assert _kl_with_int8_rows(hidden, head, ranked) < 0.5 * _kl_with_int8_rows(hidden, head, np.arange(100))


def test_ranking_is_a_permutation_per_storage_and_read_back_from_the_cache(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path))
    source = open_source(str(tiny_model("qwen2", False)))
    storages = [INT4, QuantSpec(4, 128, symmetric=False)]
    orders = head_rows.ranking(source, storages)
    for order in orders:
        assert sorted(order.tolist()) == list(range(source.config.vocab_size))
    assert len(list((tmp_path / "head_rows").glob("*.npy"))) == 2

    def no_forward(*args):
        raise AssertionError("the ranking was measured again")

    monkeypatch.setattr(head_rows, "final_hidden", no_forward)
    again = head_rows.ranking(source, storages[::-1])
    np.testing.assert_array_equal(again[1], orders[0])
    plan = head_rows.with_int8_ids(source, WeightPlan("fp32", "fp32", INT4, lm_head_int8_rows=50))
    assert plan.lm_head_int8_ids == tuple(sorted(orders[0][:50].tolist()))
    with pytest.raises(AssertionError, match="measured again"):  # another token count is another ranking
        head_rows.ranking(source, [INT4], tokens=1024)


def test_a_damaged_cached_ranking_is_measured_again(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path))
    source = open_source(str(tiny_model("qwen2", False)))
    (order,) = head_rows.ranking(source, [INT4])
    (path,) = (tmp_path / "head_rows").glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    np.testing.assert_array_equal(head_rows.ranking(source, [INT4])[0], order)
    np.save(path, np.zeros_like(order))  # the right shape, not a ranking
    np.testing.assert_array_equal(head_rows.ranking(source, [INT4])[0], order)
