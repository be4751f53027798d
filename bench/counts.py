"""Deterministic CPU counts of one training step, minillava beside the plain-transformers baseline on the same batch:
executed / needed FLOPs, bytes saved for backward per token, and host-device reads per step. Not timings: these
numbers depend only on the code and the shapes, so they prove a design on a machine without a GPU.

    python bench/counts.py                 # the table (markdown), then one JSON line per row
    python bench/counts.py --tiny          # tiny shapes, seconds (tests/test_bench.py)

Shapes: a Llama of hidden 512 x 4 layers (MLP 1376, 8 heads, vocab 32000) and a CLIP of hidden 256 x 4 layers at
336 px / 14 (576 patches, 3 layers run), fp32; one micro-batch of 4 image samples of 607, 764, 921 and 1077 LLM
tokens (1 + 576 + text). Every configuration trains the same batch, so the rows compare one to one.

- executed / needed: torch.utils.flop_counter.FlopCounterMode over the step, over the FLOPs the step needs (the same
  model on each sample alone: its real tokens only, no checkpointing, lm_head and plain cross-entropy on the labelled
  rows only, one backward; the tower on the batch's images once). Attention inside SDPA's fused CPU kernel is not
  counted by FlopCounterMode on either side.
- saved bytes / token: every tensor autograd saves during the step's forward, counted once per storage, parameters
  excluded, over the real LLM tokens.
- trainable params: the parameters the optimizer updates. The LoRA rows (--lora_enable, finetune_lora.sh's flags with
  r = hidden / 32, its 128 at 7B's 4096; alpha 2r) train adapters + projector on the same stage-2 batch.
- host reads: .item / .tolist / .cpu / bool, int or float of a tensor / nonzero / boolean-mask indexing inside the
  step and the loop's read of its metrics, as on a logging step (steps that do not log read nothing; torch.optim's
  own step counters excluded).
"""

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import bench as B  # noqa: E402
from bench.hf_baseline import build_hf_model, to_hf_batch  # noqa: E402
from minillava import distributed as D  # noqa: E402
from minillava import step as S  # noqa: E402
from minillava.config import parse_args  # noqa: E402
from minillava.formats import run_settings  # noqa: E402
from minillava.lora import add_lora  # noqa: E402
from minillava.model import build_llava_from_config, set_trainable, splice  # noqa: E402
from minillava.optim import build_optimizer  # noqa: E402

READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.any, torch.Tensor.all, torch.masked_select,
}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Counts the host-device synchronisations made inside the mode (torch.optim's own excluded); `where` says
    which function and line made each one."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        reads = func in READS and not (func in (torch.Tensor.any, torch.Tensor.all) and isinstance(out, torch.Tensor))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            items = args[1] if isinstance(args[1], tuple) else (args[1],)
            reads = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
        if reads and not self._in_optimizer():
            frame = sys._getframe(1)
            self.where.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return out

    @staticmethod
    def _in_optimizer() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "/torch/optim/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False


class SavedBytes:
    """Bytes autograd saves for the backward inside the context, once per storage, parameters excluded."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def needed_flops(model, batch) -> int:
    """The FLOPs a step on `batch` (a minillava.layout.Batch) needs, run through `model`, a plain unsharded padded
    LlavaModel: the tower and projector on the batch's images once, then the LLM on each sample alone (its real
    tokens), lm_head and plain F.cross_entropy on its labelled rows, one backward for all."""
    labels = torch.full_like(batch.input_ids, -100).view(-1)
    labels[batch.label_pos + 1] = batch.label_ids  # the collated (unshifted) labels
    n = batch.seq_lens
    starts = [sum(n[:i]) for i in range(len(n))] if batch.cu_seqlens is not None else [i * batch.max_len for i in
                                                                                       range(len(n))]  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        feats = model.encode_images(batch.pixel_values, torch.float32)  # (N, P, D)
        loss = 0.0
        for s, length in zip(starts, n, strict=True):
            e = s + length
            ids, lab = batch.input_ids.view(-1)[s:e][None], labels[s:e]
            mine = (batch.image_pos >= s) & (batch.image_pos < e)
            embeds = splice(model.llm.get_input_embeddings()(ids), feats, batch.image_pos[mine] - s,
                            batch.image_rows[mine])  # fmt: skip
            hidden = model.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
            keep = lab[1:] != -100
            loss = loss + F.cross_entropy(model.llm.lm_head(hidden[:-1][keep]).float(), lab[1:][keep], reduction="sum")
        loss.backward()
    return counter.get_total_flops()


def configs(tiny: bool) -> tuple[LlamaConfig, CLIPVisionConfig]:
    if tiny:
        llm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
        vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28)
    else:
        llm = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   vocab_size=32000)  # fmt: skip
        vis = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=336)  # fmt: skip
    llm_cfg = LlamaConfig(**llm, num_key_value_heads=llm["num_attention_heads"], max_position_embeddings=4096,
                          rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0)  # fmt: skip
    return llm_cfg, CLIPVisionConfig(**vis, patch_size=14, projection_dim=32, hidden_act="quick_gelu")


def raw_batch(stage: int, tiny: bool, llm_cfg, vis_cfg) -> dict:
    text = [3, 9, 15, 21] if tiny else [30, 187, 344, 500]  # LLM lengths 1 + 576 + text: 607 ... 1077
    return B.make_batch(text, stage, vis_cfg.image_size, llm_cfg.vocab_size, torch.Generator().manual_seed(0))


def run_config(stage: int, *flags: str):
    """The trainer's Config for `stage` with `flags`; the paths are placeholders (nothing is read)."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--stage", str(stage), "--output_dir", out, "--model_name_or_path", "-", "--vision_tower", "-",
                "--data_path", "-", "--image_folder", "-", *flags]  # fmt: skip
        return parse_args(argv + (["--init_projector", "random"] if stage == 2 else []))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ours(stage: int, checkpointing: bool, packing: bool, tiny: bool, lora: bool = False) -> dict:
    llm_cfg, vis_cfg = configs(tiny)
    r = llm_cfg.hidden_size // 32
    lora_flags = ["--lora_enable", "True", "--lora_r", str(r), "--lora_alpha", str(2 * r), "--mm_projector_lr",
                  "2e-5"] if lora else []  # fmt: skip
    cfg = run_config(stage, "--bf16", "False", "--per_device_train_batch_size", "4", "--gradient_checkpointing",
                     str(checkpointing), "--padding_free", str(packing), *lora_flags)  # fmt: skip
    info = D.init_distributed()
    try:
        model, _ = S.build_model(cfg, info, (llm_cfg, vis_cfg), random_weights_seed=0)
        optimizer, scheduler = build_optimizer(model, cfg.train, 2)
        batch = model.layout(raw_batch(stage, tiny, llm_cfg, vis_cfg))
        reads, saved = HostReads(), SavedBytes()
        with FlopCounterMode(display=False) as flops, reads, saved:
            S.train_step(model, [batch], optimizer, scheduler, cfg)["loss"]  # read as a logging step reads it
        plain = build_llava_from_config(llm_cfg, vis_cfg, run_settings(cfg))
        if lora:
            add_lora(plain.llm.model, r, 2 * r, cfg.train.lora_dropout)
        set_trainable(plain, tune_mm_mlp_adapter=cfg.model.tune_mm_mlp_adapter, lora=lora)
        needed = needed_flops(plain, batch)
        tokens = sum(batch.seq_lens)
        return row("minillava_lora" if lora else "minillava", stage, checkpointing, packing, flops.get_total_flops(),
                   needed, saved.total, tokens, len(reads.where), _trainable(model))  # fmt: skip
    finally:
        D.cleanup(info)


