"""Train a LLaVA-1.5 VLM with FSDP2 in a hand-written loop.

    torchrun --nproc_per_node 8 train.py --stage 1 [LLaVA flags...]   # projector pretraining (pretrain.sh)
    torchrun --nproc_per_node 8 train.py --stage 2 [LLaVA flags...]   # LLM + projector finetune (finetune.sh)
    bash configs/llava_v15_7b_lora.sh                                 # LoRA + projector (finetune_lora.sh)

Also runs as a plain `python train.py ...` (a 1-rank process group). One optimizer step and the model it trains are
minillava/step.py's (train_step, build_model); this file reads top to bottom: the data, the loop, main."""

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # --help at once: argparse prints it and
    from minillava.config import parse_args  # exits before torch is imported

    parse_args(sys.argv[1:])

import functools
import gc
import json
import math
import os
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from minillava import distributed as D
from minillava.atomic import DISK_FULL
from minillava.checkpoint import Checkpointer
from minillava.config import Config, format_config, read_flags, save_config
from minillava.data import (
    DataCollator,
    EvalSamples,
    LazySupervisedDataset,
    load_image_processor,
    load_tokenizer,
    longest_samples,
)
from minillava.formats.manifest import run_manifest
from minillava.formats.run import prepare_models
from minillava.layout import Batch, LayoutCollator
from minillava.metrics import FlopModel, MetricsLogger, StepRecord, device_peak_flops, duration, peak_memory_gb
from minillava.optim import build_optimizer, group_lrs, num_training_steps
from minillava.output_dir import OutputDirClaim, clear_output_dir
from minillava.outputs import next_steps, save_final
from minillava.preemption import Preempted, StopRequest, ignore_stop_signals
from minillava.resume import resume
from minillava.sampler import DistributedModalityLengthSampler, eval_batches
from minillava.step import build_model, evaluate, train_step

NO_LABEL_STEPS = 20  # a run whose first steps train no label token at all stops (nothing would be learnt)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_dataset(cfg: Config, tokenizer, image_processor, num_image_tokens: int, data_path: str | None = None):
    """LLaVA's LazySupervisedDataset of --data_path (or data_path: the validation set's)."""
    d = cfg.data
    return LazySupervisedDataset(
        data_path or d.data_path,
        tokenizer,
        image_processor,
        image_folder=d.image_folder,
        version=cfg.model.version,
        image_aspect_ratio=d.image_aspect_ratio,
        model_max_length=cfg.train.model_max_length,
        image_tokens=num_image_tokens,
        data_flag="--eval_data_path" if data_path else "--data_path",
    )


def largest_micro_batch(cfg: Config, dataset: LazySupervisedDataset) -> list[int]:
    """The LLM lengths of the largest micro-batch the sampler can make (the memory plan's): the longest samples."""
    t = cfg.train
    return longest_samples(dataset.records, t.per_device_train_batch_size, tokenizer=dataset.tokenizer,
                           version=dataset.version, image_tokens=dataset.image_tokens, max_len=t.model_max_length)


def build_loader(cfg: Config, tokenizer, image_processor, info: D.DistInfo, num_image_tokens: int, dataset=None):
    """LLaVA's dataset (or `dataset`, built by build_dataset) + collator; the sampler gives each rank its
    micro-batches of LLaVA's grouped order."""
    t = cfg.train
    dataset = dataset or build_dataset(cfg, tokenizer, image_processor, num_image_tokens)
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
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator(cfg, tokenizer, num_image_tokens),
        num_workers=t.dataloader_num_workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,  # SIGTERM / Ctrl-C to the whole job stops the trainer, which stops them
        generator=torch.Generator().manual_seed(t.seed),  # worker seeds off the global RNG: resume stays exact
    )
    return loader, sampler


def collator(cfg: Config, tokenizer, num_image_tokens: int) -> LayoutCollator:
    """LLaVA's collator, then the final layout (expanded images, packing) on the host."""
    t = cfg.train
    return LayoutCollator(
        DataCollator(pad_token_id=tokenizer.pad_token_id, model_max_length=t.model_max_length),
        image_tokens=num_image_tokens,
        max_len=t.model_max_length,
        padding_free=t.padding_free,
    )


