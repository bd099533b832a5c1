"""Names from the files scanned (folders, files, tensors) never reach a terminal or the report raw: a
control character is printed escaped (`\\x1b`, `\\n`), so no escape sequence retitles the terminal and
no newline forges a line of output, in every command's text, its errors and its report."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES

EVIL = "run\n FAKE: run ok\x1b]0;pwned\x07\x1b[2J\u202e"
RAW = ("\x1b", "\x07", "\u202e", "\r")


def _runs(root):
    rng = np.random.default_rng(0)
    good = root / EVIL
    good.mkdir(parents=True)
    for r in range(3):
        w = rng.normal(size=(8, 8)).astype(np.float32)
        m = (rng.random((8, 8)) < 0.8 ** r).astype(np.uint8)
        save_file({f"fc{EVIL}.weight": w, f"fc{EVIL}.weight_mask": m, "out.weight": w,
                   "out.weight_mask": m}, str(good / f"round_{r}.safetensors"),
                  metadata={"test_accuracy": str(0.9 - 0.01 * r)})
    bad = root / f"bad{EVIL}"
    bad.mkdir()
    for r in range(2):
        (bad / f"round_{r}.safetensors").write_bytes(b"\x00" * 12)
    return root


def _flowscan(*args, expect: int = 0) -> str:
    done = subprocess.run([sys.executable, "-m", "flowscan", *map(str, args)], capture_output=True,
                          env={**os.environ, "COLUMNS": "200"})
    text = (done.stdout + done.stderr).decode("utf-8", "surrogateescape")
    assert done.returncode == expect, text
    return text


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    root, out = _runs(tmp / "runs"), tmp / "out"
    texts = {
        "analyze": _flowscan("analyze", root, "-o", out, "-v", expect=1),   # the bad run fails
        "inspect": _flowscan("inspect", root, expect=1),
        "inspect one run": _flowscan("inspect", root / EVIL),
        "aggregate": _flowscan("aggregate", out),
        "table": _flowscan("table", out),
        "missing folder": _flowscan("analyze", root / "nothere" / EVIL, "-o", tmp / "o2", expect=2),
    }
    _flowscan("report", out, "-o", tmp / "report.html")
    texts["report"] = (tmp / "report.html").read_text()
    return texts


@pytest.mark.parametrize("command", ["analyze", "inspect", "inspect one run", "aggregate", "table",
                                     "missing folder", "report"])
def test_no_control_character_reaches_the_output(outputs, command):
    text = outputs[command]
    assert text.strip(), command
    assert not [c for c in RAW if c in text], repr(text[:2000])
    assert not any(line.lstrip().startswith("FAKE") for line in text.splitlines()), text


def test_the_names_are_shown_escaped(outputs):
    assert "FAKE: run ok\\x1b]0;pwned\\x07" in outputs["analyze"], outputs["analyze"]
    assert "\\n FAKE" in outputs["inspect"], outputs["inspect"]
