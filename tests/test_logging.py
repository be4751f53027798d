"""What a run tells its user: the console line and JSONL record of each logging step (the loss averaged over the
logging window, as HF Trainer logs it; gradient norms per component; throughput; text-only samples; label tokens cut
by truncation), the end-of-run summary with what to do next, and the reproducibility manifest (written with every
checkpoint and final output, compared on resume)."""

import json
import os

import pytest
import torch
from conftest import flags, losses

import train
from minillava.data import LazySupervisedDataset
from minillava.layout import supervised_tokens


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_logging_window_console_line_and_end_summary(assets, tmp_path, capsys):
    every, windowed = str(tmp_path / "every"), str(tmp_path / "windowed")
    train.main(flags(assets, every, max_steps=4, logging_steps=1))
    capsys.readouterr()
    train.main(flags(assets, windowed, max_steps=4, logging_steps=3))
    out = capsys.readouterr().out
    step_losses = losses(every)
    records = _records(windowed)
    assert [r["step"] for r in records] == [1, 3]  # step 1 always, then every 3rd
    assert records[0]["loss"] == step_losses[0]
    assert records[1]["loss"] == pytest.approx((step_losses[1] + step_losses[2]) / 2, rel=1e-12)  # the window
    r = records[1]
    assert r["grad_norm"] == pytest.approx((r["grad_norm_llm"] ** 2 + r["grad_norm_mm_projector"] ** 2) ** 0.5)
    assert {"text_only_samples", "lost_label_tokens", "samples_per_s", "tokens_per_s", "peak_mem_gb"} <= r.keys()
    line = next(x for x in out.splitlines() if x.startswith("step 3/4 | "))
    for field in ("loss ", "lr ", "grad norm ", "(llm ", "mm_projector ", "samples/s", "tokens/s", "peak ",
                  "data wait ", "text-only ", "labels cut "):  # fmt: skip
        assert field in line, (field, line)
    assert "done in " in out and "trained 4 steps in " in out and "peak memory " in out
    assert f"model: {os.path.abspath(windowed)} (LLaVA stage-2 format). Try it: python -m minillava.generate" in out


def test_stage1_summary_gives_the_stage2_command(assets, tmp_path, capsys):
    out = str(tmp_path / "s1")
    train.main(flags(assets, out, stage=1, max_steps=1))
    text = capsys.readouterr().out
    assert f"train.py --stage 2 --pretrain_mm_mlp_adapter {os.path.abspath(out)}/mm_projector.bin" in text
    assert _records(out)[0].keys() >= {"grad_norm", "grad_norm_mm_projector"}  # stage 1 trains the projector only
    assert "grad_norm_llm" not in _records(out)[0]


def test_text_only_and_truncated_label_counts(assets, tmp_path):
    """The counts logged per step: text-only samples (no image), and label tokens that truncation (image expansion
    counted) cut; summed over the step's micro-batches and ranks."""
    from conftest import build_image_processor

    from minillava.data import load_tokenizer

    def dataset(max_len):
        tok = load_tokenizer(assets["llm"], max_len)
        return LazySupervisedDataset(assets["data"], tok, build_image_processor(), image_folder=assets["images"],
                                     version="v1", model_max_length=max_len, image_tokens=4)  # fmt: skip

    short, whole = dataset(48), dataset(4000)
    supervised = lambda item, n: supervised_tokens(item["input_ids"], item["labels"], 4, n)  # noqa: E731
    for i in range(len(short)):
        assert whole[i]["lost_labels"] == 0
        assert short[i]["lost_labels"] == supervised(whole[i], 4000) - supervised(short[i], 48)
    text_only = [i for i, r in enumerate(short.records) if "image" not in r]
    out = str(tmp_path / "o")
    train.main(flags(assets, out, max_steps=8, model_max_length=48))  # 16 samples, 4 of them text-only
    records = _records(out)
    assert sum(r["lost_label_tokens"] for r in records) == sum(int(short[i]["lost_labels"]) for i in range(16))
    assert sum(r["text_only_samples"] for r in records) == len(text_only) == 4


def test_manifest_is_saved_and_a_changed_setup_warns_on_resume(assets, tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = flags(assets, out, max_steps=2, save_steps=1, save_total_limit=5)
    train.main(argv)
    for folder in (out, os.path.join(out, "checkpoint-1")):
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["config"]["train"]["max_steps"] == 2
        assert manifest["versions"]["torch"] == torch.__version__ and "transformers" in manifest["versions"]
        assert len(manifest["data_sha256"]) == len(manifest["tokenizer_sha256"]) == 64
        assert "git" in manifest["minillava"]
    path = os.path.join(out, "checkpoint-1", "manifest.json")
    manifest["versions"]["torch"] = "0.0"
    manifest["data_sha256"] = "0" * 64
    with open(path, "w") as f:
        json.dump(manifest, f)
    capsys.readouterr()
    train.main([*argv, "--resume_from_checkpoint", os.path.join(out, "checkpoint-1")])
    text = capsys.readouterr().out
    assert "was written by a different setup (checkpoint -> now): torch 0.0 -> " + torch.__version__ in text
    assert "--data_path content (sha256 000000000000 -> " in text


def test_a_log_file_reads_well(assets, tmp_path):
    """`python train.py ... > log 2>&1` (LLaVA's flags, one of them ignored): no progress-bar redraws, the config as
    its difference from finetune.sh, a flag warning as one line, no known-harmless warnings (transformers' notes on
    LLaVA folders and long samples, FSDP2's view-tensor warning on stage 1's projector), real durations."""
    import re
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    for stage, out in ((1, "one"), (2, "two")):
        argv = flags(assets, str(tmp_path / out), stage=stage, max_steps=3, logging_steps=1, tf32="True")
        with open(log, "a") as f:
            run = subprocess.run([sys.executable, "train.py", *argv], cwd=os.path.dirname(train.__file__),
                                 stdout=f, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
        assert run.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text
    assert text.count("warning: --tf32 is ignored: TF32 matmuls are always enabled on GPU\n") == 2
    for noise in ("Warning", "[transformers]", "view tensor", "Token indices"):
        assert noise not in text, (noise, text)
    assert "stage 2: LLaVA's finetune.sh with\n" in text and "  --learning_rate 0.001 (finetune.sh: 2e-05)\n" in text
    assert re.search(r"\ndone in \d+\.\d s; trained 3 steps in \d+\.\d s: ", text)
    ours = [line for line in text.splitlines() if not line.startswith("[Gloo] Rank 0 is connected to 0 peer")]
    assert len(ours) < 60, text  # (torch 2.10's gloo prints that line per process group: CPU runs only)


def test_a_dataset_smaller_than_the_global_batch_says_so_once(assets, tmp_path, capsys):
    train.main(flags(assets, str(tmp_path / "o"), max_steps=2, gradient_accumulation_steps=10))  # 16 samples < 20
    out = capsys.readouterr().out
    assert out.count("note: 16 samples are fewer than the global batch of 20: every step repeats samples") == 1
