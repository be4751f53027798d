"""bench/gpu_session.sh --dry-run: every line of the GPU check runs on the CPU at tiny shapes, well inside its
budget, and writes the records a GPU run writes: the CUDA check's verdict, minillava beside the plain-transformers
baseline on the same work, and the padded and packed runs of the length mix on the same batches."""

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


def test_dry_run_runs_every_line_and_writes_every_record(tmp_path):
    out = tmp_path / "bench_out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "bench", "gpu_session.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = {s["line"]: s for s in _jsonl(out / "steps.jsonl")}
    assert list(steps) == LINES
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert sum(s["seconds"] for s in steps.values()) < 180
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
