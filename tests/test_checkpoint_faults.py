"""Faults around checkpoints: a second run on the same --output_dir. In-process 1-rank runs (each well under a
second) unless marked dist."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import flags
from dist import run_distributed

import train
from minillava.outputs import LOCK_NAME, lock_file, lock_output_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """import sys, time
from minillava.outputs import lock_file
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
