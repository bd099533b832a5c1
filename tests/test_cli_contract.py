"""The command line's contract, for every command: results on stdout (with -q too), notes and
`wrote` lines on stderr (none with -q), a missing optional package named with its `pip install`,
an unwritable -o refused before anything is read."""

from __future__ import annotations

import shutil
import sys

import polars as pl
import pytest

import flowscan
from conftest import FIXTURES, read_tables, run_cli

PRODUCE = ["--model", "mlp", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
           "--rounds", "3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny produced archive (2 seeds), analysed: every command has something to work on."""
    root = tmp_path_factory.mktemp("contract")
    run_cli("produce", *PRODUCE, "--seeds", "2", "-o", root / "ckpts", "-q")
    run_cli("analyze", root / "ckpts", "-o", root / "out", "-q")
    return root


def _commands(root):
    """Command -> (arguments, a piece of its results on stdout)."""
    ckpts, out = root / "ckpts", root / "out"
    return {
        "analyze": (["analyze", ckpts, "-o", out], "run seed_0"),
        "inspect": (["inspect", ckpts], "prunable tensors"),
        "formats": (["formats"], "block presets"),
        "aggregate": (["aggregate", out], "sigma (M) ± SEM"),
        "fit": (["fit", out, "--bootstrap", "0"], "gamma"),
        "compare": (["compare", out], "classes:"),
        "table": (["table", out], "seed_0"),
        "plot": (["plot", out], ""),
        "report": (["report", out], ""),
        "lmc": (["lmc", ckpts, "-o", out, "--points", "3", "--bn-batches", "1"], "barrier"),
        "sharpness": (["sharpness", ckpts, "-o", out, "--subset", "64", "--max-iter", "3"], "lambda_max"),
        "produce": (["produce", *PRODUCE, "--seeds", "1", "-o", root / "more"], ""),   # its rounds are progress
        "transfer": (["transfer", ckpts, "digits", "-o", root / "transfer", "--rounds", "1", "--seeds", "1",
                      "--epochs", "1"], ""),
    }


COMMANDS = ["analyze", "inspect", "formats", "aggregate", "fit", "compare", "table", "plot", "report", "lmc",
            "sharpness", "produce", "transfer"]


@pytest.mark.parametrize("command", COMMANDS)
def test_results_on_stdout_notes_on_stderr_and_quiet_keeps_only_results(made, command):
    args, piece = _commands(made)[command]
    loud = run_cli(*args)
    for made_here in ("more", "transfer"):   # produce and transfer would find their work done
        shutil.rmtree(made / made_here, ignore_errors=True)
    quiet = run_cli(*args, "-q")
    assert piece in loud.stdout and piece in quiet.stdout, (loud.stdout, quiet.stdout)
    for result in (loud, quiet):
        assert "wrote " not in result.stdout and "flowscan: " not in result.stdout
    assert "wrote " not in quiet.stderr and "flowscan: " not in quiet.stderr, quiet.stderr
    if command == "produce":
        assert quiet.stderr == "" and quiet.stdout == ""   # -q: no progress at all
    if command in ("analyze", "aggregate", "fit", "compare", "plot", "report", "lmc", "sharpness", "transfer"):
        assert "wrote " in loud.stderr, loud.stderr   # the files a command wrote are listed, unless -q
    if command == "produce":
        assert "done: " in loud.stderr   # produce names its archive instead
    progress = {"fit": "flowscan: fitting 1/", "lmc": "flowscan: seed_0: rounds 0->1",
                "sharpness": "flowscan: seed_0: round 0: lambda_max", "analyze": "flowscan: reading rounds",
                "produce": "seed 0 round  0: density"}
    if command in progress:   # long steps say how far they are, off a terminal too (CliRunner is none)
        assert progress[command] in loud.stderr, loud.stderr


NEEDS_TORCH = {
    "produce": ["produce", *PRODUCE, "-o", "{tmp}/o"],
    "lmc": ["lmc", str(FIXTURES / "closed-form" / "flowscan"), "-o", "{tmp}/o"],
    "sharpness": ["sharpness", str(FIXTURES / "closed-form" / "flowscan"), "-o", "{tmp}/o"],
    "transfer": ["transfer", str(FIXTURES / "closed-form" / "flowscan"), "digits", "-o", "{tmp}/o"],
}


@pytest.mark.parametrize("command", NEEDS_TORCH)
def test_a_missing_torch_is_named_with_the_install_line(tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now fails, as where it is not installed
    args = [a.replace("{tmp}", str(tmp_path)) for a in NEEDS_TORCH[command]]
    result = run_cli(*args, expect=1)
    assert f"flowscan {command} needs torch: pip install 'flowscan[produce]'" in result.output
    assert "Traceback" not in result.output and "ModuleNotFoundError" not in result.output


READER_EXTRAS = {
    "h5py": (FIXTURES / "keras" / "closed-form-h5", "flowscan[keras]"),
    "msgpack": (FIXTURES / "flax" / "closed-form", "flowscan[flax]"),
    "tensorstore": (FIXTURES / "orbax" / "closed-form", "flowscan[orbax]"),
}


@pytest.mark.parametrize("module", READER_EXTRAS)
def test_a_missing_reader_package_costs_its_run_with_the_install_line(tmp_path, monkeypatch, module):
    archive, extra = READER_EXTRAS[module]
    monkeypatch.setitem(sys.modules, module, None)
    run_cli("analyze", archive, "-o", tmp_path / "out", "-q", expect=1)
    error = read_tables(tmp_path / "out")["runs"]["error"][0]
    assert f"needs {module}: pip install '{extra}'" in error
    formats = run_cli("formats").stdout
    assert f"needs {module}: pip install '{extra}'" in formats


def test_dask_and_remote_packages_are_named_too(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "o", "--engine", "dask",
                     "-j", "2", expect=1)
    assert "--engine dask needs distributed: pip install 'flowscan[dask]'" in result.output
    monkeypatch.setitem(sys.modules, "fsspec", None)
    result = run_cli("analyze", "s3://bucket/x", "-o", tmp_path / "o", expect=2)
    assert "needs fsspec: pip install 'flowscan[remote]'" in result.output


@pytest.mark.parametrize("command", ["analyze", "lmc", "sharpness", "produce"])
def test_an_unwritable_output_is_refused_before_anything_is_read(monkeypatch, command):
    from flowscan import pipeline

    def never(*args, **kwargs):
        raise AssertionError("read before the output folder was checked")
    monkeypatch.setattr(pipeline, "find_runs", never)
    archive = str(FIXTURES / "closed-form" / "flowscan")
    args = {"analyze": ["analyze", archive], "lmc": ["lmc", archive], "sharpness": ["sharpness", archive],
            "produce": ["produce", *PRODUCE]}[command]
    result = run_cli(*args, "-o", "/proc/nope/out", expect=1)
    assert "/proc/nope/out: cannot write the output here" in result.output
    assert "Traceback" not in result.output


def test_reanalysis_names_the_analysis_it_replaces_and_sets_aside_every_derived_table(tmp_path, made):
    out = tmp_path / "out"
    shutil.copytree(made / "out", out)
    run_cli("compare", out, "-q")
    assert (out / "compare_tree.parquet").is_file()
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", out)
    assert "replacing the analysis in" in result.stderr and "another archive" in result.stderr
    assert not (out / "compare_tree.parquet").exists() and not (out / "compare.parquet").exists()
    assert any((p / "compare_tree.parquet").is_file() for p in out.glob("stale-*"))


def test_no_runs_says_what_the_folder_holds(tmp_path):
    (tmp_path / "pics").mkdir()
    for name in ("a.png", "b.png", "notes.txt"):
        (tmp_path / "pics" / name).write_bytes(b"x")
    result = run_cli("analyze", tmp_path / "pics", "-o", tmp_path / "out", expect=1)
    assert "no IMP runs found; it holds 3 file(s) (2 .png, 1 .txt)" in result.output
    assert "flowscan formats" in result.output


def test_compare_of_one_run_says_so(tmp_path):
    out = tmp_path / "out"
    run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", out, "-q")
    result = run_cli("compare", out)
    assert "pairs: none (one unit alone" in result.stdout and "pairs (" not in result.stdout


def test_ctrl_c_under_no_cache_does_not_promise_the_cache(tmp_path, monkeypatch):
    from flowscan import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "analyze_runs", interrupted)
    monkeypatch.setattr(sys, "argv", ["flowscan", "analyze", "x", "--no-cache"])
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "o", "--no-cache",
                     expect=130)
    assert "every round is read again" in result.output and ".cache" not in result.output


