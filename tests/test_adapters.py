"""PEFT LoRA adapters: merged and switchable artifacts against transformers + peft in fp32 (prefill and
cached decode, Qwen2 and Qwen3), switching in one session, bad adapters, CLI, server and bundles."""

import json
import shutil
import threading
import zipfile

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from edge.artifact.package import package  # noqa: E402
from edge.pipeline import build  # noqa: E402
from edge.recipe import Precision, Recipe  # noqa: E402
from edge.sources.adapter import AdapterError  # noqa: E402
from qwen_edge import cli  # noqa: E402
from qwen_edge.artifact import Artifact  # noqa: E402
from qwen_edge.chat import ChatSession  # noqa: E402
from qwen_edge.errors import ArtifactError, QwenEdgeError  # noqa: E402
from qwen_edge.generator import Generator  # noqa: E402
from qwen_edge.sampling import SamplingParams  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "one": every linear; "two": three of them in one layer, rsLoRA, a per-module rank; "tables": + embedding, lm_head
ADAPTERS = {
    "one": dict(r=4, lora_alpha=8, target_modules=ALL),
    "two": dict(
        r=2,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"down_proj": 3},
        layers_to_transform=[1],  # layer 0 keeps rank zero: the graph must let layers differ in rank
    ),
    "tables": dict(r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens", "lm_head"]),
}
IDS = [5, 17, 42, 99, 7, 130, 250, 11, 64, 3, 77, 200, 18, 9, 120, 33]
PREFILL = 10  # IDS[:PREFILL] as a prompt, the rest fed one token at a time (cached decode)
ATOL = 2e-4


def make_adapter(model_dir, out, seed: int, **config):
    """A random PEFT LoRA adapter (B not zero) saved the way PEFT saves it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # LoRA B scaled so the adapted logits differ clearly from the base ones
        for name, p in lora.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.5)
    lora.save_pretrained(out, save_embedding_layers=False)
    return out


def reference_logits(model_dir, adapter_dir=None) -> np.ndarray:
    """transformers (+ peft) fp32 logits at every position of IDS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def recipe(model_dir, mode=None, paths=None, **kw) -> Recipe:
    adapter = {"mode": mode, "paths": {k: str(v) for k, v in paths.items()}} if mode else None
    return Recipe(
        name="tiny",
        source=str(model_dir),
        context_length=256,
        precision=Precision(weights="fp32"),
        adapter=adapter,
        **{"fidelity": {"enabled": False}, **kw},
    )


@pytest.fixture(scope="module", params=[("qwen2", False), ("qwen3", True)], ids=["qwen2", "qwen3"])
def case(request, tiny_model, tmp_path_factory):
    """A tiny model, its adapters, their fp32 references, and its merged and switchable artifacts."""
    family, tied = request.param
    model_dir = tiny_model(family, tied)
    root = tmp_path_factory.mktemp(f"adapters-{family}")
    adapters = {
        name: make_adapter(model_dir, root / name, seed, **cfg)
        for seed, (name, cfg) in enumerate(ADAPTERS.items())
        if name != "tables" or not tied
    }
    refs = {None: reference_logits(model_dir), **{n: reference_logits(model_dir, p) for n, p in adapters.items()}}
    switchable = build(recipe(model_dir, "switchable", {n: adapters[n] for n in ("one", "two")}), out=root / "sw")
    return {"family": family, "dir": model_dir, "adapters": adapters, "refs": refs, "switchable": switchable.out_dir}


def check_logits(gen: Generator, ref: np.ndarray) -> None:
    """Prefill logits at every position, then cached decode one token at a time, against `ref`."""
    np.testing.assert_allclose(gen.logits(IDS), ref, atol=ATOL, rtol=0)
    gen.reset()
    rows = [gen.append(IDS[:PREFILL]).copy()]
    rows += [gen.append([t]).copy() for t in IDS[PREFILL:]]  # a view of the runner's logits buffer
    np.testing.assert_allclose(np.stack(rows), ref[PREFILL - 1 :], atol=ATOL, rtol=0)


def test_merged_matches_peft(case, tmp_path):
    out = build(recipe(case["dir"], "merged", {"one": case["adapters"]["one"]}), out=tmp_path / "merged")
    assert out.manifest["source"]["adapter"]["targets"] == sorted(ALL)
    assert np.abs(case["refs"]["one"] - case["refs"][None]).max() > 0.1  # the adapter changes the logits
    check_logits(Generator(Artifact.open(out.out_dir)), case["refs"]["one"])


def test_merged_embedding_and_lm_head(case, tmp_path):
    if "tables" not in case["adapters"]:
        with pytest.raises(AdapterError, match="tied to the embeddings"):
            bad = make_adapter(case["dir"], tmp_path / "tables", 5, **ADAPTERS["tables"])
            build(recipe(case["dir"], "merged", {"tables": bad}), out=tmp_path / "x")
        assert not (tmp_path / "x").exists()
        return
    out = build(recipe(case["dir"], "merged", {"t": case["adapters"]["tables"]}), out=tmp_path / "merged")
    check_logits(Generator(Artifact.open(out.out_dir)), case["refs"]["tables"])


