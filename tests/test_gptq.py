"""GPTQ: the torch layer forward against transformers, the blob layout, the error it removes, and
the built artifact against transformers running exactly the calibrated (dequantized) weights."""

import numpy as np
import pytest
import torch
from test_graph_parity import (
    IDS,
    PREFILL,
    _dequantize_like_the_graph,
    _lm_head_like_the_graph,
    build_tiny,
    cached_steps,
    prefill_all,
    session,
)
from transformers import AutoModelForCausalLM

from edge.config import QwenConfig
from edge.graph.plan import weight_plan
from edge.quantize import gptq, head_rows
from edge.quantize.blockwise import QuantSpec, quantize, unpack
from edge.recipe import DEFAULT_INT8_LAYERS, Precision
from edge.sources import open_source
from qwen_edge.errors import QwenEdgeError

TOKENS, SEQ_LEN = 512, 128


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_layer_forward_matches_transformers(tiny_model, family, tied):
    path = tiny_model(family, tied)
    source = open_source(str(path))
    cfg = source.config
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 40)))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        cos, sin = gptq.rotary(cfg, ids.shape[1])
        x = gptq.embed(source, weight_plan(Precision(weights="fp32"), cfg), ids)
        np.testing.assert_array_equal(x.numpy(), states[0].numpy())
        for i in range(cfg.num_layers):
            x = gptq.layer_forward(x, gptq.layer_weights(source, cfg, i), cfg, cos, sin)
            expected = states[i + 1]
            if i + 1 == cfg.num_layers:  # transformers' last hidden state is after the final norm
                x = model.model.norm(x)
            np.testing.assert_allclose(x.numpy(), expected.numpy(), atol=2e-5, rtol=1e-5)


def _layer0_inputs(source, plan):
    """Layer 0's weights and the inputs of its qkv and gate_up groups on the calibration text."""
    cfg = source.config
    ids = gptq.calibration_ids(source, TOKENS, SEQ_LEN)
    w = gptq.layer_weights(source, cfg, 0)
    seen = {}

    def record(group, inputs):
        seen[group] = inputs.reshape(-1, inputs.shape[-1])
        return w[group]

    with torch.no_grad():
        gptq.layer_forward(gptq.embed(source, plan, ids), w, cfg, *gptq.rotary(cfg, SEQ_LEN), record)
    return w, seen


SPECS = [QuantSpec(4, 32, False), QuantSpec(4, 32, True), QuantSpec(4, 128, False), QuantSpec(8, 32, False)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.block_size}-{'sym' if s.symmetric else 'asym'}")
def test_gptq_reconstructs_outputs_better_than_rtn_on_the_same_grid(tiny_model, spec):
    source = open_source(str(tiny_model("qwen2", False)))
    w, seen = _layer0_inputs(source, weight_plan(Precision(weights="fp32"), source.config))
    for group in ("qkv", "gate_up", "down"):
        x, weight = seen[group], w[group]
        h = gptq.hessian(x)
        # With no input correlation (identity Hessian) nothing is compensated: plain rounding on the grid,
        # which for asymmetric blocks with full ranges (shrink 0) is what the rtn quantizer writes (but for
        # rare float ties).
        plain = gptq.gptq(weight, torch.eye(weight.shape[1]), spec, shrink=0)
        if not spec.symmetric:
            rtn = quantize(weight.numpy(), spec)
            levels = unpack(plain.packed, spec.bits).astype(int) - unpack(rtn.packed, spec.bits)
            assert np.abs(levels).max() <= 1 and np.count_nonzero(levels) <= levels.size * 1e-3
            np.testing.assert_array_equal(plain.zero_points, rtn.zero_points)
            np.testing.assert_allclose(plain.scales, rtn.scales, rtol=1e-6)
        calibrated = gptq.gptq(weight, h, spec)

        def error(b):
            return float(torch.linalg.norm(x @ weight.T - x @ torch.from_numpy(b.dequantize()).T))

        assert error(calibrated) < 0.85 * error(plain), (group, error(calibrated), error(plain))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.block_size}-{'sym' if s.symmetric else 'asym'}")
