"""bench/gpu_session.sh --dry-run: every line of the GPU check runs on the CPU at tiny shapes and writes the records
a GPU run writes: the CUDA check's verdict, minillava beside the plain-transformers baseline on the same work, and
the padded and packed runs of the length mix on the same batches. No time is asserted: a loaded machine may take
long, and timing belongs to the GPU run."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = [
    "gpu_tests", "cuda_train", "stage1_ac", "stage1_no_ac", "stage2_8_layers", "stage2_mix_padded",
    "stage2_mix_packed", "stage2_32_layers",
]  # fmt: skip


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _dry_run(out, **env):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2", **env}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "bench", "gpu_session.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {s["line"]: s for s in _jsonl(out / "steps.jsonl")}


def test_a_spent_budget_skips_the_remaining_lines(tmp_path):
    """Each line is capped by what is left of BUDGET_S; with less than 15 s left, a line is skipped and says so."""
    steps = _dry_run(tmp_path / "bench_out", BUDGET_S="10")
    assert list(steps) == LINES
    assert {s["status"] for s in steps.values()} == {"skipped"}
    assert {s["reason"] for s in steps.values()} == {"budget spent"}


@pytest.mark.e2e
def test_dry_run_runs_every_line_and_writes_every_record(tmp_path):
    out = tmp_path / "bench_out"
    steps = _dry_run(out, BUDGET_S="3600")  # a loaded machine may take long: time belongs to the GPU run
    assert list(steps) == LINES
    assert all(s["status"] == "ok" for s in steps.values()), steps
    records = _jsonl(out / "results.jsonl")
    by = lambda line, what: [r for r in records if r["line"] == line and r["what"] == what]  # noqa: E731
    assert by("cuda_train", "cuda_check_verdict") == [
        {"line": "cuda_train", "what": "cuda_check_verdict", "ok": True, "problems": []}
    ]
    assert len(by("cuda_train", "cuda_check")) == 4
    for line in ("stage1_ac", "stage1_no_ac", "stage2_8_layers", "stage2_32_layers"):
        (base,), (ours,) = by(line, "hf_baseline"), by(line, "minillava")
        (ratio,) = by(line, "ratio_minillava_over_hf_baseline")
        assert ratio["same_work"] and ratio["samples_per_s"] > 0
        for key in ("samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb", "padding_share", "label_tokens"):
            assert key in base and key in ours
        assert base["gradient_checkpointing"] == ours["gradient_checkpointing"] == (line != "stage1_no_ac")
    (padded,), (packed,) = by("stage2_mix_padded", "minillava"), by("stage2_mix_packed", "minillava")
    assert packed["padding_share"] == 0 < padded["padding_share"]
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-5, abs=1e-5)
    assert os.path.getsize(out / "session.log") > 0