def test_switchable_matches_peft_and_switches_in_one_session(case):
    gen = Generator(Artifact.open(case["switchable"]))
    for name in (None, "one", "two", None, "one"):
        gen.append(IDS[:4])
        gen.set_adapter(name)
        assert gen.adapter == name
        if name is not None:
            assert gen.position == 0  # the cache never carries over to another adapter
        check_logits(gen, case["refs"][name])


def test_switchable_graph_takes_lora_inputs_only_where_its_adapters_adapt(case, tmp_path):
    # adapter "two": q, v and down_proj of layer 1 only
    art = build(recipe(case["dir"], "switchable", {"two": case["adapters"]["two"]}), out=tmp_path / "sw").out_dir
    gen = Generator(Artifact.open(art))
    inputs = {i.name for i in gen.runner.session.get_overridable_initializers() if i.name.startswith("lora.")}
    assert inputs == {"lora.1.qkv_proj.a", "lora.1.qkv_proj.b", "lora.1.down_proj.a", "lora.1.down_proj.b"}
    gen.set_adapter("two")
    check_logits(gen, case["refs"]["two"])
    gen.set_adapter(None)
    check_logits(gen, case["refs"][None])


def test_switchable_manifest_checksums_adapter_files(case, tmp_path):
    manifest = Artifact.open(case["switchable"]).manifest
    assert set(manifest["adapters"]) == {"one", "two"}
    assert manifest["adapters"]["two"]["use_rslora"] and manifest["adapters"]["two"]["rank"] == [2, 3]
    assert {"adapters/one.npz", "adapters/two.npz"} <= set(manifest["files"])
    copy = shutil.copytree(case["switchable"], tmp_path / "copy")
    with np.load(copy / "adapters/one.npz") as npz:
        arrays = dict(npz)
    arrays[next(iter(arrays))][0, 0] += 1.0
    np.savez(copy / "adapters/one.npz", **arrays)
    with pytest.raises(ArtifactError, match="adapters/one.npz"):
        Artifact.open(copy, verify="full")


def test_chat_session_adapter_and_errors(case):
    gen = Generator(Artifact.open(case["switchable"]), max_length=128)
    with pytest.raises(QwenEdgeError, match="no adapter 'three'; its adapters: one, two"):
        ChatSession(gen, adapter="three")
    base, one = ChatSession(gen), ChatSession(gen, adapter="one")
    msgs = [{"role": "user", "content": "def f"}]
    replies = {}
    for session, key in ((one, "one"), (base, None), (one, "one2")):
        replies[key] = session.generate(session.prompt(msgs), SamplingParams(), 6).read()
        assert gen.adapter == session.adapter
    assert replies["one"] == replies["one2"]
    plain = Generator(Artifact.open(case["switchable"]), max_length=128)
    assert replies[None] == ChatSession(plain).generate(ChatSession(plain).prompt(msgs), SamplingParams(), 6).read()


