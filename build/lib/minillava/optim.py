"""AdamW parameter groups and LLaVA's warmup + cosine learning-rate schedule (llava_trainer.py create_optimizer,
HF get_cosine_schedule_with_warmup).

Pure schedule functions plus build_optimizer; no torch.distributed. Works on plain and FSDP2 (DTensor) parameters.
"""

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from minillava.config import TrainArgs

ADAM_BETAS = (0.9, 0.999)  # HF TrainingArguments defaults behind optim=adamw_torch
ADAM_EPS = 1e-8


def _is_norm(module: nn.Module) -> bool:
    # HF ALL_LAYERNORM_LAYERS is [nn.LayerNorm] + LlamaRMSNorm (appended by modeling_llama); match RMSNorms by name.
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def param_groups(
    model: nn.Module, *, weight_decay: float, learning_rate: float, mm_projector_lr: float | None
) -> list[dict]:
    """LLaVATrainer.create_optimizer groups over trainable params: {decay, no_decay} x {LLM, projector}."""
    # Norm params are matched by identity, not by name, so wrapper prefixes (FSDP2, checkpoint_wrapper) are harmless.
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters()}
    # Order as LLaVA builds them: decay, no-decay, then the projector pair (only with mm_projector_lr).
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(False, True): [], (False, False): [], (True, True): [],
                                                            (True, False): []}  # fmt: skip
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = id(p) not in norm_ids and "bias" not in name  # LLaVA: any name containing "bias"
            buckets[(mm_projector_lr is not None and "mm_projector" in name, decay)].append(p)
    return [
        {
            "name": ("projector_" if projector else "") + ("decay" if decay else "no_decay"),
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": mm_projector_lr if projector else learning_rate,
        }
        for (projector, decay), params in buckets.items()
        if params
    ]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """HF get_cosine_schedule_with_warmup: linear 0 -> 1 over warmup, then half a cosine to 0; step 0 gives 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF TrainingArguments.get_warmup_steps: ceil(ratio x total), e.g. 156 for 5198 steps at 0.03 (finetune.sh)."""
    return math.ceil(total_steps * warmup_ratio)


def num_training_steps(steps_per_epoch: int, *, num_train_epochs: float, max_steps: int = -1) -> int:
    """HF Trainer's step count: max_steps when > 0, else ceil(epochs x optimizer steps per epoch)."""
    return max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)


def build_optimizer(
    model: nn.Module, train_args: TrainArgs, total_steps: int, fused: bool | None = None
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """torch AdamW over param_groups plus the per-step LambdaLR; call scheduler.step() after every optimizer step.
    fused: AdamW's fused kernel (default: when every parameter is on CUDA; the planner asks for it on fake ones)."""
    groups = param_groups(
        model,
        weight_decay=train_args.weight_decay,
        learning_rate=train_args.learning_rate,
        mm_projector_lr=train_args.mm_projector_lr,
    )
    if not groups:
        raise ValueError("no trainable parameters: check --tune_mm_mlp_adapter / --freeze_* flags")
    # fused needs every param on CUDA (DTensor.device is its local shard's device); elsewhere torch's default.
    if fused is None:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"]) or None
    optimizer = torch.optim.AdamW(groups, lr=train_args.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)
    warmup = warmup_steps(total_steps, train_args.warmup_ratio)
    # LambdaLR applies lr_multiplier(0) = 0 at construction: LLaVA's first update runs with lr 0 (HF's cosine schedule).
    scheduler = LambdaLR(optimizer, partial(lr_multiplier, warmup_steps=warmup, total_steps=total_steps))
    return optimizer, scheduler


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr per named param group, for logging."""
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
