"""`qwen-edge` end to end through main(argv): run, chat, inspect, bench, errors, build-side dispatch."""

import io
import json
import sys

import pytest

from qwen_edge import cli
from qwen_edge.artifact import Artifact
from qwen_edge.chat import ChatSession
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return str(tiny_artifact("qwen3", tied=True, weights="int4"))


def test_run_streams_the_chat_reply(artifact, capsys):
    assert cli.main(["run", artifact, "Hello there", "--max-new-tokens", "10", "--no-think"]) == 0
    out, err = capsys.readouterr()
    expected = "".join(
        ChatSession(Generator(Artifact.open(artifact)), enable_thinking=False).send(
            "Hello there", SamplingParams(), 10
        )
    )
    assert out == expected + "\n"
    assert "ttft" in err and "decode" in err and "tok/s" in err


def test_run_raw_completion_with_sampling_flags(artifact, capsys):
    argv = [
        "run",
        artifact,
        "def f(x):",
        "--no-chat-template",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "3",
        "--verify",
        "size",
        "--max-length",
        "64",
    ]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first


def test_run_reads_the_prompt_from_stdin(artifact, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there"))
    assert cli.main(["run", artifact, "-", "--max-new-tokens", "10", "--no-think"]) == 0
    from_stdin = capsys.readouterr().out
    assert cli.main(["run", artifact, "Hello there", "--max-new-tokens", "10", "--no-think"]) == 0
    assert capsys.readouterr().out == from_stdin


def test_chat_is_multi_turn_with_reset_and_exit(artifact, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n/reset\n\nHello\n/exit\nnever read\n"))
    assert cli.main(["chat", artifact, "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    first = "".join(
        ChatSession(Generator(Artifact.open(artifact)), system="Be brief.").send("Hello", max_new_tokens=6)
    )
    # a random model's reply may hold newlines: find the first reply at both ends, not by splitting lines
    assert out.startswith(first + "\n") and out.endswith("\n" + first + "\n") and len(out) > 2 * len(first) + 2
    assert "conversation cleared" in err


def test_chat_reports_a_full_context_and_goes_on(artifact, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 40 + "\n/reset\nHi\n"))
    assert cli.main(["chat", artifact, "--max-new-tokens", "4", "--max-length", "40"]) == 0
    out, err = capsys.readouterr()
    assert "qwen-edge: error: the conversation has" in err and "use /reset" in err
    assert out.count("\n") == 1  # the reply to "Hi"


def test_chat_ends_at_end_of_input(artifact, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert cli.main(["chat", artifact, "--max-new-tokens", "4"]) == 0


def test_inspect_summarizes_the_manifest(artifact, capsys):
    assert cli.main(["inspect", artifact]) == 0
    out = capsys.readouterr().out
    assert "qwen3, 2 layers, 2 KV heads x 32, vocab 600, context 256" in out
    assert "model.onnx.data" in out and "tokenizer.json" in out and "sha256" in out
    for key in ("precision", "profile", "source"):
        assert f"\n{key}" in out
    assert cli.main(["inspect", artifact, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["family"] == "qwen3"


def test_bench_json(artifact, capsys):
    assert cli.main(["bench", artifact, "-p", "32", "-n", "8", "-r", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("ttft_ms", "prefill_tps", "decode_tps", "peak_rss_mb"):
        assert result[key] > 0
    assert result["prompt_tokens"] == 32 and result["new_tokens"] == 8 and result["repetitions"] == 2
    spread = result["spread"]["decode_tps"]
    assert spread["min"] <= result["decode_tps"] <= spread["max"]


def test_bench_table(artifact, capsys):
    assert cli.main(["bench", artifact, "-p", "16", "-n", "4", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "pp16" in out and "tg4" in out and "ttft" in out and "peak RSS" in out


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("qwen-edge: error: ") and err.count("\n") == 1
    return err


def test_errors_are_one_line_and_exit_2(artifact, capsys, tmp_path):
    assert cli.main(["run", str(tmp_path / "missing"), "hi"]) == 2
    assert "not an artifact directory" in one_line_error(capsys)
    assert cli.main(["bench", artifact, "-p", "300", "-n", "8"]) == 2
    assert "exceed the context of 256 tokens" in one_line_error(capsys)
    assert cli.main(["run", artifact, "hi", "--no-chat-template", "--system", "x"]) == 2
    assert "need the chat template" in one_line_error(capsys)
    assert cli.main(["run", artifact, "hi", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in one_line_error(capsys)
    assert cli.main(["run", artifact, "word " * 100, "--max-length", "32"]) == 2
    assert "context holds 32" in one_line_error(capsys)


def test_damaged_artifact_is_reported(artifact, capsys, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    assert cli.main(["run", str(copy), "hi"]) == 2
    assert "model.onnx.data does not match its sha256" in one_line_error(capsys)


def test_ctrl_c_exits_130(artifact, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Artifact, "open", interrupted)
    assert cli.main(["run", artifact, "hi"]) == 130


def test_build_side_commands_need_the_build_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "edge.commands", None)
    for argv in (["build", "some-recipe"], ["eval", "art"], ["recipes"], ["profiles"]):
        assert cli.main(argv) == 2
        assert "pip install 'qwen-edge[build]'" in one_line_error(capsys)


def test_build_side_commands_dispatch_to_edge(capsys, monkeypatch):
    import edge.commands

    seen = {}
    monkeypatch.setattr(edge.commands, "build", lambda args: seen.setdefault("build", args) and 0)
    monkeypatch.setattr(edge.commands, "evaluate", lambda args: seen.setdefault("eval", args) and 0)
    assert (
        cli.main(["build", "qwen2.5-coder-0.5b-int4", "--model", "m.gguf", "--out", "o", "--no-eval", "--quiet"]) == 0
    )
    b = seen["build"]
    assert (b.recipe, b.model, b.out, b.no_eval, b.quiet) == ("qwen2.5-coder-0.5b-int4", "m.gguf", "o", True, True)
    assert cli.main(["eval", "art", "--reference", "ref", "--json"]) == 0
    assert (seen["eval"].artifact, seen["eval"].reference, seen["eval"].json) == ("art", "ref", True)
    assert cli.main(["profiles"]) == 0
    assert "cpu-x86_64" in capsys.readouterr().out + capsys.readouterr().err


def test_build_dry_run_prints_the_plan_and_builds_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["build", "demo", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"]["name"] == "demo" and plan["profile"]["name"] == "cpu-x86_64"
    assert plan["backend"]["name"] == "native"
    assert not list(tmp_path.iterdir())
