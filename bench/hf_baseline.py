"""The plain-transformers baseline that minillava is measured against: what a user would write instead.

    python bench/hf_baseline.py --stage 1 --batch 32 --text 40 --gradient_checkpointing
    python bench/hf_baseline.py --tiny --stage 2 --steps 2        # CPU, tiny shapes

HF LlavaForConditionalGeneration with SDPA, torch AdamW (fused on CUDA), HF gradient checkpointing when asked, and a
plain forward / backward / step loop, run on exactly the micro-batches bench/bench.py gives minillava (the same
lengths, labels, images and post-expansion truncation), rewritten into HF's format: one image token per patch.
bench/bench.py --baseline runs it in a subprocess first. The record has bench.py's fields, with the FLOPs counted by
the same minillava.metrics.FlopModel, so MFU and samples/s compare one to one.

Written as a user would at 7B on one GPU: every weight in bf16 (fp32 masters for the trainable part would not fit
beside HF's full logits at stage 2) and the loss from HF's labels path (logits at every position, upcast to fp32).
Text-only samples carry no image here (HF cannot take an image without its tokens), so the tower runs only for image
samples and only those towers are counted. BENCHMARKS.md lists where the two runs still differ.
"""

import gc
import json
import os
import sys
import tempfile
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO:  # `python bench/hf_baseline.py` from anywhere; first, even when PYTHONPATH has it, so that
    sys.path.insert(0, REPO)  # `bench` is the package, not bench/bench.py beside this script

from bench import bench as B  # noqa: E402
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from minillava.metrics import FlopModel, device_peak_flops  # noqa: E402
from minillava.step import meta_model  # noqa: E402

IMAGE_ID = 2  # HF's image token: an id the synthetic text never draws (bench.make_batch draws 3..vocab-1)


def to_hf_batch(batch: dict, image_tokens: int, max_len: int) -> dict:
    """minillava's collated micro-batch (one IMAGE_TOKEN_INDEX placeholder per image) in HF Llava's format: the
    placeholder expanded to `image_tokens` IMAGE_ID positions labelled -100, truncated to max_len after expansion
    (LLaVA's order, as minillava does), right-padded; pixel_values only for the samples that have an image."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        ids, labels = ids[mask], labels[mask]
        image = ids == IMAGE_TOKEN_INDEX
        reps = torch.where(image, image_tokens, 1)
        ids = torch.repeat_interleave(torch.where(image, IMAGE_ID, ids), reps)
        labels = torch.repeat_interleave(torch.where(image, IGNORE_INDEX, labels), reps)
        if (ids[max_len:] == IMAGE_ID).any():
            raise ValueError("model_max_length cuts through an image: HF Llava cannot take a partial image")
        rows.append((ids[:max_len], labels[:max_len], bool(image.any())))
    T = max(len(r[0]) for r in rows)
    out = {
        "input_ids": torch.zeros(len(rows), T, dtype=torch.long),
        "labels": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
    }
    for i, (ids, labels, _) in enumerate(rows):
        out["input_ids"][i, : len(ids)], out["labels"][i, : len(ids)], out["attention_mask"][i, : len(ids)] = (
            ids,
            labels,
            1,
        )
    has_image = torch.tensor([r[2] for r in rows])
    if has_image.any():
        out["pixel_values"] = batch["pixel_values"][has_image]
    return out


def build_hf_model(
    llm_cfg, vis_cfg, stage: int, gradient_checkpointing: bool, device: torch.device, dtype: torch.dtype
) -> LlavaForConditionalGeneration:
    """HF's Llava at these shapes (bench.model_configs: Vicuna-7B / CLIP-L/336, or tiny), random weights on
    `device`, LLaVA's trainable set for `stage`."""
    cfg = LlavaConfig(
        text_config=llm_cfg,
        vision_config=vis_cfg,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(vis_cfg.image_size // vis_cfg.patch_size) ** 2,
    )
    cfg.image_token_id = IMAGE_ID
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    model.requires_grad_(stage == 2)  # LLaVA's sets: stage 1 projector only, stage 2 LLM + projector
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def matmul_tflops(device: torch.device) -> float | None:
    """A measured ceiling: bf16 8192^3 matmuls per second, in TFLOP/s (CUDA only)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize(device)
    return round(20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)


def measure(args) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as out:
        cfg = B.bench_config(args, out)  # minillava's settings for this stage: the same batches, FLOPs and lengths
    flops = FlopModel.from_model(meta_model(cfg, *B.model_configs(args)))
    image_tokens, max_len = flops.image_tokens, cfg.train.model_max_length
    llm_cfg, vis_cfg = B.model_configs(args)
    batches = B.make_batches(cfg, args, vis_cfg.image_size, llm_cfg.vocab_size)
    hf = [to_hf_batch(b, image_tokens, max_len) for b in batches]
    if cuda:
        hf = [{k: v.pin_memory() for k, v in b.items()} for b in hf]
    ceiling = matmul_tflops(device)
    torch.manual_seed(args.seed)
    model = build_hf_model(llm_cfg, vis_cfg, args.stage, args.gradient_checkpointing, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, fused=True if cuda else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for step, batch in enumerate(hf):
        t0 = time.perf_counter()
        b = {k: v.to(device, non_blocking=v.is_pinned()) for k, v in batch.items()}
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(dtype)
        t_data = time.perf_counter() - t0
        loss = model(**b).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = loss.item()  # one host sync per step, as minillava's logging
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        seq = batch["attention_mask"].sum(1).tolist()
        rows.append(
            dict(
                dt=dt,
                data=t_data,
                seq=seq,
                positions=batch["input_ids"].numel(),
                labels=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                towers=len(batch.get("pixel_values", ())),
                loss=loss_val,
                step=step,
            )
        )
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    head = model.lm_head.weight.numel()
    del model, optimizer
    gc.collect()
    out = B.summarise(rows[args.warmup :], flops, head, device_peak_flops(device), peak_mem)
    return out | {"losses": [r["loss"] for r in rows], "matmul_tflops": ceiling} | B.environment(device, False)


def main(argv: list[str] | None = None) -> dict:
    args = B.parse(argv)
    if args.packing or args.compile or args.baseline:
        raise SystemExit("hf_baseline.py runs the padded HF model: --packing, --compile and --baseline do not apply")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    keys = ("stage", "layers", "batch", "gradient_checkpointing", "text", "sim_world", "tiny", "seed")
    record = {"what": "hf_baseline", **{k: getattr(args, k) for k in keys}, **measure(args)}
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
