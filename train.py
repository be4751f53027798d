"""Train a LLaVA-1.5 VLM with FSDP2 in a hand-written loop.

    torchrun --nproc_per_node 8 train.py --stage 1 [LLaVA flags...]   # projector pretraining (pretrain.sh)
    torchrun --nproc_per_node 8 train.py --stage 2 [LLaVA flags...]   # LLM + projector finetune (finetune.sh)
    bash configs/llava_v15_7b_lora.sh                                 # LoRA + projector (finetune_lora.sh)

Also runs as a plain `python train.py ...` (a 1-rank process group). Read top to bottom: train_step, then main."""

import functools
import gc
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from minillava import distributed as D
from minillava.checkpoint import Checkpointer
from minillava.config import Config, ConfigWarning, format_config, parse_args, save_config
from minillava.data import DataCollator, LazySupervisedDataset, load_image_processor, load_tokenizer
from minillava.formats import (
    check_model_files,
    check_paths,
    download,
    initial_state,
    local_folder,
    model_names,
    run_configs,
    run_manifest,
    run_settings,
)
from minillava.layout import Batch, LayoutCollator
from minillava.lora import add_lora, initial_lora_state
from minillava.memory import device_memory, plan_checkpointing
from minillava.metrics import FlopModel, MetricsLogger, StepRecord, device_peak_flops, peak_memory_gb
from minillava.model import LlavaModel, build_llava_from_config, parameter_report, set_trainable
from minillava.optim import build_optimizer, group_lrs, num_training_steps
from minillava.outputs import DISK_FULL, lock_output_dir, new_dirs, next_steps, save_final, unclaim_output_dir
from minillava.preemption import EXIT_CODE, Preempted, StopRequest, ignore_sigterm
from minillava.sampler import DistributedModalityLengthSampler

NO_LABEL_STEPS = 20  # a run whose first steps train no label token at all stops (nothing would be learnt)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def meta_model(cfg: Config, llm_config, vision_config) -> LlavaModel:
    """The run's LlavaModel on the meta device (no memory yet), frozen as the stage requires."""
    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        model = build_llava_from_config(
            llm_config,
            vision_config,
            run_settings(cfg),
            attn_implementation=t.attn_implementation,
            padding_free=t.padding_free,
        )
        if t.lora_enable:  # adapters on every Linear of the LLM body (find_all_linear_names)
            add_lora(model.llm.model, t.lora_r, t.lora_alpha, t.lora_dropout)
    set_trainable(
        model,
        tune_mm_mlp_adapter=m.tune_mm_mlp_adapter,
        freeze_mm_mlp_adapter=t.freeze_mm_mlp_adapter,
        freeze_backbone=m.freeze_backbone,
        lora=t.lora_enable,
    )
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


def build_model(
    cfg: Config,
    info: D.DistInfo,
    configs: tuple | None = None,
    *,
    random_weights_seed: int | None = None,
    checkpoint_layers: int | None = None,
):
    """Meta-device build -> freeze -> compile -> checkpointing -> fully_shard -> weights streamed from rank 0.

    configs: (llm_config, vision_config), default the flags' folders (formats.run_configs). random_weights_seed:
    read no weights, materialise seeded random ones (bench/bench.py). checkpoint_layers: with
    --gradient_checkpointing True, only the first K blocks (bench/bench.py --checkpoint_layers)."""
    t = cfg.train
    llm_config, vision_config = configs or run_configs(cfg)
    model = meta_model(cfg, llm_config, vision_config)
    D.print0(parameter_report(model))
    flops = FlopModel.from_model(model)
    if t.bf16:  # frozen weights need no fp32 master copy: store them in bf16 (LLaVA moves the tower to bf16 too)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if t.torch_compile:  # each block's forward; AC then checkpoints the compiled forward, FSDP2's hooks stay outside
        D.compile_blocks(model.decoder_layers(), t.torch_compile_backend)
    plan = plan_checkpointing(model, t, info.world_size, device_memory(info.device))
    D.print0(plan.describe())
    if t.gradient_checkpointing:  # True: every layer (or bench's first checkpoint_layers); auto: the plan's
        k = plan.layers if t.gradient_checkpointing == "auto" else checkpoint_layers
        D.apply_activation_checkpointing(model.decoder_layers()[:k])
    global_token = t.loss_reduction == "global_token"
    D.apply_fsdp(
        model,
        bf16=t.bf16,
        reshard_after_forward=t.reshard_after_forward,
        sum_gradients=global_token,
        mesh=D.device_mesh(info.device, t.hsdp),
    )
    if random_weights_seed is not None:
        init_random_weights(model, info.device, random_weights_seed)
        return model, flops
    state = initial_state(cfg, llm_config, vision_config) if info.is_main else None
    if state is not None and t.lora_enable:  # fresh adapters (B = 0: the run starts at the base model)
        state |= initial_lora_state(model, t.seed)
    D.materialize_and_load(model, state, info.device)  # only rank 0 read the files; the others get their shards
    return model, flops


