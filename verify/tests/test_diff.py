"""python -m verify.diff as a user meets it: the table, exit codes 0 / 1 / 2, replay commands, JSON, --list; and the
hand-made broken implementations it must fail, naming the rank and row (verify/power/broken.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from verify import bands
from verify.cases import CASES, CASES_BY_NAME
from verify.diff import main
from verify.power import broken


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_prints_every_case(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0 and all(line.startswith(c.name + ":") for line, c in zip(out.splitlines(), CASES, strict=True))


@pytest.mark.parametrize("argv,message", [
    (["--case", "nope"], "unknown case 'nope'"),
    (["--case", "skewed", "--impl", "no.such.module:fn"], "cannot import --impl"),
    (["--case", "skewed", "--impl", "verify.power.broken"], "MODULE:CALLABLE"),
    (["--case", "skewed", "--ep-size", "3"], "--ep-size 3"),
    (["--case", "skewed", "--ep-size", "2", "--rank", "2"], "--rank 2"),
    (["--bogus"], "unrecognized arguments"),
    ([], "--case or --replay is required"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_one_row_passes_and_writes_json(capsys, tmp_path):
    path = tmp_path / "rows.json"
    code, out, _ = run(capsys, "--case", "skewed", "--ep-size", "4", "--rank", "2", "--layout", "masked",
                       "--view", "deepep", "--json", str(path))
    assert code == 0, out
    assert "skewed  4   2     masked" in out and "1/1 rows pass" in out
    (row,) = json.loads(path.read_text())["rows"]
    assert row["id"] == "skewed-ep4-rank2-masked" and row["verdict"] == "PASS" and row["checks"] == []
    # every band of the table judged this row, each within the bound it was held to
    judged = {f["metric"]: f for f in row["findings"] if f["check"] == "band"}
    sizes = CASES_BY_NAME["skewed"].sizes("cpu")
    assert list(judged) == [b.metric for b in bands.bands_for(sizes.hidden, sizes.inter)]
    assert all(f["verdict"] == "PASS" and f["value"] <= f["limit"] for f in judged.values()), judged
    # the table prints the raw metrics, in u
    metrics = row["metrics"]
    assert judged["row_err"]["value"] == metrics["row_err"] and judged["rel_l2"]["value"] == metrics["rel_l2"]
    for value in (metrics["row_err"], judged["expert_err"]["value"], metrics["rel_l2"]):
        assert f"{value / bands.U_BF16:.3f}" in out


# Where each bug must show: (an ep_size, a rank) where a row fails. Every broken impl must fail at least there.
MUST_FAIL_AT = {
    "drop_last_expert_row": "skewed-ep1-rank0-masked",
    "global_ids_as_local": "skewed-ep2-rank1-masked",  # rank 0 is right, rank 1 is not
    "minus_one_wraps": "skewed-ep2-rank0-contiguous",
    "ignore_router_weight": "skewed-ep1-rank0-contiguous",
    "gate_up_swapped": "skewed-ep4-rank3-masked",
    "masked_drops_last_token": "skewed-ep4-rank1-masked",
    "perturb_one_expert": "skewed-ep2-rank0-contiguous",
}


@pytest.mark.parametrize("name", sorted(broken.BROKEN))
def test_broken_implementation_fails_and_is_localised(capsys, tmp_path, name):
    """Every row of the ep_size where the bug must show (the DeepEP view: these bugs need no remote ids)."""
    path = tmp_path / "rows.json"
    ep_size = MUST_FAIL_AT[name].split("-ep")[1].split("-")[0]
    code, out, _ = run(capsys, "--case", "skewed", "--ep-size", ep_size, "--view", "deepep", "--impl",
                       f"verify.power.broken:{name}", "--json", str(path))
    assert code == 1, out
    verdicts = {r["id"]: r["verdict"] for r in json.loads(path.read_text())["rows"]}
    assert verdicts[MUST_FAIL_AT[name]] == "FAIL", out
    failing = MUST_FAIL_AT[name]
    assert f"FAIL {failing}:" in out and "worst: token" in out
    assert f"--impl verify.power.broken:{name}" in out  # the replay command
    if name == "global_ids_as_local":
        assert verdicts["skewed-ep2-rank0-masked"] == "PASS" and verdicts["skewed-ep2-rank0-contiguous"] == "PASS"
    if name == "masked_drops_last_token":
        assert all(v != "FAIL" for k, v in verdicts.items() if k.endswith("contiguous"))


CALLS = {"n": 0, "fails_at": 0, "error": RuntimeError}


def fails_at_a_call(*args, **kwargs):
    """The reference as an implementation, raising CALLS["error"] at its CALLS["fails_at"]-th call."""
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["fails_at"]:
        raise CALLS["error"]("CUDA out of memory. Tried to allocate 4.00 GiB (raised by a test)")
    return broken.reference_impl(*args, **kwargs)


@pytest.mark.parametrize("fails_at", [1, 2, 3, 5])
def test_out_of_device_memory_is_no_verdict_where_another_error_fails_the_row(capsys, monkeypatch, fails_at):
    """Out of memory says nothing of the implementation: wherever it strikes (the rounding's detection, the plain run,
    a probe's run) the command stops with no verdict (exit 2, one line), never a failing row; the same call raising
    an error of its own fails a row (check crash, or the probe's), also when only the rounding detection's call
    raised."""
    argv = ("--case", "skewed", "--ep-size", "2", "--rank", "1", "--layout", "masked", "--impl",
            f"{__name__}:fails_at_a_call")
    monkeypatch.setitem(CALLS, "error", torch.OutOfMemoryError)
    monkeypatch.setitem(CALLS, "fails_at", fails_at)
    monkeypatch.setitem(CALLS, "n", 0)
    code, out, err = run(capsys, *argv)
    assert code == 2 and "no verdict: the device ran out of memory" in err, (out, err)
    assert len(err.strip().splitlines()) == 1 and "FAIL" not in out
    monkeypatch.setitem(CALLS, "error", RuntimeError)
    monkeypatch.setitem(CALLS, "n", 0)
    code, out, _ = run(capsys, *argv)
    assert code == 1 and "FAIL" in out and "RuntimeError" in out, out
    if fails_at == 1:  # the rounding detection's run: the rows' own calls succeed, the first row reports it
        assert "the rounding detection's run raised RuntimeError" in out, out


@pytest.mark.parametrize("impl", ["verify.power.broken:reference_impl", "verify.power.calibrate:tensor_core_order"])
def test_honest_implementations_pass(capsys, impl):
    """The reference itself, and a plain-torch peer that accumulates its GEMMs in another order."""
    code, out, _ = run(capsys, "--case", "skewed", "--impl", impl)
    assert code == 0, out


@pytest.mark.long
def test_module_entry_point_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "verify.diff", "--case", "single_token", "--ep-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rows pass" in done.stdout


def test_an_off_by_one_in_the_local_range_fails_only_where_raw_ids_reach_the_stage(capsys, tmp_path):
    """The previous rank's last expert taken as expert 0: the DeepEP view never shows a remote id (it sends -1), the
    raw view does, so only raw rows of ranks >= 1 fail, and the replay names the view."""
    path = tmp_path / "rows.json"
    code, out, _ = run(capsys, "--case", "skewed", "--ep-size", "2", "--impl",
                       "verify.mutants:previous_rank_expert_as_local", "--json", str(path))
    assert code == 1, out
    failed = [r["id"] for r in json.loads(path.read_text())["rows"] if r["verdict"] == "FAIL"]
    assert failed and all(i.endswith("-raw") and "-rank0-" not in i for i in failed), failed
    assert "skewed-ep2-rank1-masked-raw" in failed and "--view raw" in out
