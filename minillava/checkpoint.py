"""Resumable checkpoints: sharded torch.distributed.checkpoint (DCP) state, atomic saves in the background, rotation.

Every --save_steps, output_dir/checkpoint-N/ (each rank writes its own shards; the model is never gathered):
  .metadata, __<rank>_0.distcp    DCP: trainable params (frozen ones are re-read from the pretrained folders on
                                  resume) and the optimizer state of the params that have one
  trainer_state.json              step, scheduler, sampler position, the run's shape (world x GA x batch, data length)
  rng_state_<rank>.pth            python / numpy / torch / cuda RNG of every rank
  minillava_config.json           the resolved config
  mm_projector.bin, config.json   stage 1 only: LLaVA's mid-run stage-1 files (formats/)
  COMPLETE                        written last
Atomic: all of it goes to checkpoint-N.tmp-XXXX, COMPLETE last, then one directory rename. Resume only takes
checkpoint-N directories holding COMPLETE, so a kill at any moment leaves every earlier checkpoint usable.

In the background (--async_save, the default): the step waits only while the state is copied into host buffers
(HostStager: pinned on CUDA, allocated after the first step and reused); DCP writes that copy in its own
thread, on a gloo group of its own (distributed.background_group), and rank 0 publishes the checkpoint (COMPLETE,
rename, --save_total_limit) as the thread's last act. One save is in flight at a time; it is finished before the
next save, at the end of training, on preemption, and after an error (close). The host buffers hold one copy of
the trainable state and its optimizer state per rank; --async_save False writes before the step goes on instead.

Resuming from these is minillava/resume.py's; the final outputs (mm_projector.bin, the stage-2 HF folder) live in
minillava/outputs.py.
"""

import os
import random
import re
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from minillava.atomic import (
    MARKER,
    complete_checkpoints,
    discard_dir,
    first_line,
    make_tmp_dir,
    rank0,
    removed_on_error,
    replace_dir,
    write_json,
    write_text,
)
from minillava.config import CONFIG_NAME
from minillava.distributed import background_group
from minillava.formats.llava import llava_config
from minillava.formats.manifest import MANIFEST_NAME
from minillava.outputs import save_projector

STATE_NAME = "trainer_state.json"
STATE_KEYS = ("step", "sampler", "scheduler", "run")
_RNG = re.compile(r"rng_state_\d+\.pth")
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen keys are absent on purpose
CRASH_HOOK = "MINILLAVA_TEST_CRASH_IN_SAVE"  # tests only: =N makes every rank os._exit in save N before COMPLETE


# ---------------------------------------------------------------------------------------------- resumable state


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
    """The run's checkpoints: train.py calls resume.resume(checkpointer) once before the loop and save_if_due(step)
    after each step.

    The sampler position saved is the loop's own (DataLoader workers draw ahead of it): step // steps_per_epoch,
    step % steps_per_epoch x GA micro-batches."""

    def __init__(
        self, cfg, model: nn.Module, optimizer, scheduler, sampler, dataset_length: int, dtype, manifest=None
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler, self.sampler = cfg, model, optimizer, scheduler, sampler
        self.dtype = dtype  # of mm_projector.bin
        self.manifest = manifest  # rank 0's formats.manifest.run_manifest, saved with every checkpoint
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
        previous one is finished first. On a failure (a full disk: one line, atomic.removed_on_error) the partial
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

def _rotate(output_dir: str, limit: int | None, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond --save_total_limit (never `keep`, the one just written).
    Checkpoints of an abandoned later trajectory (resumed from an older PATH) count too, by step."""
    if not limit:
        return
    found = [p for _, p in complete_checkpoints(output_dir)]
    for path in found[: max(len(found) - limit, 0)]:
        if path != keep:
            discard_dir(path)
