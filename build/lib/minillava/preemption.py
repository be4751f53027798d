"""Stopping cleanly when the job is being taken away: SIGTERM, which SLURM, Kubernetes and torchrun send before they
kill a job; SIGINT, which a terminal's Ctrl-C sends (torchrun forwards it); and a torchrun agent that died (kill -9)
under its workers.

Each one only sets a flag (StopRequest.reason). train.py folds the flag into the all-reduce every step already
makes and reads it with the step's other metrics, on the steps that log (every --logging_steps), save or end the
run, so all ranks see it after the same step; there they write a checkpoint and exit with EXIT_CODE, and the same
command with --resume_from_checkpoint auto continues as if nothing happened. Mind the grace period: torchrun
SIGKILLs its workers 30 s after forwarding SIGTERM (SLURM: KillWait, Kubernetes: terminationGracePeriodSeconds), so
up to --logging_steps steps (1 in LLaVA's scripts) plus one checkpoint save must fit in it.
"""

import atexit
import multiprocessing
import os
import signal
import threading
import time

EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job ended by SIGTERM
EXIT_CODES = {"SIGTERM": EXIT_CODE, "SIGINT": 130}  # 130 = 128 + SIGINT (Ctrl-C)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGENT_POLL_S = 0.1  # how often a torchrun worker checks that its agent is alive (one getppid() call)
AGENT_GRACE_S = 300.0  # a worker orphaned by its agent that has not stopped by then exits at once
HOLD_HOOK = "MINILLAVA_TEST_HOLD_BEFORE_STEP"  # tests only: =N holds every rank before step N until a stop request


_PARENT = os.getppid()  # at import, as early as possible: the torchrun agent that started this worker


class Preempted(Exception):
    """Raised by train.main after the preemption checkpoint is written; the message says how to resume, exit_code is
    what the process exits with (128 + the signal)."""

    def __init__(self, message: str, exit_code: int = EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Catches SIGTERM and SIGINT in this (main) thread and, under torchrun, watches the agent; `reason` is None until
    one happens. close() puts the previous handlers back. A second SIGTERM or SIGINT ends the process at once, as
    the signal does by default (checkpoints are published by a rename: one being written is left unpublished).
    Until arm() (the training loop's start) Ctrl-C raises KeyboardInterrupt: there is nothing to save yet."""

    def __init__(self, watch_agent: bool) -> None:
        self.reason: str | None = None
        self.armed = False
        self._closed = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        if watch_agent:
            threading.Thread(target=self._watch_agent, args=(_PARENT,), daemon=True).start()

    def arm(self) -> None:
        self.armed = True

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and not self.armed:
            raise KeyboardInterrupt
        if self.reason is not None and self.reason.startswith(name):  # asked twice: what the signal does by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if self.reason is None and name == "SIGINT" and os.environ.get("LOCAL_RANK", "0") == "0":
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, unsaved)", flush=True)
        self.reason = self.reason or (f"{name} (Ctrl-C)" if name == "SIGINT" else name)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get((self.reason or "").split(" ")[0], EXIT_CODE)

    def _watch_agent(self, agent: int) -> None:
        """torchrun starts every worker in a session of its own, so a kill -9 of torchrun leaves them running: the
        worker sees its parent change (it is re-parented) and asks the loop to stop."""
        while not self._closed.wait(AGENT_POLL_S):
            if os.getppid() != agent:
                self.reason = self.reason or f"the torchrun agent (pid {agent}) died"
                if os.environ.get("LOCAL_RANK", "0") == "0":
                    print(f"{self.reason}: stopping after this step (a checkpoint is saved first)", flush=True)
                if not self._closed.wait(AGENT_GRACE_S):
                    print(f"rank {os.environ.get('RANK')}: not stopped {AGENT_GRACE_S:.0f} s after the agent died "
                          "(waiting on a dead rank?): exiting", flush=True)  # fmt: skip
                    os._exit(EXIT_CODE)
                return

    def hold_for_test(self, step: int) -> None:
        """Tests only (HOLD_HOOK=step): wait here until a stop is requested, so a test's signal lands before a known
        step whatever the machine's load (not after some later step it happened to reach first)."""
        if os.environ.get(HOLD_HOOK) == str(step):
            deadline = time.monotonic() + 120
            while not self.requested and time.monotonic() < deadline:
                time.sleep(0.01)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def close(self) -> None:
        self._closed.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a job step and a terminal's Ctrl-C its whole
    process group, DataLoader workers included, and a worker killed by it fails the trainer at once (DataLoader's
    SIGCHLD handler). The workers end with their trainer instead: normally the DataLoader stops them; at exit,
    multiprocessing would SIGTERM (now ignored) and then wait for them forever, so the trainer SIGKILLs the ones still
    running first (atexit runs the newest hook first)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    children = multiprocessing.active_children()  # DataLoader workers kept alive by an exception's traceback
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader's handler would report these kills as a failure
    for child in children:
        child.kill()


atexit.register(_kill_leftover_workers)  # after multiprocessing.util's own exit hook (imported with torch), so first
