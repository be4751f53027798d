"""Faults around checkpoints: damaged files in a complete checkpoint, a full disk, a second run on the same
--output_dir. In-process 1-rank runs (each well under a second) unless marked dist."""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from types import SimpleNamespace

import pytest
from conftest import flags
from dist import run_distributed
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException

import train
from minillava.atomic import removed_on_error
from minillava.output_dir import LOCK_NAME, lock_file, lock_output_dir
from minillava.resume import checkpoint_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(max_steps=3, save_steps=1, save_total_limit=5)


@pytest.fixture(scope="module")
def checkpoints(assets, tmp_path_factory):
    """A 3-step run's checkpoint-1, -2 and -3 (tests damage copies)."""
    out = str(tmp_path_factory.mktemp("ckpts"))
    train.main(flags(assets, out, **RUN))
    return out


def _copy_checkpoints(src: str, tmp_path) -> str:
    out = str(tmp_path / "o")
    for step in (1, 2, 3):
        shutil.copytree(os.path.join(src, f"checkpoint-{step}"), os.path.join(out, f"checkpoint-{step}"))
    return out


def _cut_in_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = [  # (file in checkpoint-3, what happens to it after COMPLETE was written)
    ("__0_0.distcp", _cut_in_half),
    (".metadata", os.remove),
    ("trainer_state.json", _cut_in_half),
    ("rng_state_0.pth", _cut_in_half),
]


@pytest.mark.parametrize(("broken", "damage"), DAMAGE)
def test_a_damaged_checkpoint_is_refused_or_skipped(assets, checkpoints, tmp_path, capsys, broken, damage):
    """checkpoint-3 holds COMPLETE, but one of its files was damaged since. As PATH: a one-line ValueError naming
    the file, before anything is loaded. auto: a warning naming it, resume from checkpoint-2, and the run saves a
    good checkpoint-3 again. (Before: a traceback from dcp.load, json or torch.load, with either flag.)"""
    out = _copy_checkpoints(checkpoints, tmp_path)
    newest, file = os.path.join(out, "checkpoint-3"), os.path.join(out, "checkpoint-3", broken)
    damage(file)
    with pytest.raises(ValueError, match=f"^--resume_from_checkpoint {re.escape(newest)}: damaged: {re.escape(file)} "
                                         "is [^\n]+; pass an older checkpoint or auto$"):  # fmt: skip
        train.main(flags(assets, out, resume_from_checkpoint=newest, **RUN))
    train.main(flags(assets, out, resume_from_checkpoint="auto", **RUN))
    log = capsys.readouterr().out
    assert f"warning: --resume_from_checkpoint auto: skipping {newest}: {file} is " in log
    assert f"resumed from {os.path.join(out, 'checkpoint-2')}: step 2" in log
    assert checkpoint_problem(newest) is None


def test_auto_starts_fresh_when_no_checkpoint_is_usable(assets, checkpoints, tmp_path, capsys):
    """Every checkpoint damaged: auto names each with its broken file, then trains from step 0 (before: a traceback
    from the newest)."""
    out = _copy_checkpoints(checkpoints, tmp_path)
    for step, (broken, damage) in enumerate(DAMAGE[:3], start=1):
        damage(os.path.join(out, f"checkpoint-{step}", broken))
    train.main(flags(assets, out, resume_from_checkpoint="auto", **RUN))
    log = capsys.readouterr().out
    for step, (broken, _) in enumerate(DAMAGE[:3], start=1):
        ckpt = os.path.join(out, f"checkpoint-{step}")
        assert f"warning: --resume_from_checkpoint auto: skipping {ckpt}: {os.path.join(ckpt, broken)} is " in log
    assert f"--resume_from_checkpoint auto: no usable checkpoint in {out}; starting fresh" in log
    assert "resumed from" not in log
    assert all(checkpoint_problem(os.path.join(out, f"checkpoint-{step}")) is None for step in (1, 2, 3))


