"""Fidelity metrics on hand-made logits, threshold checks, the shipped texts, and the ONNX/transformers
plumbing on a zero-layer Qwen2 whose ONNX twin is written here by hand."""

import math

import numpy as np
import pytest

from edge.check.fidelity import (
    FidelityError,
    check_threshold,
    compare,
    evaluate,
    greedy_match,
    load_chat_prompts,
    load_eval_texts,
)
from edge.recipe import FidelityThreshold, load_profile
from qwen_edge.errors import QwenEdgeError


def test_identical_logits_agree_fully():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 50)).astype(np.float32)
    tokens = list(rng.integers(0, 50, size=9))
    m = compare(logits, logits.copy(), tokens)
    assert m["top1_agreement"] == 1.0
    assert abs(m["mean_kl"]) < 1e-12
    assert m["ppl_reference"] == pytest.approx(m["ppl_artifact"])


def test_two_class_kl_has_the_closed_form_value():
    ref = np.zeros((3, 2), dtype=np.float32)  # p = (0.5, 0.5)
    art = np.tile(np.log([0.9, 0.1]), (3, 1)).astype(np.float32)  # q = (0.9, 0.1)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    m = compare(ref, art, [0, 1, 0])
    assert m["mean_kl"] == pytest.approx(expected, rel=1e-6)
    # next tokens 1, 0: the artifact gives them 0.1 and 0.9
    assert m["ppl_artifact"] == pytest.approx(math.exp(-(math.log(0.1) + math.log(0.9)) / 2), rel=1e-6)


def test_uniform_perplexity_is_the_vocabulary_size():
    vocab = 37
    m = compare(np.zeros((6, vocab)), np.zeros((6, vocab)), [3, 1, 4, 1, 5, 9])
    assert m["ppl_reference"] == pytest.approx(vocab)
    assert m["ppl_artifact"] == pytest.approx(vocab)


def test_top1_counts_disagreeing_positions_and_shapes_must_match():
    ref = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    art = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    assert compare(ref, art, [0, 0, 1, 1])["top1_agreement"] == 0.5
    with pytest.raises(FidelityError, match="shapes differ"):
        compare(ref, art[:3], [0, 0, 1, 1])


def test_threshold_failure_names_the_miss():
    profile = load_profile("cpu-x86_64").model_copy(
        update={"fidelity_threshold": FidelityThreshold(min_top1=0.9, max_kl=0.1)}
    )
    check_threshold({"overall": {"top1_agreement": 0.95, "mean_kl": 0.05}}, profile)
    with pytest.raises(QwenEdgeError, match=r"top-1 agreement 0\.850 < 0\.9") as info:
        check_threshold({"overall": {"top1_agreement": 0.85, "mean_kl": 0.05}}, profile)
    assert "mean KL" not in str(info.value)
    with pytest.raises(QwenEdgeError, match=r"mean KL 0\.200 > 0\.1"):
        check_threshold({"top1_agreement": 0.99, "mean_kl": 0.2}, profile)
    check_threshold({"top1_agreement": 0.0, "mean_kl": 9.0}, profile.model_copy(update={"fidelity_threshold": None}))


def test_shipped_texts_and_prompts():
    texts = load_eval_texts()
    assert set(texts) == {"english", "python", "chinese", "french"}
    assert all(len(t) > 250 for t in texts.values())
    assert "def " in texts["python"] and "的" in texts["chinese"] and " le " in texts["french"]
    prompts = load_chat_prompts()
    assert len(prompts) == 6 and len({p["id"] for p in prompts}) == 6
    assert {p["language"] for p in prompts} >= {"en", "zh", "fr"}
    for p in prompts:
        assert p["messages"][-1]["role"] == "user"


# --- plumbing on a real (tiny, zero-layer) transformers Qwen2 and its hand-written ONNX twin ---

VOCAB, HIDDEN, KV_HEADS, HEAD_DIM = 48, 16, 1, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=0,
        num_attention_heads=2,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    emb = model.model.embed_tokens.weight.detach().numpy()
    norm = model.model.norm.weight.detach().numpy()
    head = model.lm_head.weight.detach().numpy().T.copy()

    past = [f"past_key_values.0.{k}" for k in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]) for n in past),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n", VOCAB]),
        *(
            helper.make_tensor_value_info(f"present.0.{k}", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_DIM])
            for k in ("key", "value")
        ),
    ]
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(norm, "norm_w"),
        numpy_helper.from_array(head, "head"),
        numpy_helper.from_array(np.float32(cfg.rms_norm_eps), "eps"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
        numpy_helper.from_array(np.int64(0), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_seq"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "end"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("Mul", ["x", "x"], ["x2"]),
        helper.make_node("ReduceMean", ["x2", "axis_last"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["xn"]),
        helper.make_node("Mul", ["xn", "norm_w"], ["h"]),
        helper.make_node("Greater", ["num_logits_to_keep", "zero"], ["keep_some"]),
        helper.make_node("Neg", ["num_logits_to_keep"], ["neg_keep"]),
        helper.make_node("Where", ["keep_some", "neg_keep", "zero"], ["start"]),
        helper.make_node("Unsqueeze", ["start", "axes0"], ["starts"]),
        helper.make_node("Slice", ["h", "starts", "end", "axis_seq"], ["h_kept"]),
        helper.make_node("MatMul", ["h_kept", "head"], ["logits"]),
        helper.make_node("Identity", [past[0]], ["present.0.key"]),
        helper.make_node("Identity", [past[1]], ["present.0.value"]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    onnx.checker.check_model(proto)
    art = tmp_path_factory.mktemp("artifact")
    onnx.save(proto, str(art / "model.onnx"))

    class Tok:
        """Characters as token ids, enough for the plumbing."""

        def encode(self, text):
            return [3 + (ord(c) % (VOCAB - 3)) for c in text]

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "".join(m["content"] for m in messages) + ("|" if add_generation_prompt else "")

    return model, art, Tok()


def twin_logits(art):
    """Logits at every position of the hand-written twin graph (zero-length past, keep all)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(art / "model.onnx"))
    empty = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)

    def logits(ids):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "past_key_values.0.key": empty,
            "past_key_values.0.value": empty,
            "num_logits_to_keep": np.array(0, np.int64),
        }
        return session.run(["logits"], feeds)[0][0]

    return logits


def test_evaluate_and_greedy_match_on_twin_models(tiny):
    model, art, tok = tiny
    logits = twin_logits(art)
    texts = {"a": "hello world, again", "b": "def f(x): return x"}
    result = evaluate(logits, model, tok, texts, max_tokens=20)
    assert set(result["languages"]) == {"a", "b"}
    assert result["languages"]["a"]["tokens"] == 10
    assert result["overall"]["tokens"] == 20
    assert result["overall"]["top1_agreement"] == 1.0
    assert result["overall"]["mean_kl"] < 1e-6
    prompts = [{"id": "p", "messages": [{"role": "user", "content": "abc"}]}]
    match = greedy_match(logits, model, tok, prompts, n_tokens=6)
    assert match["prompts"]["p"]["matched"] == match["prompts"]["p"]["reference_tokens"] > 0
    assert match["match_rate"] == 1.0
