"""Spawned workers never outlive the command: SIGTERM runs its cleanup, a dead parent ends them."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_vla.procs import sigterm_raises_exit

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reaped or zombie worker has stopped working)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_sigterm_inside_raises_system_exit_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as e:
        with sigterm_raises_exit():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
            finally:
                cleaned.append(True)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


@linux_only
def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    # SIGKILL: no handler, no `finally` in the parent runs; only the worker's own watch can end it.
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing as mp, os, time
        from edge_vla.procs import exit_with_parent

        def work(parent):
            exit_with_parent(parent, interval=0.1)
            open({str(tmp_path / "child.pid")!r}, "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            mp.get_context("spawn").Process(target=work, args=(os.getpid(),), daemon=True).start()
            time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        pid_file = tmp_path / "child.pid"
        assert _wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60), "the worker never started"
        child = int(pid_file.read_text())
        assert _running(child)
        parent.kill()
        parent.wait(10)
        assert _wait_until(lambda: not _running(child), 10), "the worker outlived its killed parent"
    finally:
        parent.kill()


@linux_only
@pytest.mark.slow
@pytest.mark.libero
def test_sigterm_to_a_parallel_eval_stops_its_rollout_workers(tmp_path, tiny_ckpt):
    pytest.importorskip("libero.libero")
    cmd = [sys.executable, "-m", "edge_vla", "eval", "libero", str(tiny_ckpt), "--tasks",
           "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket", "--trials", "6", "--workers", "2",
           "--max-steps", "400", "--mode", "direct", "--out", str(tmp_path / "eval"), "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    def workers():
        try:
            return [int(p) for p in children_file.read_text().split()]
        except FileNotFoundError:
            return []

    try:
        # two rollout workers (and multiprocessing's resource tracker) under the command
        assert _wait_until(lambda: len(workers()) >= 2, 120), "the rollout workers never started"
        time.sleep(3)  # into their episodes
        started = workers()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, out
        assert "Traceback" not in out
        assert _wait_until(lambda: not any(_running(p) for p in started), 20), "rollout workers outlived the command"
    finally:
        proc.kill()