def test_damage_only_dcp_load_sees_is_a_value_error_naming_the_checkpoint(assets, checkpoints, tmp_path):
    """The shard keeps its length but its bytes are gone (zeros): the cheap checks pass, dcp.load fails on every
    rank, and the run stops with a ValueError naming the checkpoint (before: DCP's CheckpointException)."""
    out = _copy_checkpoints(checkpoints, tmp_path)
    shard = os.path.join(out, "checkpoint-3", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.write(bytes(os.path.getsize(shard)))
    with pytest.raises(ValueError, match=f"^cannot resume from {re.escape(os.path.join(out, 'checkpoint-3'))}: its "
                                         "DCP shards do not load \\(rank 0: "):  # fmt: skip
        train.main(flags(assets, out, resume_from_checkpoint="auto", **RUN))


HOLD = """import sys, time
from minillava.output_dir import lock_file
lock = lock_file(sys.argv[1])
print("locked", flush=True)
time.sleep(600)"""


def test_a_second_run_on_the_same_output_dir_stops(assets, tmp_path):
    """While another process holds output_dir's lock, train.main stops naming the directory and that process, and
    leaves its files alone (before, it deleted the other run's checkpoint in progress); once that process is killed
    (-9: no clean-up of its own), a run takes the lock, and releases it at its end."""
    out = str(tmp_path / "o")
    in_progress = os.path.join(out, "checkpoint-2.tmp-abc")  # the other run's save under way
    os.makedirs(in_progress)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, os.path.join(out, LOCK_NAME)], cwd=REPO,
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        other = f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(ValueError, match=rf"^--output_dir {re.escape(out)}: in use by another run \({other}\); "):
            train.main(flags(assets, out, max_steps=1))
        assert sorted(os.listdir(out)) == [LOCK_NAME, "checkpoint-2.tmp-abc"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.main(flags(assets, out, max_steps=1))
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    lock_file(os.path.join(out, LOCK_NAME)).close()  # released


def _claim(rank, world, out):
    try:
        lock_output_dir(out)
    except ValueError as e:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(str(e))


@pytest.mark.dist
def test_every_rank_raises_when_the_output_dir_is_taken(tmp_path):
    """Rank 0 checks the lock and every rank raises the same error (none waits for the others)."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    held = lock_file(os.path.join(out, LOCK_NAME))  # this process is the other run
    try:
        run_distributed(_claim, tmp_path, out)
    finally:
        held.close()
    errors = set()
    for rank in (0, 1):
        with open(os.path.join(out, f"error-{rank}.txt")) as f:
            errors.add(f.read())
    assert errors == {f"--output_dir {out}: in use by another run (pid {os.getpid()} on {socket.gethostname()}); "
                      "wait for that run to end or pass another --output_dir"}  # fmt: skip


def _disk_fills_under(monkeypatch, part: str) -> None:
    """os.fsync raises ENOSPC for the files whose path contains `part`, as a full disk does at the flush."""
    real = os.fsync

    def fsync(fd):
        if part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _full_disk_message(target: str, kept: str) -> str:
    return re.escape(f"no space left on device while writing {target}: free space or point --output_dir elsewhere; "
                     f"{kept} is still loadable")  # fmt: skip


def test_a_full_disk_stops_a_save_in_one_line_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch, capsys):
    """The disk fills while checkpoint-2 is written (inside DCP's save), then during the final save: each time the
    run stops with one line naming what was written and the newest complete checkpoint, the partial files are gone,
    and that checkpoint resumes. (Before: DCP's CheckpointException traceback, the partial checkpoint left behind.)"""
    out = str(tmp_path / "o")
    ckpt = lambda step: os.path.join(out, f"checkpoint-{step}")  # noqa: E731
    argv = flags(assets, out, max_steps=2, save_steps=1, save_total_limit=5)
    with monkeypatch.context() as m:
        _disk_fills_under(m, "checkpoint-2.tmp-")
        with pytest.raises(OSError, match=f"^{_full_disk_message(ckpt(2), ckpt(1))}$"):
            train.main(argv)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]
    argv += ["--resume_from_checkpoint", "auto"]
    with monkeypatch.context() as m:
        _disk_fills_under(m, ".final.tmp-")
        with pytest.raises(OSError, match=f"^{_full_disk_message(out, ckpt(2))}$"):
            train.main(argv)
    assert f"resumed from {ckpt(1)}: step 1" in capsys.readouterr().out
    assert not [n for n in os.listdir(out) if n.startswith(".final.tmp-") or n.endswith(".safetensors")]
    train.main(argv)  # space is back
    assert f"resumed from {ckpt(2)}: step 2" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def _torch_save_on_a_full_disk():  # what torch.save raises when a write to its file fails
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    error.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise error


def _dcp_save_on_a_full_disk_of_another_rank():  # the failure arrived pickled: no __context__, no errno
    raise CheckpointException("write", {1: (RuntimeError("unexpected pos 704 vs 598"), traceback.StackSummary())})


def _safetensors_on_a_full_disk():
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _over_quota():
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


@pytest.mark.parametrize(
    ("fail", "free", "message"),
    [
        (_torch_save_on_a_full_disk, 10**9, "no space left on device"),
        (_dcp_save_on_a_full_disk_of_another_rank, 4096, "no space left on device"),
        (_dcp_save_on_a_full_disk_of_another_rank, 10**9, None),  # not a full disk: DCP's own error
        (_safetensors_on_a_full_disk, 10**9, "no space left on device"),
        (_over_quota, 10**9, "disk quota exceeded"),
    ],
)
def test_a_full_disk_is_recognised_behind_each_library(tmp_path, monkeypatch, fail, free, message):
    """The errors a full disk (or quota) surfaces as, as the libraries raise them (shapes seen on a full tmpfs):
    each becomes the one-line OSError; another error stays itself. The partial directory is removed either way."""
    tmp = tmp_path / "checkpoint-3.tmp-x"
    tmp.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    expected = OSError if message else CheckpointException
    with pytest.raises(expected) as caught, removed_on_error(str(tmp), "T", str(tmp_path)):
        fail()
    if message:
        assert str(caught.value) == (f"{message} while writing T: free space or point --output_dir elsewhere; "
                                     "no complete checkpoint was saved before")  # fmt: skip
    assert not tmp.exists()
