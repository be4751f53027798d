"""bench/bench.py smoke test: --tiny runs the real FSDP2 train_step on CPU in seconds and reports every field; packed
and padded runs see the same batches, so their losses agree (rtol/atol 1e-5) and only padding_share differs. The
baseline's batch conversion is pinned here; tests/test_gpu_session.py runs the baseline itself."""

import pytest
import torch

from bench import bench

FIELDS = {"samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb", "padding_share", "data_wait_share", "losses"}


def run(*flags):
    (record,) = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--sim_world", "2", "--batch", "4", *flags])
    assert record["what"] == "minillava" and record.keys() >= FIELDS
    assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0 and record["steps_measured"] == 2
    assert record["mfu"] is None  # no GPU peak on CPU
    return record


def test_bench_tiny_stage2_packed_vs_padded():
    padded, packed = run("--stage", "2"), run("--stage", "2", "--packing")
    assert padded["padding_share"] > 0 and packed["padding_share"] == 0
    assert padded["mean_seq_len"] == packed["mean_seq_len"]
    assert padded["losses"] == pytest.approx(packed["losses"], rel=1e-5, abs=1e-5)


def test_bench_tiny_stage1_fixed_text_with_checkpointing():
    record = run("--stage", "1", "--text", "5", "--gradient_checkpointing")
    assert record["padding_share"] == 0  # every sample has the same length
    assert record["mean_seq_len"] == 1 + 4 + 5  # BOS + 4 patches + 5 text tokens, as hf_baseline.py's T


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_bench_baseline_at_full_shapes_needs_cuda():
    with pytest.raises(SystemExit):
        bench.parse(["--baseline"])
    assert bench.parse(["--tiny", "--baseline"]).baseline  # the dry run's tiny baseline runs on the CPU


def test_hf_baseline_batch_expands_each_image_to_its_patches_and_keeps_the_labels():
    """minillava's collated batch -> HF Llava's: <image> becomes P image-token positions labelled -100, truncation
    after expansion, right padding, pixel rows only for image samples; the label tokens are the ones minillava
    trains (the host layout's num_label_tokens), so both runs do the same work."""
    from bench.hf_baseline import IMAGE_ID, to_hf_batch
    from minillava.constants import IGNORE_INDEX as X
    from minillava.constants import IMAGE_TOKEN_INDEX as IMG
    from minillava.layout import lay_out

    batch = {
        "input_ids": torch.tensor([[1, IMG, 5, 6, 7], [1, 8, 9, 0, 0]]),
        "labels": torch.tensor([[X, X, X, 6, 7], [X, X, 9, X, X]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
        "pixel_values": torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 2, 2),
    }
    hf = to_hf_batch(batch, image_tokens=3, max_len=6)
    assert hf["input_ids"].tolist() == [[1, IMAGE_ID, IMAGE_ID, IMAGE_ID, 5, 6], [1, 8, 9, 0, 0, 0]]
    assert hf["labels"].tolist() == [[X, X, X, X, X, 6], [X, X, 9, X, X, X]]
    assert hf["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert hf["pixel_values"].shape[0] == 1 and hf["pixel_values"].max() == 0  # sample 0's image only
    ours = lay_out(batch, image_tokens=3, max_len=6, padding_free=False)
    assert int((hf["labels"][:, 1:] != X).sum()) == ours.num_label_tokens == 2
    with pytest.raises(ValueError, match="cuts through an image"):
        to_hf_batch(batch, image_tokens=3, max_len=2)


def test_bench_compile_experiment_traces_without_graph_breaks_and_keeps_losses():
    """--compile (per-block torch.compile, dynamic shapes) with layer-selective AC on the packed path: one graph per
    block, no graph break, no recompile across steps of different lengths, and the eager run's losses. aot_eager
    traces exactly what inductor would compile, without the CPU code generation (~30 s here instead of minutes)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = run("--stage", "2", "--packing")
    compiled = run(
        "--stage", "2", "--packing", "--compile", "--compile_backend", "aot_eager",
        "--gradient_checkpointing", "--checkpoint_layers", "1",
    )  # fmt: skip
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2  # 2 blocks, 3 steps
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-5)
    torch._dynamo.reset()


def test_summarise_arithmetic():
    """Totals over steps / total time; padding = 1 - real / computed positions; the lm_head correction removes
    k * V * D FLOPs for every unlabelled position (k = 4 frozen LLM, 6 trained)."""
    from minillava.metrics import FlopModel

    flops = FlopModel(
        llm_matmul=100, llm_layers=1, hidden=2, vit_layer=0, vit_layers_run=0, vit_hidden=0, vit_tokens=0,
        projector=0, image_tokens=1, llm_trainable=False, projector_trainable=True,
    )  # fmt: skip
    rows = [
        dict(dt=1.0, data=0.1, seq=[3, 5], positions=10, labels=2),
        dict(dt=3.0, data=0.1, seq=[4], positions=4, labels=1),
    ]
    out = bench.summarise(rows, flops, head=10, peak=1e3, peak_mem=None)
    counted = sum(4 * 100 * n + 3 * 4 * n * n * 2 / 2 + 6 * 0 for n in (3, 5, 4))  # LLM + causal attention
    assert out["samples_per_s"] == 0.75 and out["tokens_per_s"] == 3 and out["mean_seq_len"] == 4.0
    assert out["padding_share"] == round(1 - 12 / 14, 4) and out["data_wait_share"] == 0.05
    assert out["mfu"] == round(counted / 4.0 / 1e3, 4)
    assert out["mfu_lm_head_labelled_only"] == round((counted - 4 * 10 * (12 - 3)) / 4.0 / 1e3, 4)


def test_cpu_counts_table_tiny():
    """bench/counts.py: per stage x AC x packing, minillava beside the baseline on the same batch. Packed without AC,
    a step executes only the FLOPs it needs; a minillava step reads the device once (its metrics, when it logs)."""
    from bench import counts

    rows = counts.main(["--tiny"])
    ours = [r for r in rows if r["what"] == "minillava"]
    assert len(ours) == 8 and len(rows) == 14
    lora = [r for r in rows if r["what"] == "minillava_lora"]  # beside the packed stage-2 rows, AC off and on
    full = [r for r in ours if r["stage"] == 2 and r["packing"]]
    assert [r["gradient_checkpointing"] for r in lora] == [False, True]
    for a, b in zip(lora, full, strict=True):  # adapters + projector only; the adapters' own activations show
        assert a["host_reads_per_step"] == 1 and a["trainable_params"] < b["trainable_params"] / 5
        assert a["saved_bytes_per_token"] <= b["saved_bytes_per_token"] * 1.5
    assert all(r["host_reads_per_step"] == 1 for r in ours)
    for r in ours:
        if r["packing"] and not r["gradient_checkpointing"]:
            assert r["executed_over_needed_flops"] <= 1.02, r
        else:
            assert r["executed_over_needed_flops"] > 1.02, r  # padding and recompute show
    assert all(r["executed_over_needed_flops"] > 1.02 for r in rows if r["what"] == "hf_baseline")