def build_loader(cfg: Config, tokenizer, image_processor, info: D.DistInfo, num_image_tokens: int):
    """LLaVA's dataset + collator; the sampler gives each rank its micro-batches of LLaVA's grouped order."""
    d, t = cfg.data, cfg.train
    dataset = LazySupervisedDataset(
        d.data_path,
        tokenizer,
        image_processor,
        image_folder=d.image_folder,
        version=cfg.model.version,
        image_aspect_ratio=d.image_aspect_ratio,
        model_max_length=t.model_max_length,
        image_tokens=num_image_tokens,
    )
    lengths = dataset.modality_lengths if t.group_by_modality_length else dataset.lengths
    sampler = DistributedModalityLengthSampler(
        lengths,
        t.per_device_train_batch_size,
        info.world_size,
        info.rank,
        grad_accum=t.gradient_accumulation_steps,
        seed=t.seed,
        group_by_modality=t.group_by_modality_length,
        longest_first=t.longest_first,
    )
    collate = LayoutCollator(  # LLaVA's collator, then the final layout (expanded images, packing) on the host
        DataCollator(pad_token_id=tokenizer.pad_token_id, model_max_length=t.model_max_length),
        image_tokens=num_image_tokens,
        max_len=t.model_max_length,
        padding_free=t.padding_free,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=t.dataloader_num_workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=ignore_sigterm,  # a SIGTERM to the whole job stops the trainer, which stops its workers
        generator=torch.Generator().manual_seed(t.seed),  # worker seeds off the global RNG: resume stays exact
    )
    return loader, sampler