def test_python_api_returns_the_tables_the_command_writes(tmp_path):
    frames = flowscan.analyze(FIXTURES / "closed-form" / "safetensors", blocks=r"^(a|b)\.")
    run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "out", "-q", "--blocks", r"^(a|b)\.")
    written = read_tables(tmp_path / "out")
    for name in ("rounds", "steps", "eigen", "survival"):
        assert frames[name].equals(written[name]), name
    seen = flowscan.inspect(FIXTURES / "open_lth")
    assert seen["runs"]["complete_rounds"].to_list() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert isinstance(seen["tensors"], pl.DataFrame) and seen["tensors"].height > 0


def test_report_tables_scroll_sideways(made):
    run_cli("report", made / "out", "-q")
    page = (made / "out" / "report.html").read_text()
    assert page.count('<div class="scroll"><table') == page.count("<table") > 0
    assert "div.scroll{overflow-x:auto" in page


@pytest.mark.parametrize("command", [["analyze", "-o", "OUT"], ["inspect"], ["lmc", "-o", "OUT"],
                                     ["sharpness", "-o", "OUT"]])
def test_a_folder_without_runs_gets_one_message_from_every_command(tmp_path, command):
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "readme.txt").write_text("nothing here")
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    result = run_cli(args[0], empty, *args[1:], expect=None)
    assert result.exit_code != 0
    assert (f"{empty}: no IMP runs found; it holds 1 file(s) (1 .txt) in 1 subfolder(s) (looked for: "
            in result.output), result.output
    assert "`flowscan formats` lists the layouts flowscan reads." in result.output
    assert "flowscan inspect" not in result.output   # never told to run what was just run
