"""Claiming --output_dir for one run. Rank 0 holds an flock on output_dir/.minillava.lock for the whole run
(lock_output_dir); a folder holding an earlier run is refused unless the run resumes it or starts over
(check_output_dir, clear_output_dir: HF Trainer's --overwrite_output_dir); a run that stops in its start-up, before
writing anything there, removes the lock file and the folders it made (unclaim_output_dir)."""

import contextlib
import fcntl
import os
import re
import shutil
import socket

from minillava.atomic import LEFTOVER, fsync_dir, rank0
from minillava.distributed import broadcast_object
from minillava.formats.folders import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, SHARD_NAME
from minillava.formats.lora_outputs import NON_LORA
from minillava.formats.manifest import MANIFEST_NAME

LOCK_NAME = ".minillava.lock"


def lock_file(path: str):
    """Take an exclusive flock on `path` (created if absent) and write our pid and host into it. Returns the open
    file: closing it, or the process's death (even by kill -9), releases the lock. ValueError if another process
    holds it. Where flock is not supported (some NFS or Lustre mounts), warns and returns the file unlocked."""
    f = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise ValueError(f"in use by another run ({holder})") from None
    except OSError as e:
        print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run uses this --output_dir")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def lock_output_dir(output_dir: str):
    """Collective: claim output_dir for this run, before anything is written there. A second run on it would
    delete the first one's checkpoint in progress (make_tmp_dir), so it stops instead, on every rank. Returns the
    lock file (rank 0; None elsewhere) to close at the end. Advisory: only minillava runs take this lock."""
    lock = error = None
    if rank0():
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = lock_file(os.path.join(output_dir, LOCK_NAME))
        except ValueError as e:  # held
            error = f"--output_dir {output_dir}: {e}; wait for that run to end or pass another --output_dir"
        except OSError as e:
            error = f"--output_dir {output_dir}: cannot create {LOCK_NAME} ({e.strerror}); check its permissions"
    error = broadcast_object(error)
    if error:
        raise ValueError(error)
    return lock


# What an earlier run left in --output_dir: a run that started (metrics.jsonl, its config), finished (manifest.json)
# or saved checkpoints. --overwrite_output_dir removes these and the final outputs' weights and config.
RUN_FILES = ("metrics.jsonl", "minillava_config.json", MANIFEST_NAME)
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
OUTPUT_FILES = ("config.json", "mm_projector.bin", INDEX_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA)


def earlier_run(output_dir: str) -> list[str]:
    """The names in output_dir that an earlier minillava run wrote (RUN_FILES, checkpoint-N folders), sorted."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n in RUN_FILES or CHECKPOINT_DIR.fullmatch(n))


def check_output_dir(cfg) -> None:
    """Collective: refuse to start in an --output_dir holding an earlier run (its model would be overwritten at the
    end and its metrics mixed with this run's) unless the run resumes it (--resume_from_checkpoint) or starts over
    (--overwrite_output_dir, HF Trainer's flag)."""
    t, error = cfg.train, None
    if rank0() and not t.resume_from_checkpoint and not t.overwrite_output_dir and (found := earlier_run(t.output_dir)):
        checkpoints = any(CHECKPOINT_DIR.fullmatch(n) for n in found)
        what = "a finished run" if MANIFEST_NAME in found else "checkpoints of a run" if checkpoints else "a run"
        error = (f"--output_dir {t.output_dir} holds {what} ({', '.join(found[:3])}); pass --resume_from_checkpoint "
                 "auto to continue it, --overwrite_output_dir to start over, or pass another --output_dir")  # fmt: skip
    if error := broadcast_object(error):
        raise ValueError(error)


def clear_output_dir(output_dir: str) -> list[str]:
    """Rank 0, --overwrite_output_dir once the start-up has passed: remove an earlier run's files (earlier_run) and
    its final outputs' weights and config, so the folder holds only this run's; returns the names removed."""
    names = os.listdir(output_dir)
    gone = [n for n in names if n in RUN_FILES or n in OUTPUT_FILES or SHARD_NAME.fullmatch(n)
            or CHECKPOINT_DIR.fullmatch(n) or LEFTOVER.fullmatch(n)]  # fmt: skip
    for name in gone:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    fsync_dir(output_dir)
    return sorted(gone)


def new_dirs(path: str) -> list[str]:
    """The folders os.makedirs(path) would create (lock_output_dir does), deepest first; [] if path exists."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def unclaim_output_dir(lock, output_dir: str, made: list[str]) -> None:
    """Rank 0, for a run that stops before writing into output_dir: undo lock_output_dir, so the directory is
    as the run found it. The lock file goes (while still held: no other run can be using it), then the folders
    in `made` (new_dirs, taken before the claim) while empty; nothing a user or an earlier run put there is
    touched. lock None (the claim failed): only the empty folders go."""
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, LOCK_NAME))
        lock.close()
    for path in made:
        try:
            os.rmdir(path)  # refuses a folder that holds anything
        except OSError:
            break


class OutputDirClaim:
    """Collective, at start-up: claim --output_dir for this run, before anything is written there: the lock
    (lock_output_dir), then the earlier-run check (check_output_dir), remembering the folders the claim made. A
    claim that fails leaves the folder as it found it. release(started) at the run's end, also after an error: a run
    that stopped in its start-up leaves it as it found it (rank 0, unclaim_output_dir); otherwise the lock goes."""

    def __init__(self, cfg, is_main: bool) -> None:
        self.output_dir, self.is_main, self.lock = cfg.train.output_dir, is_main, None
        self.made = new_dirs(self.output_dir)  # what the lock's makedirs creates
        try:
            self.lock = lock_output_dir(self.output_dir)
            check_output_dir(cfg)
        except BaseException:
            self.release(started=False)
            raise

    def release(self, started: bool) -> None:
        if self.is_main and not started:
            unclaim_output_dir(self.lock, self.output_dir, self.made)  # the lock file and the folders this run made
        elif self.lock is not None:
            self.lock.close()  # releases the lock (a killed run's lock goes with its process)