def test_bad_adapters_fail_before_heavy_work(case, tmp_path):
    one = case["adapters"]["one"]
    dora = shutil.copytree(one, tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match=r"DoRA \(use_dora\) is not supported"):
        build(recipe(case["dir"], "merged", {"d": dora}), out=tmp_path / "x")
    rank = shutil.copytree(one, tmp_path / "rank")
    (rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(AdapterError, match="has rank 4 but adapter_config.json says 5"):
        build(recipe(case["dir"], "merged", {"r": rank}), out=tmp_path / "x")
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        (tmp_path / "empty").mkdir()
        shutil.copy(one / "adapter_config.json", tmp_path / "empty")
        build(recipe(case["dir"], "merged", {"e": tmp_path / "empty"}), out=tmp_path / "x")
    from edge.pipeline import _check_adapter_options  # the build's first check (after the backend's tools)
    from edge.recipe import load_profile

    with pytest.raises(QwenEdgeError, match="switchable adapters are inputs of qwen-edge's CPU graph"):
        _check_adapter_options(
            recipe(case["dir"], "switchable", {"one": one}, backend="optimum"), load_profile("cpu-x86_64")
        )
    with pytest.raises(ValueError, match="exactly one adapter"):
        recipe(case["dir"], "merged", {"a": one, "b": one})
    if "tables" in case["adapters"]:
        with pytest.raises(AdapterError, match="build it with adapter mode merged"):
            build(recipe(case["dir"], "switchable", {"t": case["adapters"]["tables"]}), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_run_with_adapter(case, tiny_artifact, capsys):
    art = str(case["switchable"])
    args = ["--max-new-tokens", "5", "--no-chat-template"]
    assert cli.main(["run", art, "def f", "--adapter", "two", *args]) == 0
    out = capsys.readouterr().out
    gen = Generator(Artifact.open(case["switchable"]))
    gen.set_adapter("two")
    assert out.startswith(gen.generate(gen.encode("def f", add_special_tokens=True), max_new_tokens=5).read())
    assert cli.main(["run", art, "def f", "--adapter", "nope", *args]) == 2
    assert "no adapter 'nope'; its adapters: one, two" in capsys.readouterr().err
    assert cli.main(["run", str(tiny_artifact(case["family"])), "def f", "--adapter", "one", *args]) == 2
    assert "takes no adapters; build it with adapter mode switchable" in capsys.readouterr().err


def test_server_lists_and_serves_adapter_models(case):
    openai = pytest.importorskip("openai")
    from qwen_edge.server import ChatServer, Engine

    srv = ChatServer(Engine(Generator(Artifact.open(case["switchable"]), max_length=128)), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny", "tiny:one", "tiny:two"]
        assert client.models.retrieve("tiny:two").id == "tiny:two"
        msgs = [{"role": "user", "content": "def f"}]
        replies = {}
        for model in ("tiny:one", "tiny", "tiny:one"):
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
            assert r.model == model
            replies.setdefault(model, []).append(r.choices[0].message.content)
        local = Generator(Artifact.open(case["switchable"]), max_length=128)
        chat = ChatSession(local, adapter="one")
        assert replies["tiny:one"] == [chat.generate(chat.prompt(msgs), SamplingParams(), 6).read()] * 2
        with pytest.raises(openai.NotFoundError, match="'tiny:three' does not exist"):
            client.chat.completions.create(model="tiny:three", messages=msgs, max_tokens=2)
    finally:
        srv.shutdown()
        srv.server_close()


def test_bundle_carries_adapters(case, tmp_path):
    bundle = package(case["switchable"], "desktop", tmp_path, license_id="Apache-2.0").path
    with zipfile.ZipFile(bundle) as zf:
        assert {"adapters/one.npz", "adapters/two.npz"} <= set(zf.namelist())
        zf.extractall(tmp_path / "unpacked")
    gen = Generator(Artifact.open(tmp_path / "unpacked", verify="full"))
    gen.set_adapter("two")
    np.testing.assert_allclose(gen.logits(IDS), case["refs"]["two"], atol=ATOL, rtol=0)


def test_build_fidelity_uses_the_adapted_reference(case, tmp_path, monkeypatch):
    if case["family"] != "qwen3":
        pytest.skip("one family suffices: the check is the same loop for both (and it is the slow part)")
    from edge.check import fidelity as fidelity_module

    prompts = fidelity_module.load_chat_prompts()[:1]  # greedy generation with peft is the slow part
    monkeypatch.setattr(fidelity_module, "load_chat_prompts", lambda: prompts)
    adapters = {n: case["adapters"][n] for n in ("one", "two")}
    r = recipe(case["dir"], "switchable", adapters, fidelity={"max_tokens": 32})
    fidelity = build(r, out=tmp_path / "sw").manifest["fidelity"]
    assert fidelity["overall"]["top1_agreement"] == 1.0
    for name in adapters:  # each adapter against transformers + peft with it active
        overall = fidelity["adapters"][name]["overall"]
        assert overall["top1_agreement"] == 1.0 and overall["mean_kl"] < 1e-6


@pytest.mark.real_model
def test_trained_adapter_teaches_the_demo_model_its_task(tmp_path):
    """A LoRA trained here with PEFT on the demo model's fp32 copy (tests/lora_task.py: reply with a
    fixed JSON shape) does the task in the merged and switchable int4 artifacts; the base does not."""
    from lora_task import HELD_OUT, follows_task, train_adapter

    from edge.recipe import AdapterOptions, load_recipe
    from edge.sources import open_source
    from edge.sources.base import write_hf_directory

    demo = load_recipe("demo")
    hf_dir = write_hf_directory(open_source(demo.resolve_source()), tmp_path / "demo-fp32")
    trained = train_adapter(hf_dir, tmp_path / "echo")
    assert trained["final_loss"] < 0.1, trained
    replies = {}
    for mode in ("merged", "switchable"):
        adapter = AdapterOptions(mode=mode, paths={"echo": str(tmp_path / "echo")})
        # the merged build's fidelity check runs against transformers + peft (the adapted reference)
        result = build(demo.model_copy(update={"adapter": adapter}), out=tmp_path / mode, evaluate=mode == "merged")
        gen = Generator(Artifact.open(result.out_dir), max_length=512)
        for adapter_name in (None, "echo") if mode == "switchable" else (None,):
            chat = ChatSession(gen, adapter=adapter_name)
            key = "base" if mode == "switchable" and adapter_name is None else mode
            replies[key] = [
                chat.generate(chat.prompt([{"role": "user", "content": m}]), max_new_tokens=64).read()
                for m in HELD_OUT
            ]
    print(json.dumps(replies, indent=1))
    for key in ("merged", "switchable"):
        assert all(follows_task(m, r) for m, r in zip(HELD_OUT, replies[key])), replies[key]
    assert not any(follows_task(m, r) for m, r in zip(HELD_OUT, replies["base"])), replies["base"]