def test_clipped_block_ranges_round_with_less_error(spec):
    # Heavy-tailed rows, as in real weights: a few outliers stretch the full range of most blocks.
    weight = torch.from_numpy(np.random.default_rng(5).standard_t(3, (64, 256)).astype(np.float32))
    eye = torch.eye(weight.shape[1])
    full, clipped = (gptq.gptq(weight, eye, spec, shrink=s) for s in (0, gptq.SHRINK))

    def block_error(b):  # squared rounding error per (row, block)
        diff = (torch.from_numpy(b.dequantize()) - weight).reshape(weight.shape[0], -1, spec.block_size)
        return diff.square().sum(-1)

    assert (block_error(clipped) <= block_error(full) * (1 + 1e-5) + 1e-9).all()  # each block keeps its best range
    if spec.bits == 4:  # with 256 levels an outlier costs little, so int8 rarely gains
        assert block_error(clipped).sum() < 0.97 * block_error(full).sum()
    assert (torch.from_numpy(clipped.scales) <= torch.from_numpy(full.scales) * (1 + 1e-6)).all()  # only narrower


def _plan(cfg, **precision):
    return weight_plan(Precision(**precision), cfg)


@pytest.mark.parametrize(
    "precision",
    [
        dict(weights="int4", method="gptq", symmetric=False, block_size=32, int8_layers=DEFAULT_INT8_LAYERS),
        dict(weights="int4", method="gptq", symmetric=True, block_size=64),
        dict(weights="int8", method="gptq", symmetric=False, block_size=128),
    ],
    ids=["int4-asym-mixed", "int4-sym", "int8-asym"],
)
def test_calibrated_blobs_have_the_graph_layout(tiny_model, tmp_path, precision):
    source = open_source(str(tiny_model("qwen3", True)))
    cfg = source.config
    plan = _plan(cfg, **precision)
    result = gptq.calibrate(source, plan, tmp_path / "spill", tokens=TOKENS, seq_len=SEQ_LEN)
    for i in range(cfg.num_layers):
        for suffix, parts in gptq.GROUPS.values():
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            spec = plan.for_linear(names)
            got = result(f"model.layers.{i}.{suffix}")
            want = quantize(np.concatenate([source.tensor(n) for n in names]), spec)
            assert (got.bits, got.block_size, got.n, got.k) == (want.bits, want.block_size, want.n, want.k)
            for a, b in ((got.packed, want.packed), (got.scales, want.scales), (got.zero_points, want.zero_points)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert result("lm_head") is None and result("model.embed_tokens") is None
    result.close()
    assert not (tmp_path / "spill").exists()


@pytest.mark.parametrize(
    "family,tied,lm_head,calibrated",
    [("qwen2", False, "int4", True), ("qwen3", True, "int8", True), ("qwen3", True, "same", False)],
)
def test_lm_head_is_calibrated_unless_it_shares_the_embedding_blobs(
    tiny_model, tmp_path, family, tied, lm_head, calibrated
):
    source = open_source(str(tiny_model(family, tied)))
    plan = _plan(source.config, weights="int4", method="gptq", lm_head=lm_head)
    result = gptq.calibrate(source, plan, tmp_path / "spill", tokens=TOKENS, seq_len=SEQ_LEN, lm_head=True)
    got = result("lm_head")
    assert (got is not None) == calibrated
    if calibrated:
        want = quantize(source.tensor("lm_head.weight" if not tied else "model.embed_tokens.weight"), plan.lm_head)
        assert (got.packed.shape, got.scales.shape, got.zero_points.shape) == (
            want.packed.shape,
            want.scales.shape,
            want.zero_points.shape,
        )
    result.close()


def _gptq_reference(model_dir, tmp_path, precision: dict):
    """transformers logits with every linear and lm_head replaced by the calibrated blobs (embedding by rtn)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = open_source(str(model_dir))
    _dequantize_like_the_graph(model, Precision(**precision), source)
    cfg = QwenConfig.from_hf(model.config.to_dict())
    result = gptq.calibrate(
        source,
        weight_plan(Precision(**precision), cfg),
        tmp_path / "ref-spill",
        tokens=precision["calibration_tokens"],
        lm_head=True,
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        head = result("lm_head")
        if head is not None:  # the build calibrates lm_head when it has its own blobs
            name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            plan = head_rows.with_int8_ids(source, weight_plan(Precision(**precision), cfg))
            deq = _lm_head_like_the_graph(source.tensor(name), plan, head)
            model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(deq))
        for i in range(cfg.num_layers):
            for suffix, parts in gptq.GROUPS.values():
                deq = torch.from_numpy(result(f"model.layers.{i}.{suffix}").dequantize())
                for part, rows in zip(
                    parts, deq.split([params[f"model.layers.{i}.{p}.weight"].shape[0] for p in parts])
                ):
                    params[f"model.layers.{i}.{part}.weight"].copy_(rows)
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    result.close()
    return logits


@pytest.mark.parametrize(
    "family,tied,precision",
    [
        (
            "qwen2",
            False,
            dict(weights="int4", method="gptq", block_size=32, lm_head="int8", int8_layers=DEFAULT_INT8_LAYERS),
        ),
        ("qwen3", True, dict(weights="int4", method="gptq", symmetric=True, block_size=32)),
        ("qwen3", True, dict(weights="int4", method="gptq", block_size=32, lm_head="int8")),
        ("qwen3", True, dict(weights="int4", method="gptq", block_size=32, lm_head_int8_rows=100)),
    ],
    ids=["qwen2-mixed", "qwen3-sym", "qwen3-tied-head8", "qwen3-tied-int8-rows"],
)
def test_gptq_artifact_computes_the_calibrated_model(tiny_model, tmp_path, family, tied, precision):
    precision = {**precision, "calibration_tokens": 1024}
    art = build_tiny(tiny_model, tmp_path, family, tied, accuracy_level=0, **precision)
    assert not any(p.name.startswith(".") for p in art.iterdir())  # the spilled blobs are gone
    ref = _gptq_reference(tiny_model(family, tied), tmp_path, precision)
    sess = session(art)
    np.testing.assert_allclose(prefill_all(sess, IDS), ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(cached_steps(sess, IDS, PREFILL), ref[PREFILL - 1 :], atol=2e-4, rtol=0)
    # and it differs from plain rtn: the calibration did something
    rtn = {k: v for k, v in precision.items() if k not in ("method", "int8_layers", "calibration_tokens")}
    rtn_art = build_tiny(
        tiny_model,
        tmp_path / "rtn",
        family,
        tied,
        accuracy_level=0,
        method="mixed" if "int8_layers" in precision else "rtn",
        **rtn,
    )
    assert np.abs(prefill_all(session(rtn_art), IDS) - ref).max() > 1e-3


def test_gptq_precision_options():
    assert Precision(method="gptq").bits_for("model.layers.0.mlp.down_proj.weight") == "int4"
    mixed = Precision(method="gptq", int8_layers=DEFAULT_INT8_LAYERS)
    assert mixed.bits_for("model.layers.0.mlp.down_proj.weight") == "int8"
    for bad, words in (
        (dict(method="rtn", calibration_tokens=512), "calibration_tokens"),
        (dict(method="gptq", weights="fp16"), "gptq"),
        (dict(method="gptq", weights="int8", int8_layers=("*",)), "int8_layers"),
    ):
        with pytest.raises(ValueError, match=words):
            Precision(**bad)


def test_too_little_calibration_text_is_a_clear_error(tiny_model):
    source = open_source(str(tiny_model("qwen2", False)))
    with pytest.raises(QwenEdgeError, match="calibration text has"):
        gptq.calibration_ids(source, 4096, 512, text="too short")
