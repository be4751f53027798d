"""Step metrics: VLM-aware FLOPs/MFU, peak memory, and the JSONL / wandb / tqdm sinks (rank 0 only).

VLM-aware MFU counts what the step really computes, per sample (no recompute counted, attention causal):
  vision tower: forward only, and only the layers up to mm_vision_select_layer;
  projector: forward + backward when trainable, forward only when frozen;
  LLM: 6*N*T when trained (stage 2); 4*N*T when frozen (stage 1: forward + input-gradient backward, no weight grads).
bench/hf_baseline.py (the plain-transformers baseline) is counted with this same model, so the two compare."""

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from minillava.backbones import tied_embeddings

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or unknown GPUs: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class FlopModel:
    """Parameter counts needed for the FLOP formula, read once from the (unsharded-shape) model."""

    llm_matmul: int  # LLM parameters used in matmuls: everything but the input embedding, plus lm_head
    llm_layers: int
    hidden: int
    vit_layer: int  # parameters of one vision encoder layer
    vit_layers_run: int
    vit_hidden: int
    vit_tokens: int  # tokens the tower processes per image (patches + CLS)
    projector: int
    image_tokens: int  # tokens each image becomes in the LLM sequence
    llm_trainable: bool
    projector_trainable: bool

    @classmethod
    def from_model(cls, model: nn.Module) -> "FlopModel":
        llm, tower = model.llm, model.vision_tower
        emb = llm.get_input_embeddings().weight.numel()
        vcfg = tower.config
        trainable = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
        return cls(
            llm_matmul=_count(llm) - (0 if tied_embeddings(llm) else emb),  # a tied lm_head is counted once
            llm_layers=llm.config.num_hidden_layers,
            hidden=llm.config.hidden_size,
            vit_layer=_count(tower.encoder.layers[0]),
            vit_layers_run=model.tower_layers_run,
            vit_hidden=vcfg.hidden_size,
            vit_tokens=(vcfg.image_size // vcfg.patch_size) ** 2 + model.tower_cls,  # CLIP's CLS; SigLIP has none
            projector=_count(model.mm_projector),
            image_tokens=model.num_image_tokens,
            llm_trainable=trainable(llm.model.layers),
            projector_trainable=trainable(model.mm_projector),
        )

    def tower_flops(self) -> float:
        """FLOPs of one image through the tower (forward, the layers that run) and the projector."""
        n = self.vit_tokens
        vit = 2 * self.vit_layer * self.vit_layers_run * n + 4 * self.vit_layers_run * n * n * self.vit_hidden
        return vit + (6 if self.projector_trainable else 2) * self.projector * self.image_tokens

    def sample_flops(self, seq_len: int) -> float:
        """FLOPs of one sample whose spliced LLM sequence has `seq_len` tokens (vision tower always runs)."""
        attn_fwd = 4 * self.llm_layers * seq_len * seq_len * self.hidden / 2
        llm = (6 if self.llm_trainable else 4) * self.llm_matmul * seq_len + 3 * attn_fwd
        return self.tower_flops() + llm


class StepRecord(Mapping):
    """One training step's numbers, reduced over ranks and left on the device (no host sync when made). Reading a
    field reads them all; StepRecord.read reads a whole window of steps in one host sync."""

    def __init__(self, names: list[str], values: torch.Tensor) -> None:
        self.names, self.values, self._host = names, values, None

    @staticmethod
    def read(records: list["StepRecord"]) -> list[dict[str, float]]:
        rows = torch.stack([r.values for r in records]).tolist()  # the one host sync
        for record, row in zip(records, rows, strict=True):
            record._host = dict(zip(record.names, row, strict=True))
        return [dict(r._host) for r in records]

    def __getitem__(self, name: str) -> float:
        if self._host is None:
            StepRecord.read([self])
        return self._host[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last reset, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def console_line(step: int, total: int, m: dict) -> str:
    """One logging step as the console shows it (the JSONL keeps every field)."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    children = ", ".join(f"{k.removeprefix('grad_norm_')} {v:.3g}" for k, v in m.items() if k.startswith("grad_norm_"))
    parts.append(f"grad norm {m['grad_norm']:.3g}" + (f" ({children})" if children else ""))
    parts += [f"{m['samples_per_s']:.1f} samples/s", f"{m['tokens_per_s']:,.0f} tokens/s"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts += [f"peak {m['peak_mem_gb']:.1f} GB", f"data wait {100 * m['data_wait']:.0f}%",
              f"text-only {m['text_only_samples']:.0f}", f"labels cut {m['lost_label_tokens']:.0f}"]  # fmt: skip
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """A wall time as people read it: 4.2 s, 12 min 5 s, 3 h 20 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class MetricsLogger:
    """Rank-0 sink: a JSONL file in output_dir always, wandb with --report_to wandb (imported lazily), tqdm bar and
    a console line per logging step. `loss` is the mean over the steps since the previous log, as HF Trainer logs
    it; the other fields are the logging step's. summary() is the end-of-run report."""

    def __init__(
        self, output_dir: str, *, enabled: bool, total_steps: int, start_step: int, report_to: str, run_config: dict
    ) -> None:
        self.enabled = enabled
        self.wandb = None
        self.bar = None
        self.total_steps, self.window = total_steps, []
        self.steps = self.samples = self.tokens = self.peak = 0.0
        self.start = time.perf_counter()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        if report_to == "wandb":
            import wandb  # optional, checked at start-up (formats.check_paths); WANDB_MODE=offline needs no network

            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "minillava"), config=run_config, dir=output_dir
            )
        from tqdm import tqdm

        # a progress bar on a terminal; in a log file (stderr redirected) its redraws would be most of the file, and
        # the console line of every logging step says the same
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())  # fmt: skip

    def record(self, step: int, metrics: dict[str, float], *, log: bool) -> None:
        """Every step: count it (window loss, totals); log=True: write the record and the console line."""
        self.window.append(metrics["loss"])
        self.steps += 1
        self.samples += metrics["samples_per_s"] * metrics["step_time"]
        self.tokens += metrics["tokens_per_s"] * metrics["step_time"]
        self.peak = max(self.peak, metrics["peak_mem_gb"])
        if self.bar is not None:
            self.bar.update(1)
        if not (log and self.enabled):
            return
        metrics = {**metrics, "loss": sum(self.window) / len(self.window)}
        self.window = []
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.write(console_line(step, self.total_steps, metrics))
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")

    def record_eval(self, step: int, loss: float, tokens: int) -> None:
        """The validation loss after `step`: a metrics.jsonl record of its own, wandb's eval/loss, a console line."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), "eval_loss": loss, "eval_tokens": tokens}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({"eval/loss": loss, "eval/tokens": tokens}, step=step)
        self.bar.write(f"eval after step {step}/{self.total_steps} | eval_loss {loss:.4f} | {tokens:,} label tokens")

    def summary(self) -> str:
        """Time, steps, mean throughput and peak memory of this run (resumed runs: since the resume)."""
        wall = time.perf_counter() - self.start
        return (f"trained {self.steps:.0f} steps in {duration(wall)}: {self.samples / wall:.1f} samples/s, "
                f"{self.tokens / wall:,.0f} tokens/s on average; peak memory {self.peak:.1f} GB per rank")  # fmt: skip

    def close(self) -> None:
        """End the progress bar, the JSONL file and wandb; idempotent (train.main also calls it on errors)."""
        if not self.enabled:
            return
        self.enabled = False
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
