"""edge.report: one Reporter carries a build's status lines, bars, warnings, stream and quiet mode."""

import io

import pytest

from edge import report
from edge.pipeline import build
from edge.recipe import Recipe
from qwen_edge import cli


def _recipe(model) -> Recipe:
    return Recipe(name="tiny", source=str(model), context_length=256, fidelity={"enabled": False})


def test_everything_a_build_prints_goes_to_the_reporters_stream(tiny_qwen2, tmp_path, capsys):
    stream = io.StringIO()
    with report.use(report.Reporter(stream=stream)):
        build(_recipe(tiny_qwen2), out=tmp_path / "art")
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    lines = stream.getvalue()
    assert "qwen-edge: opening " in lines and "qwen-edge: writing the tokenizer...\n" in lines
    assert "building tiny: qwen2 2 layers, int4 (rtn)" in lines and "export+quantize" in lines  # line and bar
    assert "qwen-edge: warning: cannot tell the licence" in lines


def test_a_quiet_reporter_prints_nothing_and_use_restores_the_outer_one(tiny_qwen2, tmp_path):
    outer, quiet = report.Reporter(stream=io.StringIO()), report.Reporter(quiet=True, stream=io.StringIO())
    with report.use(outer):
        with report.use(quiet):
            assert report.current() is quiet
            build(_recipe(tiny_qwen2), out=tmp_path / "art")
        assert report.current() is outer
        report.current().warning("w")
    assert quiet.stream.getvalue() == "" and outer.stream.getvalue() == "qwen-edge: warning: w\n"


@pytest.mark.parametrize("quiet", [True, False])
def test_build_command_quiet_prints_nothing_but_errors(tiny_qwen2, tmp_path, capsys, quiet):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny\nsource: {tiny_qwen2}\ncontext_length: 256\nfidelity: {{enabled: false}}\n")
    args = ["build", str(recipe), "--out", str(tmp_path / "art")] + (["--quiet"] if quiet else [])
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out == ""
    if quiet:
        assert err == ""
    else:
        assert "qwen-edge: opening " in err and f"built {tmp_path / 'art'} in " in err
        assert "fidelity: not checked" in err
    (tmp_path / "tiny-missing.yaml").write_text(f"name: tiny\nsource: {tmp_path / 'nowhere'}\n")
    assert cli.main(["build", str(tmp_path / "tiny-missing.yaml"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-edge: error: ") and err.count("\n") == 1
