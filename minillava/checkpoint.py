"""Resumable checkpoints: sharded torch.distributed.checkpoint (DCP) state, atomic saves, rotation and exact resume.

Every --save_steps, output_dir/checkpoint-N/ (each rank writes its own shards; the model is never gathered):
  .metadata, __<rank>_0.distcp    DCP: trainable params (frozen ones are re-read from the pretrained folders on
                                  resume) and the optimizer state of the params that have one
  trainer_state.json              step, scheduler, sampler position, the run's shape (world x GA x batch, data length)
  rng_state_<rank>.pth            python / numpy / torch / cuda RNG of every rank
  minillava_config.json           the resolved config
  mm_projector.bin, config.json   stage 1 only: LLaVA's mid-run stage-1 files (formats.py)
  COMPLETE                        written last
Atomic: all of it goes to checkpoint-N.tmp-XXXX, COMPLETE last, then one directory rename. Resume only takes
checkpoint-N directories holding COMPLETE, so a kill at any moment leaves every earlier checkpoint usable.

In the background (--async_save, the default): the step waits only while the state is copied into host buffers
(HostStager: pinned on CUDA, allocated after the first step and reused); DCP writes that copy in its own
thread, on a gloo group of its own (distributed.background_group), and rank 0 publishes the checkpoint (COMPLETE,
rename, --save_total_limit) as the thread's last act. One save is in flight at a time; it is finished before the
next save, at the end of training, on preemption, and after an error (close). The host buffers hold one copy of
the trainable state and its optimizer state per rank; --async_save False writes before the step goes on instead.

Files damaged after COMPLETE (a disk error, a copy cut short) are caught before anything is loaded: rank 0 checks
that the JSON files parse, .metadata reads, every shard is as long as .metadata says and the RNG files load
(checkpoint_problem), and tells the other ranks. `--resume_from_checkpoint auto` then falls back to the previous
complete checkpoint with a warning naming the broken file, and starts fresh if none is usable; an explicit PATH is a
ValueError. Damage these checks cannot see (bytes changed in place) fails in dcp.load, also as a ValueError.

The final outputs (mm_projector.bin, the stage-2 HF folder) live in minillava/outputs.py.
"""

import json
import math
import os
import random
import re
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from minillava.config import CONFIG_NAME
from minillava.distributed import background_group, broadcast_object, print0
from minillava.formats import MANIFEST_NAME, llava_config, manifest_changes
from minillava.outputs import (
    MARKER,
    atomic_write,
    complete_checkpoints,
    discard_dir,
    first_line,
    make_tmp_dir,
    rank0,
    read_json,
    removed_on_error,
    replace_dir,
    save_projector,
    write_json,
    write_text,
)

STATE_NAME = "trainer_state.json"
STATE_KEYS = ("step", "sampler", "scheduler", "run")
_RNG = re.compile(r"rng_state_\d+\.pth")
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen keys are absent on purpose
CRASH_HOOK = "MINILLAVA_TEST_CRASH_IN_SAVE"  # tests only: =N makes every rank os._exit in save N before COMPLETE


# ---------------------------------------------------------------------------------------------- resumable state


def checkpoint_problem(path: str) -> str | None:
    """What is broken in the complete checkpoint `path`, naming the file, or None. Reads no tensor data."""
    for name, keys in ((STATE_NAME, STATE_KEYS), (CONFIG_NAME, ())):
        file = os.path.join(path, name)
        try:
            content = read_json(file)
        except (OSError, ValueError) as e:  # missing, or torn JSON
            return f"{file} is unreadable ({first_line(e)})"
        if not isinstance(content, dict) or any(k not in content for k in keys):
            return f"{file} lacks some of {list(keys)}"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # missing, or a torn pickle (any unpickling error)
        return f"{os.path.join(path, '.metadata')} is unreadable ({first_line(e)})"
    needed: dict[str, int] = {}  # shard file -> the end of its last item
    for item in metadata.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            return f"{shard} is missing"
        if os.path.getsize(shard) < size:
            return f"{shard} is truncated ({os.path.getsize(shard)} bytes; .metadata records {size})"
    for name in sorted(filter(_RNG.fullmatch, os.listdir(path))):  # every rank's: they share the filesystem
        file = os.path.join(path, name)
        try:
            torch.load(file, weights_only=True)
        except Exception as e:
            return f"{file} is unreadable ({first_line(e)})"
    return None


