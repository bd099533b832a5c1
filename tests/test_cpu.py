"""CPU threads for torch work on a shared machine (flowscan/cpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flowscan import cpu

torch = pytest.importorskip("torch")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_busy_cores_are_left_out_of_the_team(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "cores", lambda: 4)
    monkeypatch.setattr(cpu, "busy_elsewhere", lambda: 3)
    assert "1 of 4 core(s); 3 other process(es) running" in cpu.configure_torch_threads()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(cpu, "busy_elsewhere", lambda: 9)   # more than the cores: still one thread
    cpu.configure_torch_threads()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(cpu, "busy_elsewhere", lambda: 0)
    assert cpu.configure_torch_threads().startswith("CPU threads: 4 of 4 core(s), OMP_WAIT_POLICY")
    assert torch.get_num_threads() == 4


def test_the_users_settings_win(monkeypatch, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(cpu, "busy_elsewhere", lambda: pytest.fail("the user chose the threads"))
    assert "(OMP_NUM_THREADS)" in cpu.configure_torch_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cpu.prefer_passive_waiting()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_another_running_process_is_seen(threads):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = cpu.busy_elsewhere()
    finally:
        spinner.kill()
    if seen is None:
        pytest.skip("no /proc/stat here")
    assert seen >= 1


def test_the_command_line_makes_waiting_threads_sleep():
    code = ("import os; from flowscan.cli import main; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