def micro_batch_stream(loader, sampler, start_epoch: int, device: torch.device):
    """Endless (epoch, batch, copy_wait) stream on `device`; set_epoch gives every epoch its own LLaVA order. On
    CUDA each batch is copied (from the DataLoader's pinned memory) on a side stream one batch ahead, so the copy
    overlaps the step that is computing; the compute stream waits for that copy only when it uses the batch.
    copy_wait() is the seconds the compute stream stood waiting for it, from device events (read it after the step
    has synchronised; always 0 on the CPU)."""

    def host_batches():
        epoch = start_epoch
        while True:
            sampler.set_epoch(epoch)
            for batch in loader:
                yield epoch, batch
            epoch += 1

    if device.type != "cuda":
        for epoch, batch in host_batches():
            yield epoch, batch.to(device), lambda: 0.0
        return
    copy_stream = torch.cuda.Stream(device)

    def start_copy(item):
        with torch.cuda.stream(copy_stream):
            batch = item[1].to(device)
        return item[0], batch, copy_stream.record_event()

    host = host_batches()
    ahead = start_copy(next(host))
    for item in host:
        (epoch, batch, copied), ahead = ahead, start_copy(item)
        compute = torch.cuda.current_stream(device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(copied)
        after.record(compute)
        for t in batch.values():  # the copies were allocated on the side stream; they are used on this one
            if isinstance(t, torch.Tensor):
                t.record_stream(compute)
        yield epoch, batch, lambda before=before, after=after: before.elapsed_time(after) / 1e3


def loop_numbers(micro: list[Batch], flops: FlopModel, stop: StopRequest) -> dict[str, float]:
    """The loop's per-rank numbers for train_step's reduction: the FLOPs and LLM tokens of the step's samples, and
    whether this rank was asked to stop, read after the step (a stop asked during a step ends the run after it)."""
    seq = [n for b in micro for n in b.seq_lens]
    return {"flops": sum(map(flops.sample_flops, seq)), "tokens": sum(seq), "stop": float(stop.requested)}


def read_window(window: list, seconds: float, global_batch: int, peak: float | None, info: D.DistInfo) -> list:
    """The steps queued since the last read, read from the device in one host sync, with the loop's measures. The
    host ran ahead of the device in between, so the window's wall time is shared evenly by its steps."""
    dt, mem = seconds / len(window), peak_memory_gb(info.device)
    rows = StepRecord.read([record for record, *_ in window])
    for row, (_, lrs, t_data, items) in zip(rows, window, strict=True):
        row.update(
            lr=next(iter(lrs.values())),
            **{f"lr_{name}": lr for name, lr in lrs.items()},
            step_time=dt,
            samples_per_s=global_batch / dt,
            tokens_per_s=row.pop("tokens") / dt,
            data_wait=t_data / dt,
            copy_wait=sum(wait() for _, _, wait in items) / dt,  # the device waiting for host-to-device copies
            peak_mem_gb=mem,
            mfu=row.pop("flops") / dt / (peak * info.world_size) if peak else None,
        )
    return rows


def fetch_models(cfg: Config, info: D.DistInfo) -> None:
    """Model flags given as hub ids (lmsys/vicuna-7b-v1.5, as LLaVA's scripts pass them): each node's first rank
    downloads what the node's hub cache lacks (formats.download; nothing when HF_HUB_OFFLINE=1) while the other ranks
    wait, then every rank finds them there and runs the start-up checks that read them (formats.check_model_files).
    Local folders need none of this (check_paths checked them)."""
    names = model_names(cfg)
    if not names:
        return
    failed = None
    if info.local_rank == 0:
        try:
            for flag, name in names.items():
                download(name, flag)
        except Exception as e:  # raised after the barrier: the waiting ranks must not hang
            failed = e
    D.barrier()
    if failed is not None:
        raise failed
    for flag, name in names.items():
        local_folder(name, flag)
    check_model_files(cfg)


class SampleError(ValueError):
    """A bad sample met in the training loop: only the rank that read it knows, so that rank reports it."""

    @classmethod
    def of(cls, e: ValueError) -> "SampleError":
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: the error is its last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        return cls(message)


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    if os.environ.get("RANK", "0") != "0":  # flag warnings once, from rank 0
        warnings.filterwarnings("ignore", category=ConfigWarning)
    cfg = parse_args(argv)
    check_paths(cfg)  # the start-up checks that read the disk (parse_args reads nothing)
    info = D.init_distributed(background=cfg.train.async_save)  # async checkpoints: D.background_group
    stop = StopRequest(watch_agent="TORCHELASTIC_RUN_ID" in os.environ)  # SIGTERM / dead torchrun: save and stop
    t = cfg.train
    logger = lock = ckpt = None
    made, started = new_dirs(t.output_dir), False  # a run that fails its start-up leaves no --output_dir behind
    try:
        fetch_models(cfg, info)  # hub ids: downloaded once per node, before anything is written to --output_dir
        lock = lock_output_dir(t.output_dir)  # one run per --output_dir, claimed before anything is written there
        seed_everything(t.seed)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # LLaVA ran with --tf32 True
        D.print0(format_config(cfg))
        m = cfg.model  # its flags keep the names given (a hub id is recorded as such); files come from local folders
        tokenizer = load_tokenizer(local_folder(m.model_name_or_path, "--model_name_or_path"), t.model_max_length)
        image_processor = load_image_processor(local_folder(m.vision_tower, "--vision_tower"))
        model, flops = build_model(cfg, info)
        loader, sampler = build_loader(cfg, tokenizer, image_processor, info, model.num_image_tokens)
        ga = t.gradient_accumulation_steps
        total_steps = num_training_steps(
            sampler.steps_per_epoch, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps
        )
        optimizer, scheduler = build_optimizer(model, t, total_steps)
        dtype = torch.bfloat16 if t.bf16 else torch.float32  # of the saved weights (LLaVA's: the training dtype)
        manifest = run_manifest(cfg, tokenizer) if info.is_main else None  # saved with checkpoints and outputs
        ckpt = Checkpointer(cfg, model, optimizer, scheduler, sampler, len(loader.dataset), dtype, manifest)
        start = ckpt.resume()  # 0 unless --resume_from_checkpoint finds a checkpoint
        global_batch = t.per_device_train_batch_size * ga * info.world_size
        D.print0(
            f"world {info.world_size} | global batch {global_batch} | {len(loader.dataset)} samples | "
            f"{sampler.steps_per_epoch} steps/epoch | {total_steps} steps"
        )
        started = True  # the start-up passed (model, data, resume): from here on the run writes into --output_dir
        if info.is_main:
            save_config(cfg, t.output_dir)
        peak = device_peak_flops(info.device)
        logger = MetricsLogger(
            t.output_dir,
            enabled=info.is_main,
            total_steps=total_steps,
            start_step=start,
            report_to=t.report_to,
            run_config=cfg.to_dict(),
        )
        stream = micro_batch_stream(loader, sampler, sampler.epoch, info.device)
        window, t_window = [], time.perf_counter()  # the steps queued since the last device read
        trained_tokens, stopping = 0.0, False
        for step in range(start, total_steps):
            stop.hold_for_test(step + 1)
            t0 = time.perf_counter()
            try:
                items = [next(stream) for _ in range(ga)]
            except ValueError as e:
                raise SampleError.of(e) from e
            micro = [batch for _, batch, _ in items]
            t_data = time.perf_counter() - t0  # the host waiting for the DataLoader
            lrs = group_lrs(optimizer)  # the lrs this step uses (the scheduler moves them on inside train_step)
            # The loop's numbers ride the step's one reduction, which also tells every rank whether any was asked
            # to stop. It is read (one host sync) only on steps that log, save or end the run: in between, the host
            # queues step after step and the device never waits for it.
            extra = functools.partial(loop_numbers, micro, flops, stop)
            window.append((train_step(model, micro, optimizer, scheduler, cfg, extra), lrs, t_data, items))
            log = (step + 1) % t.logging_steps == 0 or step == 0
            if log or step + 1 == total_steps or ckpt.due(step + 1):
                rows = read_window(window, time.perf_counter() - t_window, global_batch, peak, info)
                stopping = any(row.pop("stop") for row in rows)
                for done, row in enumerate(rows, step + 2 - len(rows)):
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"loss is {row['loss']} at step {done}: stopping (check labels, "
                                                 "--bf16 and the learning rate)")  # fmt: skip
                    trained_tokens += row["label_tokens"]  # every rank's (the reduction): all ranks agree
                    if trained_tokens == 0 and done - start >= min(NO_LABEL_STEPS, total_steps - start):
                        raise ValueError(
                            f"no label token in {done - start} steps: every sample lost its answers (check "
                            f"--model_max_length {t.model_max_length} against the {model.num_image_tokens} "
                            "positions an image takes, and the skipped samples named above)"
                        )
                    logger.record(done, row, log=done == step + 1 and (log or stopping))
                window, t_window = [], time.perf_counter()
            saved = ckpt.save_if_due(step + 1)
            if window or not stopping or step + 1 == total_steps:
                continue
            saved = saved or ckpt.save(step + 1)
            ckpt.wait()  # the checkpoint is written and published before the exit
            raise Preempted(
                f"stopped after step {step + 1} of {total_steps} ({stop.reason or 'another rank was asked to'}): "
                f"saved {saved}; to continue, run the same command with --resume_from_checkpoint auto"
            )
        logger.close()
        ckpt.wait()  # a checkpoint still being written is finished and published first
        save_final(model, cfg, tokenizer, dtype, manifest=manifest)
        D.print0(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; {logger.summary()}\n{next_steps(cfg)}")
    finally:
        if logger is not None:
            logger.close()  # ends the progress bar before any error is printed
        if ckpt is not None:
            ckpt.close()  # after an error: lets a checkpoint being written finish (no collective)
        if info.is_main and not started:
            unclaim_output_dir(lock, t.output_dir, made)  # the lock file and the folders this run made
        elif lock is not None:
            lock.close()  # releases the lock (a killed run's lock goes with its process)
        stop.close()
        D.cleanup(info)
        # The model, optimizer and process groups sit in reference cycles (FSDP2's hooks): free them now, in this
        # process, so a later main() in it (tests, notebooks) starts clean and its DataLoader workers, forked
        # with them, never run their destructors (one did, and segfaulted, in test_faults).
        gc.collect()


def cli(argv: list[str]) -> int:
    """`python train.py` / torchrun: main() with what a user can fix as one line on stderr instead of a traceback.
    A bad flag, path or file (ValueError) is the same on every rank: the first rank of each node prints it; a bad
    sample (SampleError) is printed by the rank that read it; a full disk (OSError ENOSPC / EDQUOT) like a bad flag.
    Preemption exits with EXIT_CODE."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        main(argv)
    except Preempted as e:
        if first:
            print(e, file=sys.stderr, flush=True)
        return EXIT_CODE
    except ValueError as e:
        if first or isinstance(e, SampleError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        if first:  # the save's own one-line message (minillava/outputs.py removed_on_error)
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