def find_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None -> None; auto -> the newest usable complete checkpoint (damaged ones are
    skipped with a warning) or None; PATH -> PATH if complete and undamaged, else ValueError."""
    if not spec:
        return None
    if spec == "auto":
        for _, path in reversed(complete_checkpoints(output_dir)):
            if (problem := checkpoint_problem(path)) is None:
                return path
            print(f"warning: --resume_from_checkpoint auto: skipping {path}: {problem}")
        return None
    if not os.path.isfile(os.path.join(spec, MARKER)):
        why = "no such directory" if not os.path.isdir(spec) else f"no {MARKER} marker: its save was interrupted"
        raise ValueError(f"--resume_from_checkpoint {spec}: not a complete checkpoint ({why}); pass another or auto")
    if problem := checkpoint_problem(spec):
        raise ValueError(f"--resume_from_checkpoint {spec}: damaged: {problem}; pass an older checkpoint or auto")
    return spec


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),  # lists: the file loads with weights_only=True
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Sharded optimizer state keyed by parameter names. Params without state (no gradient yet) have no entry.
    get_optimizer_state_dict fills an empty optimizer with a zero-lr step first; undo that (it would set every
    param's AdamW step count to 1, changing later updates): nothing is lost, the state was empty."""
    fresh = not optimizer.state
    osd = get_optimizer_state_dict(model, optimizer)
    if fresh:
        optimizer.state.clear()
        osd["state"] = {}
    return osd


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, saved: set[str]) -> None:
    """Restore exactly the saved optimizer state: params without a saved entry end with no state (AdamW creates it
    at their first gradient, as in the uninterrupted run) instead of the zero-lr step's placeholder."""
    osd = get_optimizer_state_dict(model, optimizer)  # the fresh optimizer: a placeholder entry for every param
    osd["state"] = {fqn: s for fqn, s in osd["state"].items() if all(f"optimizer.state.{fqn}.{k}" in saved for k in s)}
    dcp.load({"optimizer": osd}, checkpoint_id=path)
    # load_state_dict replaces the whole state, so the placeholders of params missing from osd are dropped.
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(strict=False))


class HostStager(AsyncStager):
    """What dcp.async_save copies the state into before it returns: host buffers (pinned on CUDA) made at the first
    stage() and refilled by every later one, through one StateDictStager kept for the whole run (it caches a host
    copy per storage of the state). Not DefaultStager: in torch 2.11 and 2.12 its stage() closes its StateDictStager
    after each use, so the second stage() fails (KeyError: <class 'type'>; torchtitan issue #3476)."""

    _synchronize_after_execute = False  # stage() has copied everything when it returns: nothing to wait for

    def __init__(self, pin_memory: bool) -> None:
        self._copier = StateDictStager(pin_memory=pin_memory, share_memory=False)

    def stage(self, state_dict: dict) -> dict:
        return self._copier.stage(state_dict, non_blocking=False)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._copier.close()


