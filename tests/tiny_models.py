"""Tiny random Qwen models, as Hugging Face directories and GGUF files, for the test suite.

Every model shares one tiny byte-level BPE tokenizer (about 600 tokens, trained on a short
English/code/Chinese/French text so that multi-byte characters take several tokens) and the
hyper-parameters of a real Qwen decoder shrunk down: hidden 128, 4 query heads and 2 KV heads of
32, MLP 256, 2 layers, rope theta 1e6, RMS eps 1e-6.

Weight scale. A model initialised at the transformers default (std 0.02) has almost flat logits:
the top two candidates differ by far less than int8 rounding noise, so top-1 comparisons would
measure noise. `randomize_weights` therefore draws every weight with a fixed seed at a scale that
keeps activations of order one through the network and makes the logits peaky:

- embeddings and lm_head: std 0.35, so the logits have a spread of a few units;
- linear layers: std 1/sqrt(fan_in) (0.088 for 128 inputs, 0.0625 for 256), so each sub-layer adds
  a contribution comparable to the residual stream instead of vanishing into it;
- attention biases (qwen2): std 0.1;
- RMSNorm weights (including Qwen3's q_norm/k_norm): uniform in [0.5, 1.5] instead of all ones, so
  a port that ignores or transposes a norm weight is caught.

It is still a random model (its text is gibberish) whose layers matter: untied, the argmax is almost
never the input token; tied, about 70% of the time. An fp32 port reproduces its argmax exactly, and
rounding every matrix to int8 per row (weight-only) kept top-1 agreement at 0.96-0.99 over 1024 random
positions for all four variants (measured when this scale was chosen).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FAMILIES = ("qwen2", "qwen3")

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # control tokens (skipped by skip_special_tokens)
PLAIN_ADDED_TOKENS = (THINK, END_THINK)  # matched whole but not special, as in Qwen3
TOKENIZER_VOCAB = 600

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Small language models run on phones, laptops and
single-board computers. Quantization turns 32-bit floating point weights into 4-bit or 8-bit integers.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i}: {fibonacci(i)}")

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
{"name": "qwen", "layers": 24, "heads": [14, 2], "ok": true}
int main(void) { printf("hello\\n"); return 0; }
你好，世界！今天天气很好。我们正在测试一个小型语言模型。量化可以让模型在手机上运行。
中文分词需要处理多字节字符，每个汉字在 UTF-8 中占三个字节。
Bonjour le monde ! Je m'appelle Qwen. Où est la bibliothèque ? Voilà, c'est très élégant.
Les modèles de langue s'exécutent hors ligne ; ça marche à la maison, déjà testé, naïf ou pas.
Emoji and symbols: 🙂 ✓ → € £ ± ≤ ≥ ∞ — “quotes” and ‘apostrophes’.
"""

QWEN25_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

CHAT_TEMPLATES = {"qwen2": QWEN25_CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE}
GENERATION_DEFAULTS = {
    "qwen2": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "qwen3": {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
}


def build_tokenizer():
    """The shared tiny byte-level BPE tokenizer (`tokenizers.Tokenizer`), built the Qwen2 way."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def _tokenizer_config(tok, family: str) -> dict:
    decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATES[family],
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def hf_config(family: str, tied: bool, vocab_size: int, eot: int, im_end: int):
    """A transformers Qwen2Config / Qwen3Config for the tiny shape."""
    from transformers import Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        use_sliding_window=False,
    )
    if family == "qwen2":
        return Qwen2Config(**common)
    return Qwen3Config(head_dim=32, attention_bias=False, **common)


def randomize_weights(model, seed: int) -> None:
    """Redraw every parameter at the scale described in the module docstring (fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(0.35 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def build_hf_model(out_dir: Path, family: str = "qwen2", tied: bool = False, seed: int = 0) -> Path:
    """Write a tiny random Qwen HF model directory (fp32 safetensors + tokenizer) into out_dir."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    eot, im_end = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)
    config = hf_config(family, tied, tok.get_vocab_size(with_added_tokens=True), eot, im_end)
    torch.manual_seed(seed)
    model = (Qwen2ForCausalLM if family == "qwen2" else Qwen3ForCausalLM)(config).to(torch.float32).eval()
    randomize_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(tok, family))
    generation = {"bos_token_id": eot, "pad_token_id": eot, "eos_token_id": [im_end, eot]}
    _write_json(out_dir / "generation_config.json", {**generation, **GENERATION_DEFAULTS[family]})
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# HF tensor-name suffix -> llama.cpp tensor-name suffix, per layer.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp name of a Hugging Face Qwen tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def quantize_q6_k(arr: np.ndarray) -> np.ndarray:
    """Rows of `arr` (length a multiple of 256) as GGUF Q6_K blocks (the gguf package only dequantizes Q6_K):
    per 16 values a scale d * sc (d float16 per 256, sc int8) and 6-bit q - 32."""
    x = arr.reshape(-1, 16, 16).astype(np.float32)  # super-blocks of 16 sub-blocks
    sub = np.abs(x).max(-1) / 31
    d = (sub.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.where(d > 0, np.round(sub / np.maximum(d.astype(np.float32), 1e-30)), 0).clip(-128, 127)
    scale = d.astype(np.float32) * sc
    q = np.where(scale[..., None] > 0, np.round(x / np.maximum(scale[..., None], 1e-30)), 0).clip(-32, 31)
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, group of 32, l]
    lo, hi = u & 0x0F, u >> 4
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=-1)
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), d.view(np.uint8)], axis=-1
    )
    return blocks.reshape(arr.shape[0], -1)


def write_gguf(hf_dir: Path, out_path: Path, qtype: str = "F32", matrix_types: dict[str, str] | None = None) -> Path:
    """Write a tiny HF model directory as a llama.cpp-style GGUF (matrices F32 or Q8_0, norms F32);
    `matrix_types` maps fnmatch patterns of HF names to the GGUF type of those matrices (Q4_0, Q5_0, Q5_1,
    Q8_0, Q6_K)."""
    import fnmatch

    import gguf
    from safetensors.numpy import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok_json = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    family = cfg["model_type"]
    arch = family

    vocab = dict(tok_json["model"]["vocab"])
    added = {t["content"]: t for t in tok_json["added_tokens"]}
    vocab.update({name: t["id"] for name, t in added.items()})
    tokens = [None] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    types = [
        (gguf.TokenType.CONTROL if added[t]["special"] else gguf.TokenType.USER_DEFINED)
        if t in added
        else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]

    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(f"tiny-{family}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if family == "qwen3":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(cfg.get("rope_theta", rope.get("rope_theta"))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])

    for name, arr in load_file(str(hf_dir / "model.safetensors")).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        chosen = [t for pattern, t in (matrix_types or {}).items() if fnmatch.fnmatchcase(name, pattern)]
        if chosen:
            kind = gguf.GGMLQuantizationType[chosen[0]]
            data = quantize_q6_k(arr) if chosen[0] == "Q6_K" else gguf.quants.quantize(arr, kind)
            w.add_tensor(gguf_tensor_name(name), data, raw_dtype=kind)
        elif qtype == "Q8_0" and arr.ndim == 2:
            w.add_tensor(
                gguf_tensor_name(name),
                gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(gguf_tensor_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
