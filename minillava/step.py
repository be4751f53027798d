"""What every rank builds and runs: the model laid out for training (sharded_model, build_model) and one optimizer
step (train_step). train.py composes them with the data and the loop; `python -m minillava.plan` traces the same two
on fake tensors to say whether a run will fit."""

import os

import torch

from minillava import distributed as D
from minillava.config import Config
from minillava.formats.llava import run_settings
from minillava.formats.run import initial_state
from minillava.layout import Batch
from minillava.memory import CheckpointPlan, device_memory, plan_checkpointing
from minillava.metrics import FlopModel, StepRecord
from minillava.model import LlavaModel, build_llava_from_config, parameter_report, set_trainable


def train_step(model, micro_batches: list[Batch], optimizer, scheduler, cfg: Config, extra=None) -> StepRecord:
    """One optimizer step over gradient_accumulation_steps micro-batches. It reads nothing from the device: token
    counts are host ints from the layout, and the step's metrics are summed over ranks in one collective and left on
    the device (a StepRecord: the loop reads a window of steps at once). extra(): more per-rank host numbers to sum
    in that collective (the loop's FLOPs, tokens and stop flag), asked for after the optimizer step."""
    global_token = cfg.train.loss_reduction == "global_token"
    counts = [b.num_label_tokens for b in micro_batches]
    if global_token:  # every rank's label tokens of the whole step, before any backward (torchtitan style)
        n_step = D.all_reduce_on_device([float(sum(counts))]).clamp(min=1)  # stays on the device: no host read
    losses = []
    for batch in micro_batches:
        loss_sum, n_tok = model(**batch)
        # The one place the loss is normalised. llava (default, LLaVA's HF Trainer): token mean per micro-batch, / GA
        # here, and FSDP averages over ranks. global_token: sum / all label tokens of the step (FSDP sums).
        loss = loss_sum / n_step if global_token else loss_sum / max(n_tok, 1) / len(micro_batches)
        loss.backward()  # a fully masked micro-batch has loss 0 and zero gradients, never NaN
        losses.append(loss.detach())
    grad_norms = D.clip_grad_norm(model, cfg.train.max_grad_norm)  # the total and per component (llm, projector)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # llava: the mean of micro-batch means (/ ranks below); global_token: this rank's share of the global token mean.
    sums = {"loss": torch.stack(losses).sum(), "label_tokens": sum(counts), "empty_micro_batches": counts.count(0),
            "text_only_samples": sum(b.num_text_only for b in micro_batches),
            "lost_label_tokens": sum(b.num_lost_labels for b in micro_batches)}  # fmt: skip
    sums |= extra() if extra else {}
    reduced = D.all_reduce_on_device(list(sums.values()))
    if not global_token:
        reduced[0] /= D.world_size()
    norms = torch.stack(list(grad_norms.values())).to(reduced)
    return StepRecord([*sums, *grad_norms], torch.cat([reduced, norms]))


def evaluate(model, batches, device: torch.device) -> tuple[float, int]:
    """The validation loss: (token mean over every rank's label tokens, those tokens), without gradients
    and in eval mode (LoRA dropout off), in one collective; the same number as the training loss of the same samples
    and weights. `batches`: this rank's micro-batches (train.build_eval_loader: all ranks run as many)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = torch.zeros((), device=device, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            batch_loss, n_tok = model(**batch.to(device))
            loss_sum += batch_loss.double()
            tokens += n_tok
    model.train(was_training)
    total, n = D.all_reduce([loss_sum, float(tokens)])
    return total / max(n, 1), int(n)


def meta_model(cfg: Config, llm_config, vision_config) -> LlavaModel:
    """The run's LlavaModel on the meta device (no memory yet), frozen as the stage requires."""
    m, t = cfg.model, cfg.train
    settings = run_settings(cfg)
    with torch.device("meta"):
        lora = (t.lora_r, t.lora_alpha, t.lora_dropout) if t.lora_enable else None  # find_all_linear_names
        model = build_llava_from_config(llm_config, vision_config, settings, attn_implementation=t.attn_implementation,
                                        padding_free=t.padding_free, lora=lora)  # fmt: skip
    set_trainable(model, tune_mm_mlp_adapter=m.tune_mm_mlp_adapter, freeze_mm_mlp_adapter=t.freeze_mm_mlp_adapter,
                  freeze_backbone=m.freeze_backbone, lora=t.lora_enable)  # fmt: skip
    return model


def init_random_weights(model: LlavaModel, device: torch.device, seed: int) -> None:
    """Materialise a sharded model on `device` with seeded random weights (no file is read): N(0, 0.02) matrices,
    zero biases, unit norm weights, then the non-pretrained init. Each rank draws its own local shard."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("bias"):
                local.zero_()
            elif p.ndim == 1:  # norm weights
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02)
        model.init_non_pretrained()  # RoPE / CLIP position buffers, projector default init


def sharded_model(
    cfg: Config,
    info: D.DistInfo,
    configs: tuple,
    *,
    lengths: list[int] | None = None,
    device_bytes: int | None = None,
    checkpoint_layers: int | None = None,
    local_world_size: int | None = None,
) -> tuple[LlavaModel, FlopModel, CheckpointPlan]:
    """Meta-device build -> freeze -> compile -> checkpointing -> fully_shard: the run's layout, no memory yet.

    lengths: the LLM lengths of the largest micro-batch's samples (the checkpointing plan's; default
    per_device_train_batch_size samples of model_max_length).
    device_bytes: the memory the plan fits into (default this rank's device). checkpoint_layers: with
    --gradient_checkpointing True, only the first K blocks (bench/bench.py --checkpoint_layers). local_world_size:
    the ranks of a node for --hsdp (default torchrun's LOCAL_WORLD_SIZE)."""
    t = cfg.train
    model = meta_model(cfg, *configs)
    if info.is_main:
        print(parameter_report(model), flush=True)
    flops = FlopModel.from_model(model)
    if t.bf16:  # frozen weights need no fp32 master copy: store them in bf16 (LLaVA moves the tower to bf16 too)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))  # the ranks of a node
    device_bytes = device_memory(info.device) if device_bytes is None else device_bytes
    plan = plan_checkpointing(model, t, local if t.hsdp else info.world_size, device_bytes, lengths)  # shard group
    if info.is_main:
        print(plan.describe(), flush=True)
    layers = plan.layers if t.gradient_checkpointing == "auto" else checkpoint_layers  # True: all (or bench's first K)
    D.parallelize(model, t, info.device, checkpoint_layers=layers if t.gradient_checkpointing else 0,
                  local_world_size=local)  # fmt: skip
    return model, flops, plan


def build_model(
    cfg: Config,
    info: D.DistInfo,
    configs: tuple,
    *,
    lengths: list[int] | None = None,
    random_weights_seed: int | None = None,
    checkpoint_layers: int | None = None,
) -> tuple[LlavaModel, FlopModel]:
    """sharded_model -> weights streamed from rank 0 (every rank keeps its shards).

    configs: (llm_config, vision_config), the flags' (formats/run.py run_configs). random_weights_seed: read no
    weights, materialise seeded random ones (bench/bench.py)."""
    llm_config, vision_config = configs
    model, flops, _ = sharded_model(cfg, info, configs, lengths=lengths, checkpoint_layers=checkpoint_layers)
    if random_weights_seed is not None:
        init_random_weights(model, info.device, random_weights_seed)
        return model, flops
    state = initial_state(cfg, llm_config, vision_config, model) if info.is_main else None
    D.materialize_and_load(model, state, info.device)  # only rank 0 read the files; the others get their shards
    return model, flops