class Checkpointer:
    """The run's save/resume: train.py calls resume() once before the loop and save_if_due(step) after each step.

    The sampler position saved is the loop's own (DataLoader workers draw ahead of it): step // steps_per_epoch,
    step % steps_per_epoch x GA micro-batches."""

    def __init__(
        self, cfg, model: nn.Module, optimizer, scheduler, sampler, dataset_length: int, dtype, manifest=None
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler, self.sampler = cfg, model, optimizer, scheduler, sampler
        self.dtype = dtype  # of mm_projector.bin
        self.manifest = manifest  # rank 0's formats.run_manifest, saved with every checkpoint
        t = cfg.train
        self.shape = {
            "world_size": dist.get_world_size(),
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "dataset_length": dataset_length,
        }
        self._pending: Future | None = None  # the save in flight: its path once published
        self._stager, self._staged = None, False  # --async_save: DCP's host buffers, kept and reused by every save
        if t.async_save:
            self._stager = HostStager(pin_memory=torch.cuda.is_available())

    def due(self, step: int) -> bool:
        """Whether --save_steps makes checkpoint-<step> due."""
        return self.cfg.train.save_steps > 0 and step % self.cfg.train.save_steps == 0

    def save_if_due(self, step: int) -> str | None:
        """After each step: raise the error of a failed background save (poll), then start checkpoint-<step> if
        --save_steps makes it due; returns its path, or None when none was due."""
        self.poll()
        if self.cfg.train.save_steps <= 0:
            return None
        if self._stager is not None and not self._staged:
            # After the first step (AdamW's state exists from then on): allocate (and pin) the host buffers every
            # save reuses now, so a host that cannot hold them fails here rather than at the first save, hours in,
            # and that save stops training no longer than the later ones.
            self._stager.stage(self._state())
            self._staged = True
        return self.save(step) if self.due(step) else None

    def save(self, step: int) -> str:
        """Start checkpoint-<step> (collective) and return its path. It returns once the state is copied to host
        memory (with --async_save False, once it is written): DCP writes it in a background thread, whose last act
        is to publish it (_publish: COMPLETE, rename, --save_total_limit). One save is in flight at a time: a
        previous one is finished first. On a failure (a full disk: one line, outputs.removed_on_error) the partial
        checkpoint is removed, and poll() or wait() raises it."""
        self.wait()
        t = self.cfg.train
        tmp = make_tmp_dir(t.output_dir, f"checkpoint-{step}.tmp-")
        final = os.path.join(t.output_dir, f"checkpoint-{step}")
        with removed_on_error(tmp, final, t.output_dir):
            self._write_small_files(step, tmp)  # first: rank 0 publishes once every rank's DCP write is done
            state = self._state()
            if self._stager is not None:  # copy to the stager's buffers, then write them in DCP's thread
                upload = dcp.async_save(state, checkpoint_id=tmp, process_group=background_group(),
                                        async_stager=self._stager)  # fmt: skip
            else:
                dcp.save(state, checkpoint_id=tmp)
                upload = Future()
                upload.set_result(None)
        self._pending = published = Future()
        upload.add_done_callback(lambda upload: self._publish(upload, step, tmp, final, published))
        if self._stager is None:
            self.wait()
        return final

    def _state(self) -> dict:
        """What DCP saves: the trainable parameters and their optimizer state (sharded views, nothing gathered)."""
        return {"model": get_model_state_dict(self.model, options=TRAINABLE),
                "optimizer": _optimizer_state(self.model, self.optimizer)}  # fmt: skip

    def _write_small_files(self, step: int, tmp: str) -> None:
        t, rank = self.cfg.train, dist.get_rank()
        torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{rank}.pth"))
        if self.cfg.model.tune_mm_mlp_adapter:
            save_projector(self.model, os.path.join(tmp, "mm_projector.bin"), self.dtype)
        if rank == 0:
            spe = self.sampler.steps_per_epoch
            sampler = {"epoch": step // spe, "position": step % spe * t.gradient_accumulation_steps}
            trainer = {"step": step, "sampler": sampler, "scheduler": self.scheduler.state_dict(), "run": self.shape}
            write_json(os.path.join(tmp, STATE_NAME), trainer)
            write_json(os.path.join(tmp, CONFIG_NAME), self.cfg.to_dict())
            if self.manifest is not None:
                write_json(os.path.join(tmp, MANIFEST_NAME), self.manifest)
            if self.cfg.model.tune_mm_mlp_adapter:
                write_json(os.path.join(tmp, "config.json"), llava_config(self.model, self.cfg, self.dtype))

    def _publish(self, upload: Future, step: int, tmp: str, final: str, published: Future) -> None:
        """In DCP's thread, once this rank's write is done: rank 0 writes COMPLETE, renames and rotates. Rank 0's
        write ends with .metadata, which DCP writes after gathering every rank's write results, so by then every
        rank's files are in tmp. The outcome (or the error, made one line by removed_on_error) goes to `published`."""
        try:
            with removed_on_error(tmp, final, self.cfg.train.output_dir):
                upload.result()  # DCP gives every rank the error of any
                if os.environ.get(CRASH_HOOK) == str(step):
                    os._exit(1)  # test hook: as if killed mid-save
                if rank0():
                    write_text(os.path.join(tmp, MARKER), f"{step}\n")
                    replace_dir(tmp, final)
                    _rotate(self.cfg.train.output_dir, self.cfg.train.save_total_limit, keep=final)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            published.set_exception(e)
        else:
            published.set_result(final)

    def poll(self) -> None:
        """Every rank, no collective: raise the error of a background save that failed, once it has. DCP fails a
        save on every rank, each at its next poll; a rank that stops takes the others down (torchrun)."""
        if self._pending is not None and self._pending.done():
            self._pending, pending = None, self._pending
            pending.result()

    def wait(self) -> None:
        """Collective: finish the save in flight, if any; every rank returns after it is published (or raises its
        error). Called before the next save, at the end of training and on preemption."""
        if self._pending is not None:
            self._pending, pending = None, self._pending
            pending.result()
        dist.barrier()

    def close(self) -> None:
        """End of the run, also after an error: let this rank's write in flight finish (its thread uses a process
        group that distributed.cleanup destroys), so a good checkpoint is still published. No collective, so it
        cannot hang on a rank that died; a failure is a warning here, since another error is already on its way."""
        if self._pending is not None:
            self._pending, pending = None, self._pending
            try:
                pending.result()
            except BaseException as e:
                print(f"warning: a checkpoint was not saved: {first_line(e)}")
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def resume(self) -> int:
        """Restore --resume_from_checkpoint (auto | PATH) if given; returns the step to continue from (0: fresh)."""
        t = self.cfg.train
        found = None
        if rank0():  # rank 0 looks, every rank gets the answer (or the error: no rank may wait for the others)
            try:
                found = (find_checkpoint(t.resume_from_checkpoint, t.output_dir), None)
            except ValueError as e:
                found = (None, str(e))
        path, error = broadcast_object(found)
        if error:
            raise ValueError(error)
        if path is None:
            if t.resume_from_checkpoint:
                print0(f"--resume_from_checkpoint auto: no usable checkpoint in {t.output_dir}; starting fresh")
            return 0
        state = read_json(os.path.join(path, STATE_NAME))
        self._check_shape(state["run"], path)
        saved_config = read_json(os.path.join(path, CONFIG_NAME))
        self._check_flags(saved_config, state["step"], path)
        self._report_config_changes(saved_config, path)
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        model_sd = get_model_state_dict(self.model, options=TRAINABLE)
        ours, theirs = set(model_sd), {k.removeprefix("model.") for k in saved if k.startswith("model.")}
        if ours != theirs:
            raise ValueError(
                f"cannot resume from {path}: trainable parameters differ (missing there: {sorted(ours - theirs)[:3]}, "
                f"extra there: {sorted(theirs - ours)[:3]}); did --stage, --tune_mm_mlp_adapter or --freeze_* change?"
            )
        try:
            dcp.load({"model": model_sd}, checkpoint_id=path)
            set_model_state_dict(self.model, model_sd, options=TRAINABLE_LOAD)
            _load_optimizer(self.model, self.optimizer, path, saved)
        except CheckpointException as e:  # every rank raises it (DCP gathers the failures)
            rank, (first, _) = next(iter(e.failures.items()))
            raise ValueError(
                f"cannot resume from {path}: its DCP shards do not load (rank {rank}: {first_line(first)}); "
                "the checkpoint is damaged: pass an older one with --resume_from_checkpoint"
            ) from e
        self.scheduler.load_state_dict(state["scheduler"])
        # The learning rate of the first resumed step is the current schedule's (a longer --max_steps moves it), with
        # the checkpoint's base rates; unchanged flags give exactly the saved value.
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas,
                                   strict=True):  # fmt: skip
            group["lr"] = base * fn(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        # Where the next step starts, in this run's micro-batches: every split of the same global batch into ranks x
        # accumulation x micro-batch holds the same samples at each step (sampler.py), so the step says it all.
        spe, step = self.sampler.steps_per_epoch, state["step"]
        self.sampler.load_state_dict({"epoch": step // spe, "position": step % spe * t.gradient_accumulation_steps})
        rng = os.path.join(path, f"rng_state_{dist.get_rank()}.pth")
        if os.path.isfile(rng):  # absent when the world size changed (allowed if world x GA x batch did not)
            _set_rng_state(torch.load(rng, weights_only=True))
        if rank0():
            _trim_metrics(t.output_dir, state["step"])
            later = [p for step, p in complete_checkpoints(t.output_dir) if step > state["step"]]
            # Resumed from an older PATH: these belong to the trajectory being replaced. (auto skipped them: damaged.)
            if later and t.resume_from_checkpoint != "auto":
                print(f"warning: {later} are newer than {path}; `auto` would pick them until this run overwrites them")
        s = state["sampler"]
        print0(f"resumed from {path}: step {state['step']}, epoch {s['epoch']}, micro-batch {s['position']}")
        return state["step"]

    def _check_shape(self, old: dict, path: str) -> None:
        """Refuse when the data order or the step count would change: global batch or dataset length differ."""
        keys = ("world_size", "gradient_accumulation_steps", "per_device_train_batch_size")
        desc = lambda r: " x ".join(str(r[k]) for k in keys) + f" = {math.prod(r[k] for k in keys)}"  # noqa: E731
        changed = []
        if math.prod(old[k] for k in keys) != math.prod(self.shape[k] for k in keys):
            changed.append(f"world_size x gradient_accumulation_steps x per_device_train_batch_size was {desc(old)}, "
                           f"now {desc(self.shape)}")  # fmt: skip
        if old["dataset_length"] != self.shape["dataset_length"]:
            changed.append(f"the dataset had {old['dataset_length']} samples, now {self.shape['dataset_length']}")
        if changed:
            raise ValueError(
                f"cannot resume from {path}: {'; '.join(changed)}. The checkpoint's sampler position and step count "
                "would no longer match the data order; restore those settings or start a new --output_dir"
            )

    def _check_flags(self, saved_config: dict, step: int, path: str) -> None:
        """Refuse the flag changes a resume cannot honour, naming the flag and its saved value: the order of an epoch
        under way (--seed, --group_by_modality_length, --longest_first: samples would be trained twice or never) and
        the shapes of the trained state (--lora_r, --mm_projector_type)."""
        flat = lambda sections: {k: v for d in sections.values() for k, v in d.items()}  # noqa: E731
        old, new = flat(saved_config), flat(self.cfg.to_dict())
        mid_epoch = step % self.sampler.steps_per_epoch != 0
        order = ("seed", "group_by_modality_length", "longest_first") if mid_epoch else ()
        for flag in (*order, "lora_r", "mm_projector_type"):
            if flag in old and old[flag] != new[flag] and (flag != "lora_r" or new["lora_enable"]):
                why = "the order of the epoch under way" if flag in order else "the shapes of the trained weights"
                hint = " (it may change at an epoch boundary)" if flag in order else ""
                raise ValueError(f"cannot resume from {path}: --{flag} {new[flag]} changes {why}; the checkpoint "
                                 f"was trained with --{flag} {old[flag]}: pass that{hint}")  # fmt: skip

    def _report_config_changes(self, old: dict, path: str) -> None:
        new = self.cfg.to_dict()
        skip = {"output_dir", "resume_from_checkpoint"}
        diffs = [f"{s}.{k}: {v!r} -> {new[s][k]!r}" for s, d in old.items() for k, v in d.items()
                 if k not in skip and new[s].get(k) != v]  # fmt: skip
        if diffs:
            print0(f"resuming with changed settings (checkpoint -> now): {', '.join(diffs)}. Learning rates and "
                    "weight decay stay the checkpoint's; warmup and total steps follow the current flags")  # fmt: skip
        manifest = os.path.join(path, MANIFEST_NAME)
        if self.manifest is not None and os.path.isfile(manifest):  # rank 0 holds the manifest
            changes = manifest_changes(read_json(manifest), self.manifest)
            if changes:
                print(f"warning: {path} was written by a different setup (checkpoint -> now): {'; '.join(changes)}. "
                      "The run continues, but it may no longer match an uninterrupted one")  # fmt: skip


def _rotate(output_dir: str, limit: int | None, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond --save_total_limit (never `keep`, the one just written).
    Checkpoints of an abandoned later trajectory (resumed from an older PATH) count too, by step."""
    if not limit:
        return
    found = [p for _, p in complete_checkpoints(output_dir)]
    for path in found[: max(len(found) - limit, 0)]:
        if path != keep:
            discard_dir(path)


def _trim_metrics(output_dir: str, step: int) -> None:
    """Drop metrics.jsonl records after `step`: a killed run may have logged steps the resumed run repeats."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                pass  # a line torn by the kill
    atomic_write(path, lambda tmp: write_text(tmp, "".join(keep)))
