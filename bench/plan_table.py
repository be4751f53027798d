"""BENCHMARKS.md's "Will it fit?" tables: `python -m minillava.plan`'s trace for LLaVA-1.5-7B and -13B (Vicuna-v1.5 +
CLIP-L/336 shapes), stages 1 and 2 at the batch sizes LLaVA's scripts use, on 8 and 64 H100-80GB (HSDP 8 x 8); with
--grid, the trace beside the analytic estimate (minillava/memory.py) over a grid of 7B layouts. One markdown row per
config; not a test.

    python bench/plan_table.py [--mfu 0.4] [--grid]
"""

import argparse
import os
import sys
import tempfile

from transformers import CLIPVisionConfig, LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from minillava.config import parse_args  # noqa: E402
from minillava.plan import trace  # noqa: E402

SIZES = {"7B": (4096, 11008, 32, 32), "13B": (5120, 13824, 40, 40)}  # hidden, intermediate, layers, heads
# (stage, per-device batch, sample length, what): pretrain.sh's 32 x 1 x 8 GPUs on LLaVA-558K (576 image tokens and
# ~40 of caption and template), finetune.sh's 16 x 1 x 8 on LLaVA-665K (its longest samples reach model_max_length);
# at 64 ranks the same per-device batch, and the one that keeps the scripts' global batch.
ROWS = [(1, 32, 617, 1), (1, 32, 617, 8), (1, 4, 617, 8), (2, 16, 2048, 1), (2, 16, 2048, 8), (2, 2, 2048, 8)]


def configs(size: str) -> tuple:
    d, inter, layers, heads = SIZES[size]
    llm = LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    tower = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    return llm, tower


# (stage, batch, checkpointing, bf16, padding_free, nodes): 8 ranks FSDP, or 8 x 8 HSDP
GRID = [(s, b, ac, bf16, pf, n) for s, b in ((1, 32), (1, 8), (2, 16), (2, 4)) for ac in ("False", "auto", "True")
        for bf16, pf in (("True", "True"), ("True", "False"), ("False", "True")) for n in (1, 8)
        if (bf16, pf) == ("True", "True") or n == 1]  # fmt: skip


def _argv(out: str, stage: int, batch: int, hsdp: bool, *extra: str) -> list[str]:
    return ["--stage", str(stage), "--model_name_or_path", "m", "--vision_tower", "v", "--data_path", "d",
            "--image_folder", "i", "--output_dir", out, "--init_projector", "random", "--mm_projector_type",
            "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--per_device_train_batch_size", str(batch),
            "--hsdp", str(hsdp), *extra]  # fmt: skip


def grid(out: str) -> None:
    print("| stage | batch | AC | bf16 | packed | ranks | checkpointed | traced peak GiB | estimate GiB | "
          "estimate / trace |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for stage, batch, ac, bf16, pf, nodes in GRID:
        argv = _argv(out, stage, batch, nodes > 1, "--gradient_checkpointing", ac, "--bf16", bf16, "--padding_free", pf)
        # stage 1: LLaVA-558K's 617 tokens per sample; stage 2: a mix of lengths up to model_max_length
        lengths = [617] * batch if stage == 1 else [2048 - 97 * i for i in range(batch)]
        plan = trace(parse_args(argv), configs("7B"), nnodes=nodes, nproc_per_node=8, gpu_memory_gib=80,
                     lengths=lengths)  # fmt: skip
        ratio = plan.estimate_gib / plan.traced_peak_gib
        worst = max(worst, abs(ratio - 1))
        print(f"| {stage} | {batch} | {ac} | {bf16} | {pf} | {plan.world} | {plan.checkpointed_layers} | "
              f"{plan.traced_peak_gib:.1f} | {plan.estimate_gib:.1f} | {ratio:.3f} |", flush=True)  # fmt: skip
    print(f"\nlargest difference: {worst:.1%}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--grid", action="store_true", help="the trace beside the estimate over a grid of 7B layouts")
    args = p.parse_args()
    if args.grid:
        with tempfile.TemporaryDirectory() as out:
            return grid(out)
    print("| model | stage | ranks | batch / rank | tokens / sample | checkpointed | traced peak GiB | estimate GiB | "
          f"fits 80 GB | tokens/s at {args.mfu:.0%} MFU (assumed) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for size in SIZES:
            for stage, batch, length, nodes in ROWS:
                argv = _argv(out, stage, batch, nodes > 1)
                plan = trace(parse_args(argv), configs(size), nnodes=nodes, nproc_per_node=8, gpu_memory_gib=80,
                             lengths=[length] * batch, mfu=args.mfu)  # fmt: skip
                ranks = f"{plan.world}" + (" (8 x 8 HSDP)" if nodes > 1 else "")
                print(f"| {size} | {stage} | {ranks} | {batch} | {length} | {plan.checkpointed_layers} of "
                      f"{plan.total_layers} | {plan.traced_peak_gib:.1f} | {plan.estimate_gib:.1f} | "
                      f"{'yes' if plan.fits else 'no'} | {plan.tokens_per_s:,.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
