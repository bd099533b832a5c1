"""Rules every command follows, checked over all of them at once."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from conftest import FIXTURES, run_cli
from flowscan.cli import main

COMMANDS = sorted(main.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_quiet_verbose_and_help_on_every_option(name):
    command = main.commands[name]
    options = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
    assert {"-q", "--quiet", "-v", "--verbose"} <= options
    missing = [p.opts[-1] for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"{name}: options without help text: {missing}"
    assert command.help
    assert run_cli(name, "--help").output.startswith(f"Usage: main {name}")


@pytest.mark.parametrize("name", COMMANDS)
def test_device_defaults_to_auto_wherever_there_is_one(name):
    for p in main.commands[name].params:
        if p.name == "device":
            assert p.default == "auto"


@pytest.mark.parametrize("name", COMMANDS)
def test_output_folder_is_spelt_the_same_everywhere(name):
    outputs = [p for p in main.commands[name].params if isinstance(p, click.Option) and "--output" in p.opts]
    for p in outputs:
        assert p.opts == ["-o", "--output"]


@pytest.mark.parametrize("args", [
    ("inspect", FIXTURES / "closed-form" / "safetensors"),
    ("analyze", FIXTURES / "closed-form" / "safetensors"),
    ("formats",),
])
def test_json_output_is_valid_json_on_stdout(tmp_path, args):
    extra = ("-o", tmp_path / "out") if args[0] == "analyze" else ()
    result = subprocess.run([sys.executable, "-m", "flowscan", *map(str, args), *map(str, extra), "--json"],
                            capture_output=True, text=True, check=True)
    data = json.loads(result.stdout)
    assert data
    if args[0] == "analyze":
        assert data[0]["blocks"][0]["sigma_mean"] == pytest.approx(0.5)
        assert "wrote" in result.stderr and "wrote" not in result.stdout


def test_fit_and_compare_json(tmp_path):
    out = tmp_path / "out"
    run_cli("analyze", FIXTURES / "closed-form", "-o", out, "-q")
    compare = subprocess.run([sys.executable, "-m", "flowscan", "compare", str(out), "--json"],
                             capture_output=True, text=True, check=True)
    data = json.loads(compare.stdout)
    assert set(data) == {"classes", "pairs", "tree"} and data["pairs"]
    fit = subprocess.run([sys.executable, "-m", "flowscan", "fit", str(FIXTURES / "open_lth"), "--json"],
                         capture_output=True, text=True)
    assert fit.returncode != 0 and "Traceback" not in fit.stderr   # not an analysis folder: a clear error


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, monkeypatch):
    from flowscan import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "analyze_runs", interrupted)
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "out", expect=130)
    assert "interrupted; run the same command again" in result.output


def test_progress_off_a_terminal_is_whole_log_lines(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flowscan", "analyze", str(FIXTURES / "closed-form"),
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, check=True)
    lines = [line for line in result.stderr.splitlines() if "reading rounds" in line]
    assert lines and all(line.startswith("flowscan: reading rounds: ") for line in lines)
    assert lines[-1].endswith("20/20")


def test_verbose_adds_detail_and_quiet_removes_notes(tmp_path):
    loud = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "a", "-v")
    assert "flowscan: 1 run(s), 5 round(s)" in loud.output
    quiet = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "b", "-q")
    assert not [line for line in quiet.output.splitlines() if line.startswith("flowscan:")]


def test_the_scanner_needs_neither_torch_nor_scikit_learn(tmp_path):
    # stand-in packages that fail to import shadow the installed ones
    for name in ("torch", "sklearn"):
        (tmp_path / "fake" / name).mkdir(parents=True)
        (tmp_path / "fake" / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    code = f"from flowscan.cli import main; main(['analyze', {str(FIXTURES / 'closed-form')!r}, '-o', " \
           f"{str(tmp_path / 'out')!r}, '-q'])"
    import os
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")})
    assert (tmp_path / "out" / "eigen.parquet").is_file()
