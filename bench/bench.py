"""Benchmark minillava's real train_step at LLaVA-1.5 sizes on one GPU; one JSON line per measurement. Not a test.

    python bench/bench.py --stage 1 --batch 32 --text 40 --gradient_checkpointing --baseline
    python bench/bench.py --stage 2 --layers 8 --batch 16 --packing
    python bench/bench.py --tiny --stage 2 --steps 2      # CPU smoke run with tiny shapes (tests/test_bench.py)
    bash bench/gpu_session.sh                             # the whole GPU check in one command (BENCHMARKS.md)

Vicuna-7B shapes (or --layers N of its 32) + CLIP-L/336 with random weights built on the meta device and
materialised on the GPU (no weight files; FLOPs do not depend on values), FSDP2 on 1 rank exactly as train.py
applies it, minillava.step's train_step on synthetic LLaVA-like micro-batches (see LengthMix). With --baseline,
bench/hf_baseline.py (plain transformers) first runs the same micro-batches in a subprocess. BENCHMARKS.md explains
every field.
"""

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/bench.py` from anywhere: train.py lives at the repository root
    sys.path.insert(0, REPO)

from minillava import distributed as D  # noqa: E402
from minillava import step as S  # noqa: E402
from minillava.attention import resolve_backend  # noqa: E402
from minillava.config import Config, parse_args, str2bool  # noqa: E402
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from minillava.metrics import FlopModel, device_peak_flops  # noqa: E402
from minillava.optim import build_optimizer  # noqa: E402
from minillava.sampler import DistributedModalityLengthSampler  # noqa: E402


@dataclass(frozen=True)
class LengthMix:
    """Text tokens per sample besides BOS: an image sample's LLM sequence is 1 + 576 + text tokens (hf_baseline.py's
    T = 1 + n_img + text), a text-only sample's 1 + text tokens; model_max_length truncates after the splice.

    Image samples draw uniformly from image_text; a text_only_share of samples (LLaVA-665K: 40K ShareGPT of 665K,
    about 6%) have no image (a zero image, as LLaVA's collator gives them) and draw from text_only. Labels: stage 1
    (plain) labels every caption token; stage 2 (v1) leaves the first third of each sample's text as prompt (-100).
    """

    image_text: tuple[int, int]
    text_only: tuple[int, int] = (0, 0)
    text_only_share: float = 0.0


MIXES = {  # stage -> mix; "tiny" shapes scale lengths down about 20x so a CPU run takes seconds
    1: LengthMix(image_text=(20, 60)),  # LLaVA-558K captions
    2: LengthMix(image_text=(100, 600), text_only=(128, 2047), text_only_share=0.06),  # LLaVA-665K; <= 2048 with BOS
}
TINY_MIXES = {
    1: LengthMix(image_text=(2, 6)),
    2: LengthMix(image_text=(4, 30), text_only=(6, 100), text_only_share=0.2),
}


def sample_lengths(mix: LengthMix, n: int, seed: int, fixed_text: int | None = None) -> list[int]:
    """n signed text lengths (negative = text-only sample, LLaVA's modality_lengths convention), seeded."""
    if fixed_text is not None:  # hf_baseline.py's shape: every sample an image + exactly fixed_text tokens
        return [fixed_text] * n
    r = random.Random(seed)
    out = []
    for _ in range(n):
        if r.random() < mix.text_only_share:
            out.append(-r.randint(*mix.text_only))
        else:
            out.append(r.randint(*mix.image_text))
    return out


def make_batch(lengths: list[int], stage: int, image_size: int, vocab: int, g: torch.Generator) -> dict:
    """A right-padded micro-batch in DataCollator's format: [BOS, <image>, text...] or [BOS, text...]."""
    T = max(abs(n) + 1 + (n > 0) for n in lengths)
    B = len(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        k = abs(n) + 1 + (n > 0)  # input ids: BOS, the single <image> placeholder, text
        ids[i, :k] = torch.randint(3, vocab, (k,), generator=g)
        ids[i, 0] = 1
        first_label = 1 if n < 0 else 2  # past BOS (and <image>)
        if n > 0:
            ids[i, 1] = IMAGE_TOKEN_INDEX
        if stage == 2:
            first_label += abs(n) // 3
        labels[i, first_label:k] = ids[i, first_label:k]
        mask[i, :k] = True
    pixels = torch.randn(B, 3, image_size, image_size, generator=g)
    pixels[[i for i, n in enumerate(lengths) if n < 0]] = 0  # text-only: LLaVA's zero image
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def model_configs(args: argparse.Namespace) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """Vicuna-7B-v1.5 (--layers of its 32) and CLIP ViT-L/14-336, or tiny versions for --tiny."""
    if args.tiny:
        llm = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=512)
        vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28)
    else:
        llm = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)
        vis = dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336
        )
    llm_cfg = LlamaConfig(
        **llm,
        num_hidden_layers=args.layers,
        num_key_value_heads=llm["num_attention_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    vis_cfg = CLIPVisionConfig(**vis, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return llm_cfg, vis_cfg


def bench_config(args: argparse.Namespace, output_dir: str) -> Config:
    """The trainer's Config for this stage (LLaVA's v1.5 preset) with the benchmark's knobs; paths are unused."""
    argv = ["--stage", str(args.stage), "--output_dir", output_dir, "--max_steps", str(args.warmup + args.steps)]
    argv += ["--model_name_or_path", "-", "--vision_tower", "-", "--data_path", "-", "--image_folder", "-"]
    argv += [
        "--per_device_train_batch_size",
        str(args.batch),
        "--gradient_checkpointing",
        str(args.gradient_checkpointing),
    ]
    argv += ["--padding_free", str(args.packing), "--bf16", str(torch.cuda.is_available() and not args.tiny)]
    argv += ["--model_max_length", str(args.model_max_length)]
    argv += ["--torch_compile", str(args.compile), "--torch_compile_backend", args.compile_backend]
    if args.stage == 2:
        argv += ["--init_projector", "random"]
    return parse_args(argv)


def build_model(cfg: Config, args: argparse.Namespace, device: torch.device):
    """minillava.step.build_model at the benchmark's shapes (meta build, freeze, bf16 frozen weights, AC,
    fully_shard), with seeded random weights written straight into the shards instead of streaming a checkpoint from
    rank 0."""
    info = D.DistInfo(rank=0, local_rank=0, world_size=1, device=device, owns_group=False)  # 1 rank (main)
    return S.build_model(
        cfg,
        info,
        model_configs(args),
        random_weights_seed=args.seed,
        checkpoint_layers=args.checkpoint_layers,  # --checkpoint_layers K: only the first K blocks (selective AC)
    )


def run_baseline(args: argparse.Namespace) -> dict:
    """bench/hf_baseline.py in a subprocess (so the two never share GPU memory), on the same micro-batches."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "hf_baseline.py"), "--stage", str(args.stage)]
    for k in ("layers", "batch", "steps", "warmup", "sim_world", "model_max_length", "seed"):
        cmd += [f"--{k}", str(getattr(args, k))]
    cmd += ["--text", str(args.text)] if args.text is not None else []
    cmd += ["--gradient_checkpointing"] * args.gradient_checkpointing + ["--tiny"] * args.tiny
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"what": "hf_baseline", "error": (proc.stderr or proc.stdout)[-2000:], "cmd": " ".join(cmd)}
    return {**json.loads(lines[-1]), "cmd": " ".join(cmd)}


def make_batches(cfg: Config, args: argparse.Namespace, image_size: int, vocab: int) -> list[dict]:
    """The run's micro-batches, seeded: a LengthMix (or --text) drawn for a --sim_world-GPU run, ordered by the
    trainer's sampler (modality/length grouped in stage 2), rank 0's share. The baseline gets the same ones."""
    n_steps = args.warmup + args.steps
    mix = (TINY_MIXES if args.tiny else MIXES)[args.stage]
    lengths = sample_lengths(mix, args.batch * args.sim_world * n_steps, args.seed, args.text)
    sampler = DistributedModalityLengthSampler(
        lengths, args.batch, args.sim_world, 0, seed=args.seed, group_by_modality=cfg.train.group_by_modality_length
    )
    g = torch.Generator().manual_seed(args.seed)
    return [make_batch([lengths[i] for i in idx], args.stage, image_size, vocab, g) for idx in sampler][:n_steps]


def measure(cfg: Config, args: argparse.Namespace, info: D.DistInfo) -> dict:
    """Build, run warmup + measured steps of minillava.step's train_step, and aggregate over the measured steps."""
    model, flops = build_model(cfg, args, info.device)
    optimizer, scheduler = build_optimizer(model, cfg.train, args.warmup + args.steps)
    raw = make_batches(cfg, args, model.vision_tower.config.image_size, model.llm.config.vocab_size)
    batches = [model.layout(b) for b in raw]  # on the host, as the trainer's collator does
    if info.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
        torch.cuda.reset_peak_memory_stats(info.device)
    rows = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        micro = [batch.to(info.device)]  # as train.micro_batch_stream
        t_data = time.perf_counter() - t0
        metrics = S.train_step(model, micro, optimizer, scheduler, cfg)
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        dt = time.perf_counter() - t0
        seq = list(batch.seq_lens)
        positions = sum(seq) if cfg.train.padding_free else len(seq) * max(seq)  # LLM positions computed
        rows.append(dict(dt=dt, data=t_data, seq=seq, positions=positions, loss=metrics["loss"], step=step))
        rows[-1]["labels"] = batch.num_label_tokens
        rows[-1]["towers"] = len(seq)  # the tower also runs on a text-only sample's zero image, as in LLaVA
    peak_mem = torch.cuda.max_memory_allocated(info.device) / 1e9 if info.device.type == "cuda" else None
    head = model.llm.lm_head.weight.numel()
    del model, optimizer, scheduler
    gc.collect()
    out = summarise(rows[args.warmup :], flops, head, device_peak_flops(info.device), peak_mem)
    return out | {"losses": [r["loss"] for r in rows]}


def summarise(rows: list[dict], flops: FlopModel, head: int, peak: float | None, peak_mem: float | None) -> dict:
    """Throughput over the measured steps: totals / total time (lengths vary per step, so no per-step median)."""
    time_s = sum(r["dt"] for r in rows)
    real = sum(sum(r["seq"]) for r in rows)
    step_flops = sum(flops.sample_flops(n) for r in rows for n in r["seq"])
    # a run that skips the tower for text-only samples (the baseline) is not credited with its FLOPs
    step_flops -= sum(len(r["seq"]) - r.get("towers", len(r["seq"])) for r in rows) * flops.tower_flops()
    # The formula (as hf_baseline.py's) counts lm_head on every position; the chunked CE runs it on labelled rows only.
    k = 6 if flops.llm_trainable else 4
    executed = step_flops - k * head * (real - sum(r["labels"] for r in rows))
    return {
        "steps_measured": len(rows),
        "samples": sum(len(r["seq"]) for r in rows),
        "label_tokens": sum(r["labels"] for r in rows),
        "step_s_median": round(statistics.median(r["dt"] for r in rows), 4),
        "samples_per_s": round(sum(len(r["seq"]) for r in rows) / time_s, 3),
        "tokens_per_s": round(real / time_s),  # real (unpadded) LLM tokens after the splice
        "mean_seq_len": round(real / sum(len(r["seq"]) for r in rows), 1),
        "tflops_per_s": round(step_flops / time_s / 1e12, 3),
        "mfu": round(step_flops / time_s / peak, 4) if peak else None,
        "mfu_lm_head_labelled_only": round(executed / time_s / peak, 4) if peak else None,
        "peak_flops": peak,
        "peak_mem_gb": round(peak_mem, 2) if peak_mem is not None else None,
        "padding_share": round(1 - real / sum(r["positions"] for r in rows), 4),
        "data_wait_share": round(sum(r["data"] for r in rows) / time_s, 4),
    }


def environment(device: torch.device, packing: bool) -> dict:
    """GPU, versions and the varlen kernel the packed path resolves to, recorded with every result."""
    env = {"torch": torch.__version__, "device": str(device), "date": time.strftime("%Y-%m-%d")}
    import transformers

    env["transformers"] = transformers.__version__
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        probe = torch.empty(1, device=device, dtype=torch.bfloat16)
        env["varlen_backend"] = resolve_backend(probe) if packing else None
    return env


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = dict(type=str2bool, nargs="?", const=True, default=False)
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1)
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: 32, Vicuna-7B; 2 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="per-device micro-batch (default: stage 1 32, stage 2 16)")
    ap.add_argument("--packing", **flag, help="train with --padding_free True")
    ap.add_argument("--gradient_checkpointing", **flag, help="activation checkpointing per LLM block")
    ap.add_argument("--checkpoint_layers", type=int, default=None, help="with AC: checkpoint only the first K blocks")
    ap.add_argument("--compile", **flag, help="the trainer's --torch_compile: torch.compile each LLM block")
    ap.add_argument("--compile_backend", default="inductor", help="aot_eager checks tracing on CPU without codegen")
    ap.add_argument("--steps", type=int, default=8, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (allocator, kernels)")
    ap.add_argument("--text", type=int, default=None, help="fixed text tokens per image sample (hf_baseline shapes)")
    ap.add_argument("--sim_world", type=int, default=8, help="batches as rank 0 of this many GPUs sees them")
    ap.add_argument("--model_max_length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", **flag, help="tiny shapes; runs on CPU in seconds")
    ap.add_argument("--baseline", **flag, help="first run bench/hf_baseline.py on the same micro-batches")
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 32)
    args.batch = args.batch or (32 if args.stage == 1 else 16)
    if args.baseline and not (args.tiny or torch.cuda.is_available()):
        ap.error("--baseline at full shapes needs CUDA (--tiny runs it on the CPU)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; prints and returns the JSON records (baseline, minillava, ratio)."""
    args = parse(argv)
    records = []
    if args.baseline:  # first, before this process holds any GPU memory
        records.append(run_baseline(args))
        print(json.dumps(records[-1]), flush=True)
    info = D.init_distributed()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.main
        with tempfile.TemporaryDirectory() as out:
            cfg = bench_config(args, out)
            result = measure(cfg, args, info)
        keys = ("stage", "layers", "batch", "packing", "gradient_checkpointing", "checkpoint_layers", "compile")
        keys += ("text", "sim_world", "tiny", "seed")
        record = {"what": "minillava", **{k: getattr(args, k) for k in keys}, **result}
        records.append(record | environment(info.device, args.packing))
        print(json.dumps(records[-1]), flush=True)
        base = records[0] if args.baseline else None
        if base and "error" not in base:
            ratio = {"what": "ratio_minillava_over_hf_baseline", "stage": args.stage, "layers": args.layers}
            ratio["same_work"] = (base["samples"], base["label_tokens"]) == (record["samples"], record["label_tokens"])
            ratio["samples_per_s"] = round(record["samples_per_s"] / base["samples_per_s"], 3)
            ratio["mfu"] = round(record["mfu"] / base["mfu"], 3) if record["mfu"] and base["mfu"] else None
            records.append(ratio)
            print(json.dumps(ratio), flush=True)
    finally:
        D.cleanup(info)
    return records


if __name__ == "__main__":
    main()