def build_eval_loader(cfg: Config, dataset: LazySupervisedDataset, info: D.DistInfo) -> DataLoader:
    """The validation set in order, dealt to the ranks (sampler.eval_batches), through the training collator."""
    t = cfg.train
    batches = eval_batches(len(dataset), t.per_device_eval_batch_size, info.world_size, info.rank)
    return DataLoader(EvalSamples(dataset), batch_sampler=batches, num_workers=t.dataloader_num_workers,
                      collate_fn=collator(cfg, dataset.tokenizer, dataset.image_tokens),
                      worker_init_fn=ignore_stop_signals)  # fmt: skip


def eval_due(cfg: Config, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether the validation loss is computed after `step` (1-based): --evaluation_strategy steps every
    --eval_steps (default --logging_steps, as HF); epoch at every epoch's end and the run's."""
    t = cfg.train
    if t.evaluation_strategy == "steps":
        return step % (t.eval_steps or t.logging_steps) == 0
    return t.evaluation_strategy == "epoch" and (step % steps_per_epoch == 0 or step == total_steps)


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
            batches = iter(loader)
            try:
                yield from ((epoch, batch) for batch in batches)
            finally:  # a sample's error: stop the workers now, not when the garbage collector frees the iterator
                stop_workers(batches)
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


def stop_workers(batches) -> None:
    """Shut down a DataLoader iterator's workers at once. An error from a worker leaves the iterator in reference
    cycles (the traceback's frames), and when the garbage collector frees it, its queues may already be finalised:
    the stop message never reaches the workers, and each costs a 5 s join and a terminate (which workers, ignoring
    SIGTERM, ride out for another 5 s)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean shutdown (no workers: none)
    if shutdown is not None:
        shutdown()


def loop_numbers(micro: list[Batch], flops: FlopModel, stop: StopRequest) -> dict[str, float]:
    """The loop's per-rank numbers for train_step's reduction: the FLOPs and LLM tokens of the step's samples, and
    whether this rank was asked to stop, read after the step (a stop asked during a step ends the run after it)."""
    seq = [n for b in micro for n in b.seq_lens]
    return {"flops": sum(map(flops.sample_flops, seq)), "tokens": sum(seq), "stop": float(stop.requested)}


class SampleError(ValueError):
    """A bad sample met in the training loop: only the rank that read it knows, so that rank reports it."""

    @classmethod
    def of(cls, e: ValueError) -> "SampleError":
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: the error is its last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        return cls(message)


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


class StepWindow:
    """The steps queued since the last device read (the host runs ahead of the device): read() reads them in one
    host sync (read_window), checks them (a finite loss; some label token in the first NO_LABEL_STEPS steps), records
    them, and says whether any rank was asked to stop."""

    def __init__(self, logger: MetricsLogger, global_batch: int, peak: float | None, info: D.DistInfo, start: int,
                 total_steps: int, why_no_labels: str) -> None:  # fmt: skip
        self.logger, self.global_batch, self.peak, self.info = logger, global_batch, peak, info
        self.start, self.done, self.trained_tokens, self.why_no_labels = start, start, 0.0, why_no_labels
        self.no_label_steps = min(NO_LABEL_STEPS, total_steps - start)
        self.steps, self.t0 = [], time.perf_counter()

    def add(self, record: StepRecord, lrs: dict, t_data: float, items: list) -> None:
        self.steps.append((record, lrs, t_data, items))

    def read(self, log: bool) -> bool:
        """Read, check and record the queued steps (the last one printed if log or stopping); True if a rank was
        asked to stop."""
        if not self.steps:
            return False
        rows = read_window(self.steps, time.perf_counter() - self.t0, self.global_batch, self.peak, self.info)
        stopping = any(row.pop("stop") for row in rows)
        for row in rows:
            self.done += 1
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {self.done}: stopping (check labels, --bf16 "
                                         "and the learning rate)")  # fmt: skip
            self.trained_tokens += row["label_tokens"]  # every rank's (the reduction): all ranks agree
            if self.trained_tokens == 0 and self.done - self.start >= self.no_label_steps:
                raise ValueError(f"no label token in {self.done - self.start} steps: {self.why_no_labels}")
            self.logger.record(self.done, row, log=row is rows[-1] and (log or stopping))
        self.steps, self.t0 = [], time.perf_counter()
        return stopping


def data_failed(error: SampleError | None, ckpt: Checkpointer, step: int, start: int, total_steps: int) -> ValueError:
    """A rank's data failed before step `step` + 1 (a bad sample, a data file changed in place): every rank learnt
    it (D.any_rank) before the step's collectives, so together they save checkpoint-<step> (no step is half done)
    and stop. The failing rank's error says what failed; the others say another rank's data did."""
    if step > start and not ckpt.due(step):  # due: saved after that step already
        ckpt.save(step)
    ckpt.wait()
    if step > 0:
        path = os.path.join(ckpt.cfg.train.output_dir, f"checkpoint-{step}")
        saved = f"saved {path}; once the data is fixed, run the same command with --resume_from_checkpoint auto"
    else:
        saved = "nothing was trained, nothing saved"
    where = f"stopped before step {step + 1} of {total_steps}: {saved}"
    if error is None:
        return ValueError(f"another rank's data failed (its error is above); {where}")
    return SampleError(f"{error}; {where}")


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    cfg = read_flags(argv)
    info = D.init_distributed(background=cfg.train.async_save)  # async checkpoints: D.background_group
    stop = StopRequest(watch_agent="TORCHELASTIC_RUN_ID" in os.environ)  # SIGTERM / Ctrl-C / dead torchrun: save, stop
    t = cfg.train
    logger = claim = ckpt = stream = None
    started = False  # a run that fails its start-up leaves no --output_dir behind (claim.release)
    try:
        models = prepare_models(cfg, info.local_rank, D.barrier)  # checks, hub downloads (once per node), configs
        claim = OutputDirClaim(cfg, info.is_main)  # one run per --output_dir, claimed before anything is written there
        seed_everything(t.seed)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # LLaVA ran with --tf32 True
        if info.is_main:
            print(format_config(cfg), flush=True)
        # The model flags keep the names given (a hub id is recorded as such); files come from the local folders.
        tokenizer = load_tokenizer(models.llm, t.model_max_length)
        image_processor = load_image_processor(models.tower)
        dataset = build_dataset(cfg, tokenizer, image_processor, models.image_tokens)
        held_out = cfg.data.eval_data_path and build_dataset(cfg, tokenizer, image_processor, models.image_tokens,
                                                             cfg.data.eval_data_path)  # fmt: skip
        model, flops = build_model(cfg, info, models.configs, lengths=largest_micro_batch(cfg, dataset))
        loader, sampler = build_loader(cfg, tokenizer, image_processor, info, model.num_image_tokens, dataset)
        eval_loader = held_out and build_eval_loader(cfg, held_out, info)
        ga = t.gradient_accumulation_steps
        total_steps = num_training_steps(
            sampler.steps_per_epoch, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps
        )
        optimizer, scheduler = build_optimizer(model, t, total_steps)
        dtype = torch.bfloat16 if t.bf16 else torch.float32  # of the saved weights (LLaVA's: the training dtype)
        manifest = run_manifest(cfg, tokenizer) if info.is_main else None  # saved with checkpoints and outputs
        ckpt = Checkpointer(cfg, model, optimizer, scheduler, sampler, len(loader.dataset), dtype, manifest)
        start = resume(ckpt)  # 0 unless --resume_from_checkpoint finds a checkpoint
        global_batch = t.per_device_train_batch_size * ga * info.world_size
        D.print0(
            f"world {info.world_size} | global batch {global_batch} | {len(loader.dataset)} samples | "
            f"{sampler.steps_per_epoch} steps/epoch | {total_steps} steps"
        )
        if len(loader.dataset) < global_batch:  # the sampler wraps the order round to fill the step
            D.print0(f"note: {len(loader.dataset)} samples are fewer than the global batch of {global_batch}: every "
                     "step repeats samples within itself")  # fmt: skip
        started = True  # the start-up passed (model, data, resume): from here on the run writes into --output_dir
        if info.is_main:
            if t.overwrite_output_dir and (gone := clear_output_dir(t.output_dir)):
                print(f"--overwrite_output_dir: removed the earlier run's {', '.join(gone)}")
            save_config(cfg, t.output_dir)
        D.barrier()  # no rank writes into --output_dir before it is cleared
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
        why = (f"every sample lost its answers (check --model_max_length {t.model_max_length} against the "
               f"{model.num_image_tokens} positions an image takes, and the skipped samples named above)")  # fmt: skip
        window = StepWindow(logger, global_batch, peak, info, start, total_steps, why)
        stop.arm()  # from here a Ctrl-C saves a checkpoint after the step (before, it stops at once)
        for step in range(start, total_steps):
            stop.hold_for_test(step + 1)
            t0 = time.perf_counter()
            try:
                items, failed = [next(stream) for _ in range(ga)], None
            except ValueError as e:
                items, failed = [], SampleError.of(e)
            if D.any_rank(failed is not None):  # before the step's collectives, which a rank without data would hang
                window.read(log=True)
                raise data_failed(failed, ckpt, step, start, total_steps)
            micro = [batch for _, batch, _ in items]
            t_data = time.perf_counter() - t0  # the host waiting for the DataLoader
            lrs = group_lrs(optimizer)  # the lrs this step uses (the scheduler moves them on inside train_step)
            # The loop's numbers ride the step's one reduction, which also tells every rank whether any was asked
            # to stop. It is read (one host sync) only on steps that log, save or end the run: in between, the host
            # queues step after step and the device never waits for it.
            extra = functools.partial(loop_numbers, micro, flops, stop)
            window.add(train_step(model, micro, optimizer, scheduler, cfg, extra), lrs, t_data, items)
            log = (step + 1) % t.logging_steps == 0 or step == 0
            stopping = False
            if log or step + 1 == total_steps or ckpt.due(step + 1):
                stopping = window.read(log)
            if eval_loader and eval_due(cfg, step + 1, sampler.steps_per_epoch, total_steps):
                logger.record_eval(step + 1, *evaluate(model, eval_loader, info.device))
            saved = ckpt.save_if_due(step + 1)
            if not stopping or step + 1 == total_steps:
                continue
            saved = saved or ckpt.save(step + 1)
            ckpt.wait()  # the checkpoint is written and published before the exit
            raise Preempted(
                f"stopped after step {step + 1} of {total_steps} ({stop.reason or 'another rank was asked to'}): "
                f"saved {saved}; to continue, run the same command with --resume_from_checkpoint auto",
                stop.exit_code,
            )
        logger.close()
        ckpt.wait()  # a checkpoint still being written is finished and published first
        save_final(model, cfg, tokenizer, dtype, manifest=manifest)
        D.print0(f"done in {duration(time.perf_counter() - t_start)}; {logger.summary()}\n{next_steps(cfg)}")
    finally:
        if stream is not None:
            stream.close()  # stops the DataLoader workers (stop_workers)
        if logger is not None:
            logger.close()  # ends the progress bar before any error is printed
        if ckpt is not None:
            ckpt.close()  # after an error: lets a checkpoint being written finish (no collective)
        if claim is not None:
            claim.release(started)
        stop.close()
        D.cleanup(info)
        # The model, optimizer and process groups sit in reference cycles (FSDP2's hooks): free them now, in this
        # process, so a later main() in it (tests, notebooks) starts clean and its DataLoader workers, forked
        # with them, never run their destructors (one did, and segfaulted, in test_faults).
        gc.collect()


def report(line: str, show: bool = True) -> None:
    """A rank's one-line error on stderr (if show); under torchrun also its error file (TORCHELASTIC_ERROR_FILE, every
    failing rank), so that torchrun's failure report names it (`traceback : error: ...`) instead of "To enable
    traceback see ..."."""
    if show:
        print(line, file=sys.stderr, flush=True)
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(path, "w") as f:  # the layout torch.distributed.elastic's ErrorHandler writes and torchrun reads
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)  # fmt: skip


def cli(argv: list[str]) -> int:
    """`python train.py` / torchrun: main() with what a user can fix as one line on stderr instead of a traceback.
    A bad flag, path or file (ValueError) is the same on every rank: the first rank of each node prints it; a bad
    sample (SampleError) is printed by the rank that read it; a full disk (OSError ENOSPC / EDQUOT) like a bad flag.
    Preemption (SIGTERM, Ctrl-C) exits with 128 + the signal after its checkpoint; a Ctrl-C outside the training
    loop (start-up, the final save) stops at once, in one line."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        main(argv)
    except Preempted as e:
        if first:
            print(e, file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if first:
            print("interrupted (Ctrl-C): nothing saved", file=sys.stderr, flush=True)
        return 130
    except ValueError as e:
        report(f"error: {e}", first or isinstance(e, SampleError))
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        report(f"error: {e}", first)  # the save's own one-line message (minillava/atomic.py removed_on_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