def baseline(stage: int, checkpointing: bool, tiny: bool) -> dict:
    """HF LlavaForConditionalGeneration on the same batch (bench/hf_baseline.py's model and loop), padded."""
    llm_cfg, vis_cfg = configs(tiny)
    torch.manual_seed(0)
    model = build_hf_model(llm_cfg, vis_cfg, stage, checkpointing, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    raw = raw_batch(stage, tiny, llm_cfg, vis_cfg)
    P = (vis_cfg.image_size // vis_cfg.patch_size) ** 2
    hf = to_hf_batch(raw, P, 2048)
    reads, saved = HostReads(), SavedBytes()
    with FlopCounterMode(display=False) as flops, reads, saved:
        model(**hf).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    cfg = run_config(stage, "--padding_free", "False")  # the same needed FLOPs as minillava's on this batch
    plain = build_llava_from_config(llm_cfg, vis_cfg, run_settings(cfg))
    set_trainable(plain, tune_mm_mlp_adapter=stage == 1)
    batch = plain.layout(raw)
    tokens = sum(batch.seq_lens)
    return row("hf_baseline", stage, checkpointing, False, flops.get_total_flops(), needed_flops(plain, batch),
               saved.total, tokens, len(reads.where), _trainable(model))  # fmt: skip


def row(what, stage, checkpointing, packing, executed, needed, saved, tokens, reads, trainable) -> dict:
    return {
        "what": what, "stage": stage, "gradient_checkpointing": checkpointing, "packing": packing,
        "executed_over_needed_flops": round(executed / needed, 4), "executed_gflop": round(executed / 1e9, 2),
        "saved_bytes_per_token": round(saved / tokens), "host_reads_per_step": reads, "trainable_params": trainable,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for stage in (1, 2):
        for checkpointing in (False, True):
            rows.append(baseline(stage, checkpointing, args.tiny))
            rows += [ours(stage, checkpointing, packing, args.tiny) for packing in (False, True)]
    rows += [ours(2, checkpointing, True, args.tiny, lora=True) for checkpointing in (False, True)]  # beside stage 2
    print("| run | stage | AC | packing | executed / needed FLOPs | saved bytes / token | host reads / step | "
          "trainable params |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['what']} | {r['stage']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
              f"{'yes' if r['packing'] else 'no'} | {r['executed_over_needed_flops']} | {r['saved_bytes_per_token']} | "
              f"{r['host_reads_per_step']} | {r['trainable_params']:,} |")  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
