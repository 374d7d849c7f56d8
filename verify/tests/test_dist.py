"""verify.dist over torch.distributed's gloo backend on the CPU: real processes, a real all-to-all. Expert
parallelism at world size 2 and 4 passes; a dispatch that drops a token is reported as a dispatch error on the rank
it never reached; an implementation that takes global ids for local ones fails every rank but 0; one rank out of
device memory gives no verdict in any process, and the rank is named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from verify.power import broken


def torchrun(tmp_path, world: int, *argv: str) -> tuple[int, dict[str, dict], str]:
    path = tmp_path / "rows.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m",
               "verify.dist", *argv, "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    return done.returncode, rows, done.stdout + done.stderr


@pytest.mark.long
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.extended), 4])
def test_expert_parallel_over_gloo_passes_every_rank_and_the_combine(tmp_path, world):
    code, rows, log = torchrun(tmp_path, world, "--case", "skewed")
    assert code == 0, log[-3000:]
    expected = {f"skewed-ep{world}-{r}-{layout}" for r in [*(f"rank{i}" for i in range(world)), "all"]
                for layout in ("masked", "contiguous")}
    assert set(rows) == expected and all(r["verdict"] == "PASS" for r in rows.values())


def test_a_dropped_token_is_a_dispatch_error_on_the_rank_it_missed(tmp_path):
    code, rows, log = torchrun(tmp_path, 2, "--case", "skewed", "--layout", "masked", "--inject", "drop-token")
    assert code != 0
    assert rows["skewed-ep2-rank1-masked"]["checks"][0] == "dispatch", log[-3000:]
    assert "did not arrive" in rows["skewed-ep2-rank1-masked"]["findings"][0]["message"]
    assert rows["skewed-ep2-rank0-masked"]["verdict"] == "PASS" and rows["skewed-ep2-all-masked"]["verdict"] == "FAIL"


def test_global_ids_taken_as_local_fail_the_ranks_from_one_on(tmp_path):
    code, rows, log = torchrun(tmp_path, 2, "--case", "skewed", "--layout", "masked",
                               "--impl", "verify.mutants:global_ids_as_local")
    assert code != 0
    assert rows["skewed-ep2-rank0-masked"]["verdict"] == "PASS", log[-3000:]
    assert rows["skewed-ep2-rank1-masked"]["verdict"] == "FAIL"
    assert "dispatch" not in rows["skewed-ep2-rank1-masked"]["checks"]  # the wire was right: the stage is wrong


def out_of_memory_on_rank_1(*args, ep_rank=0, **kwargs):
    if ep_rank == 1:
        raise torch.OutOfMemoryError("CUDA out of memory (raised by a test)")
    return broken.reference_impl(*args, ep_rank=ep_rank, **kwargs)


def test_a_rank_out_of_device_memory_gives_no_verdict_on_any_rank(tmp_path):
    code, rows, log = torchrun(tmp_path, 2, "--case", "skewed", "--layout", "masked",
                               "--impl", f"{__name__}:out_of_memory_on_rank_1")
    assert code != 0 and rows == {}, log[-3000:]  # no table, no rows: torchrun exits 1 when a process exits 2
    assert "verify.dist (rank 1): no verdict: the device ran out of memory" in log, log[-3000:]
    assert "rows pass" not in log  # rank 0 printed no table
