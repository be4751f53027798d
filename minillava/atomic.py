"""Files and folders written atomically on a filesystem every rank shares, as checkpoints and final outputs are: a
file goes to a temporary name and is renamed into place (atomic_write); a folder is built under a temporary name
inside its parent (make_tmp_dir) and renamed (replace_dir), old ones are renamed out of the way before they are
deleted (discard_dir), so a kill at any moment leaves every earlier checkpoint or output whole. A full disk (or
quota) during a save stops the run with one line naming what was being written and the newest complete checkpoint,
which the failed save left untouched; its partial files are removed (removed_on_error)."""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from minillava.distributed import broadcast_object

LEFTOVER = re.compile(r"checkpoint-\d+\.(tmp|old)-.+|\.final\.tmp-.+")  # from a save that was killed
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
MARKER = "COMPLETE"  # written last into a checkpoint (minillava/checkpoint.py)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def rank0() -> bool:
    return dist.get_rank() == 0


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N in output_dir that holds its COMPLETE marker, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        if (m := _CHECKPOINT.fullmatch(name)) and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _disk_full_errno(e: BaseException, directory: str) -> int | None:
    """ENOSPC or EDQUOT if `e` comes from a full disk or quota. The libraries hide the OSError: torch.save raises
    a RuntimeError with it as __context__, safetensors names it in its message, DCP lists every rank's error in a
    CheckpointException (pickled, losing __context__: then the free space of `directory` decides)."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_FULL:
            return x.errno
        for code in DISK_FULL:
            if os.strerror(code) in str(x):
                return code
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
    if isinstance(e, CheckpointException) and shutil.disk_usage(directory).free < 2**20:
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def removed_on_error(tmp: str, target: str, output_dir: str):
    """Around a save into the temporary directory `tmp`: if it fails, remove `tmp`; a full disk (or quota) is
    re-raised as one line naming `target`, the fix, and the newest complete checkpoint."""
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        code = _disk_full_errno(e, output_dir)  # before removing tmp, whose files are what filled the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if code is None:
            raise
        found = complete_checkpoints(output_dir)
        kept = f"{found[-1][1]} is still loadable" if found else "no complete checkpoint was saved before"
        error = OSError(f"{os.strerror(code).lower()} while writing {target}: free space or point --output_dir "
                        f"elsewhere; {kept}")  # fmt: skip
        error.errno = code
        raise error from e


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(obj, indent=2, default=str) + "\n"))


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def make_tmp_dir(parent: str, prefix: str) -> str:
    """A fresh directory inside `parent` (same filesystem, so the final rename is atomic), made by rank 0."""
    path = None
    if rank0():
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):  # leftovers of a killed save (lock_output_dir: no other run writes here)
            if LEFTOVER.fullmatch(name):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o777 & ~umask)  # mkdtemp's 0700 would hide checkpoints from the other users of a cluster
    return broadcast_object(path)


def discard_dir(path: str) -> None:
    """Rename out of the checkpoint-N pattern (atomic), then delete: a kill mid-delete leaves only a leftover."""
    doomed = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=os.path.dirname(path))
    os.replace(path, doomed)  # replaces the empty directory mkdtemp made
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(tmp: str, final: str) -> None:
    """Rename tmp to final, discarding an existing final first (a re-run of the same step)."""
    if os.path.exists(final):
        discard_dir(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(e: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
