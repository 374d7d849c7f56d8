"""The suite's own machinery for `pytest -n 8` (conftest.py, "several workers, one device"): a test that runs out of
device memory beside other workers runs again alone, after the tests beside it have finished; two that run out at
once run again one after the other (no deadlock); one that runs out of memory alone fails with that error. Two
pytest processes stand for two xdist workers on one device (the conftest takes a worker's name from
PYTEST_XDIST_WORKER), so that which test runs where is not left to the scheduler."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

TESTS = '''
import os, pathlib, time
import torch

DIR = pathlib.Path(os.environ["SHARE_DIR"])


def wait_for(path, present=True, seconds=60):
    end = time.monotonic() + seconds
    while path.exists() != present:
        assert time.monotonic() < end, f"waited {seconds} s for {path} (present={present})"
        time.sleep(0.02)


def test_beside():
    (DIR / "beside-running").touch()
    wait_for(DIR / "alone-ran-out", seconds=60)  # the other one ran out of memory while this one runs
    time.sleep(0.5)  # ... and must wait for this one to end before it runs again
    (DIR / "beside-running").unlink()


def test_alone():
    if not (DIR / "alone-ran-out").exists():
        wait_for(DIR / "beside-running")
        (DIR / "alone-ran-out").touch()
        raise torch.OutOfMemoryError("CUDA out of memory (raised by a test)")
    assert not (DIR / "beside-running").exists(), "ran again while another test ran beside it"
    (DIR / "alone-ran-again").touch()


def test_out_of_memory_in_two_workers_at_once():
    me = os.environ["PYTEST_XDIST_WORKER"]
    if not (DIR / f"{me}-ran-out").exists():
        (DIR / f"{me}-running").touch()
        for other in ("gw0", "gw1"):
            wait_for(DIR / f"{other}-running")
        (DIR / f"{me}-ran-out").touch()
        raise torch.OutOfMemoryError("CUDA out of memory (raised by a test)")
    (DIR / f"{me}-running-again").touch()
    time.sleep(0.5)
    assert [p.name for p in DIR.glob("*-running-again")] == [f"{me}-running-again"], "two ran again at once"
    (DIR / f"{me}-running-again").unlink()
    (DIR / f"{me}-ran-again").touch()


def test_too_big_even_alone():
    raise torch.OutOfMemoryError("CUDA out of memory (raised by a test, every time)")
'''


def run_worker(tmp_path: pathlib.Path, name: str, test: str) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the conftest imports kernels
    env = dict(os.environ, PYTEST_XDIST_WORKER=name, SHARE_DIR=str(tmp_path / "share"), PYTHONPATH=path)
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-rA", f"test_it.py::{test}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = worker.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, _ = worker.communicate()
        pytest.fail(f"a worker hung (the workers deadlocked?):\n{out}")
    return worker.returncode, out


@pytest.mark.long
def test_out_of_memory_beside_another_worker_runs_again_alone(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (tmp_path / "test_it.py").write_text(TESTS)
    (tmp_path / "share").mkdir()
    beside, alone = run_worker(tmp_path, "gw0", "test_beside"), run_worker(tmp_path, "gw1", "test_alone")
    (code_beside, out_beside), (code_alone, out_alone) = finish(beside), finish(alone)
    assert code_beside == 0, out_beside
    assert code_alone == 0, out_alone
    assert (tmp_path / "share" / "alone-ran-again").exists()
    assert "ran again alone" in out_alone  # the report says so

    # two at once: the second waits for the first to have run alone, then runs alone in turn
    both = [run_worker(tmp_path, name, "test_out_of_memory_in_two_workers_at_once") for name in ("gw0", "gw1")]
    for code, out in [finish(worker) for worker in both]:
        assert code == 0, out
    assert all((tmp_path / "share" / f"{name}-ran-again").exists() for name in ("gw0", "gw1"))

    too_big = run_worker(tmp_path, "gw0", "test_too_big_even_alone")
    code, out = finish(too_big)
    assert code == 1 and "OutOfMemoryError" in out and "1 failed" in out, out
