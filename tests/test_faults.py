"""Faults a user meets at start-up and mid-run: one-line errors naming the flag, file or sample (train.cli), bad
--pretrain_mm_mlp_adapter files, and SIGTERM (save, stop, resume exactly). The torchrun variants (2 ranks, a dead
agent) are in test_checkpoint.py, beside the reference run they compare with."""

import collections
import json
import os
import pickle
import re
import signal

import pytest
import torch
from conftest import flags, losses
from dist import run_distributed

import train
from minillava.config import parse_args
from minillava.formats import check_paths
from minillava.preemption import EXIT_CODE


def _cli(argv, capsys):
    code = train.cli(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "3"}, "error: --stage 3: supported: 1 (pretrain.sh) or 2 (finetune.sh)\n"),
        ({"model_name_or_path": "/no/such/vicuna"}, "error: --model_name_or_path /no/such/vicuna: does not exist"),
        ({"vision_tower": "/no/clip"}, "error: --vision_tower /no/clip: does not exist (a local folder is expected)"),
        ({"image_folder": "/no/images"}, "error: --image_folder /no/images: does not exist"),
        ({"data_path": "/no/data.json"}, "error: --data_path /no/data.json: does not exist (a local file is expected)"),
    ],
)
def test_start_up_errors_are_one_line_before_anything_is_loaded(assets, tmp_path, capsys, change, message):
    """The flag, the path and what is wrong in one line on stderr; --stage is checked before the missing-flag list
    (a bad --stage used to read "missing required flag(s)"); nothing is written to --output_dir."""
    out = str(tmp_path / "o")
    argv = flags(assets, out, **change) if "stage" not in change else ["--stage", "3", "--output_dir", out]
    code, err = _cli(argv, capsys)
    assert code == 1 and err.startswith(message) and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_start_up_errors_print_on_the_first_rank_of_each_node_only(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, err = _cli(flags(assets, str(tmp_path / "o"), model_name_or_path="/no/such"), capsys)
    assert code == 1 and err == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        ("dir", "is a folder without mm_projector.bin; expected a stage-1 mm_projector.bin"),
        ("list", "holds list; expected a stage-1 mm_projector.bin"),
        ("str", "holds a dict with non-tensor values"),
        (bytes(range(256)), "not a tensor file torch.load can read safely; expected"),
        ("pickle", "not a tensor file torch.load can read safely"),
        ("nan", r"NaN or inf values in 1 tensor\(s\), e.g. model.mm_projector.0.weight"),
        ("shape", r"mm_projector.0.weight has shape \(3, 3\), the model expects \(32, 32\)"),
    ],
)
def test_a_bad_adapter_file_is_named_with_what_was_expected(assets, tmp_path, content, message):
    """Every rank reads --pretrain_mm_mlp_adapter in check_paths, before any model; torch's own error (with its
    advice to load with weights_only=False) never reaches the user."""
    path = str(tmp_path / "mm_projector.bin")
    good = {f"model.mm_projector.{i}.{w}": torch.zeros(32, 32) if w == "weight" else torch.zeros(32)
            for i in (0, 2) for w in ("weight", "bias")}  # fmt: skip
    if isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    elif content == "dir":
        os.mkdir(path)
    elif content == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"w": collections.Counter()}, f, protocol=2)  # a class the weights_only unpickler refuses
    else:
        bad = {
            "list": [torch.zeros(2)],
            "str": {"model.mm_projector.0.weight": "x"},
            "nan": good | {"model.mm_projector.0.weight": torch.full((32, 32), float("nan"))},
            "shape": good | {"model.mm_projector.0.weight": torch.zeros(3, 3)},
        }[content]
        torch.save(bad, path)
    cfg = parse_args(flags(assets, str(tmp_path / "o"), pretrain_mm_mlp_adapter=path))
    with pytest.raises(ValueError, match=f"^--pretrain_mm_mlp_adapter {path}: {message}") as e:
        check_paths(cfg)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_data_file_errors_name_the_file(assets, tmp_path, capsys):
    latin1, empty = str(tmp_path / "latin1.json"), str(tmp_path / "empty.json")
    with open(latin1, "wb") as f:
        f.write('[{"id": "café", "conversations": []}]'.encode("latin-1"))
    with open(empty, "w") as f:
        json.dump([], f)
    code, err = _cli(flags(assets, str(tmp_path / "a"), data_path=latin1), capsys)
    assert code == 1 and err == f"error: --data_path {latin1}: not UTF-8 text (byte 0xe9 at offset 12); save the " \
        "file as UTF-8\n"  # fmt: skip
    code, err = _cli(flags(assets, str(tmp_path / "b"), data_path=empty), capsys)
    assert code == 1 and err == f"error: --data_path {empty}: the list holds no samples\n"


def test_a_bad_sample_mid_run_is_one_line_from_the_rank_that_read_it(assets, tmp_path, capsys, monkeypatch):
    """The image folder exists but a sample's image is missing (found only when the sample is read): the DataLoader
    worker's error (a traceback inside its message) becomes one line naming the sample and file, printed even by a
    rank other than the first."""
    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank that does not print start-up errors
    code, err = _cli(flags(assets, str(tmp_path / "o"), image_folder=str(images), dataloader_num_workers=1), capsys)
    line = err.splitlines()[-1] + "\n"  # the last line (no progress bar: stderr is not a terminal)
    assert code == 1 and "it/s" not in err and err.endswith(line), err
    assert line.startswith("error: sample ") and f"cannot read image {images}" in line


def _sigterm_at(step, sig=signal.SIGTERM):
    """train_step that sends this process a real SIGTERM (or `sig`) during optimizer step `step` (1-based)."""
    calls = []

    def step_fn(*args, **kw):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)
        return real(*args, **kw)

    real = train.train_step
    return step_fn


@pytest.mark.parametrize(("sig", "reason", "exit_code"), [(signal.SIGTERM, "SIGTERM", EXIT_CODE),
                                                          (signal.SIGINT, "SIGINT (Ctrl-C)", 130)])  # fmt: skip
def test_sigterm_saves_a_checkpoint_stops_and_resume_continues_exactly(assets, tmp_path, capsys, monkeypatch, sig,
                                                                        reason, exit_code):  # fmt: skip
    """SIGTERM (or Ctrl-C's SIGINT) during step 2 of 5: the step finishes, checkpoint-2 is written, exit code 143
    (130) with the resume hint, no traceback; --resume_from_checkpoint auto then gives the uninterrupted run's losses.
    Before, SIGTERM killed the process and everything since the last --save_steps was lost, and Ctrl-C printed a
    150-line traceback."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "o")
    common = dict(max_steps=5, save_steps=0, logging_steps=1)
    train.main(flags(assets, ref, **common))
    monkeypatch.setattr(train, "train_step", _sigterm_at(2, sig))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, err = _cli(flags(assets, out, **common), capsys)
    assert code == exit_code and "Traceback" not in err
    hint = f"saved {os.path.join(out, 'checkpoint-2')}; to continue, run the same command with --resume_from_checkpoint"
    assert err.endswith(f"stopped after step 2 of 5 ({reason}): {hint} auto\n"), err  # the last line
    assert sorted(os.listdir(out)).count("checkpoint-2") == 1 and not os.path.exists(os.path.join(out, "config.json"))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # main put them back
    monkeypatch.undo()
    train.main(flags(assets, out, resume_from_checkpoint="auto", **common))
    assert losses(out) == losses(ref)


def test_sigterm_in_the_last_step_finishes_the_run(assets, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    monkeypatch.setattr(train, "train_step", _sigterm_at(3))
    train.main(flags(assets, out, max_steps=3, save_steps=0))  # no Preempted: the final outputs are written
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint")]


def test_an_uncaught_error_with_dataloader_workers_exits(assets, tmp_path):
    """DataLoader workers ignore SIGTERM (SLURM signals them too); a crash whose traceback keeps them alive must
    still exit: multiprocessing's exit hook would SIGTERM them and wait forever (it hung before the atexit kill)."""
    import subprocess
    import sys

    paths = {k: str(v) for k, v in assets.items()}
    code = ("import train; from conftest import flags; "
            f"train.main(flags({paths!r}, {str(tmp_path / 'o')!r}, image_folder={str(tmp_path)!r}, "
            "dataloader_num_workers=1))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(train.__file__), os.path.dirname(__file__)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.rstrip().splitlines()[-1].count("train.SampleError: sample 11") == 1


def _data_fails_on_rank_1(rank, world, argv, out_dir):
    """train.main where rank 1's data file is seen written over in place after step 2 (its signature moves): rank 0's
    reads stay good. Each rank writes the error it raised."""
    from minillava.data import RecordFile

    real, done = train.train_step, []

    def step_then_change(*args, **kwargs):
        record = real(*args, **kwargs)
        done.append(1)
        if rank == 1 and len(done) == 2:
            RecordFile._signature = staticmethod(lambda fd: (-1, -1, -1))
        return record

    train.train_step, error = step_then_change, None
    try:
        train.main(argv)
    except ValueError as e:
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"error_{rank}.json"), "w") as f:
        json.dump(error, f)


@pytest.mark.dist
def test_a_rank_whose_data_fails_stops_every_rank_with_a_checkpoint(assets, tmp_path):
    """Rank 1's data file changes in place before step 3 while rank 0's reads succeed. Before, rank 1 raised and rank
    0 waited in step 3's collectives until the process group timed out (here 120 s), and the steps since the last
    save were lost. Now the ranks agree before the step: both save checkpoint-2 (the window's unread step 2 is
    logged first) and stop, rank 1 naming the file, rank 0 pointing at it; the run resumed on 1 rank (the same global
    batch) gives the uninterrupted run's losses."""
    common = dict(max_steps=5, save_steps=0, loss_reduction="global_token")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "o")
    train.main(flags(assets, ref, per_device_train_batch_size=4, logging_steps=1, **common))
    argv = flags(assets, out, logging_steps=3, **common)  # step 2 is queued unread when the data fails
    run_distributed(_data_fails_on_rank_1, tmp_path, argv, str(tmp_path), timeout_s=120)
    errors = [json.loads((tmp_path / f"error_{rank}.json").read_text()) for rank in (0, 1)]
    where = f"stopped before step 3 of 5: saved {os.path.join(out, 'checkpoint-2')}; once the data is fixed, run"
    assert errors[1].startswith(f"SampleError: --data_path {assets['data']}: the file changed while the run was "
                                "reading it (written over in place)") and where in errors[1], errors[1]  # fmt: skip
    assert errors[0].startswith("ValueError: another rank's data failed (its error is above); " + where), errors[0]
    assert [n for n in os.listdir(out) if n.startswith("checkpoint")] == ["checkpoint-2"]
    torch.testing.assert_close(losses(out), losses(ref)[:2], rtol=1e-5, atol=1e-5)  # step 2 was read and logged
    train.main(flags(assets, out, per_device_train_batch_size=4, logging_steps=1, resume_from_checkpoint="auto",
                     **common))  # fmt: skip
    torch.testing.assert_close(losses(out), losses(ref), rtol=1e-5, atol=1e-5)


def test_a_full_disk_is_one_line_other_os_errors_keep_their_traceback(monkeypatch, capsys):
    """The save's full-disk error (tests/test_checkpoint_faults.py) reaches the user as its one line."""
    import errno

    def fails(error):
        def main(argv):
            raise error

        return main

    full = OSError("no space left on device while writing out/checkpoint-2: free space or point --output_dir ...")
    full.errno = errno.ENOSPC
    monkeypatch.setattr(train, "main", fails(full))
    assert _cli([], capsys) == (1, f"error: {full}\n")
    monkeypatch.setattr(train, "main", fails(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        train.cli([])


def _train_process(argv, hold_step, tmp_path):
    """`python train.py argv` in a session of its own (as a terminal's foreground job), held before step
    `hold_step` until it is asked to stop (HOLD_HOOK), its output in a file."""
    import subprocess
    import sys

    from minillava.preemption import HOLD_HOOK

    env = {**os.environ, HOLD_HOOK: str(hold_step), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 (closed by the caller through proc)
    script = os.path.join(os.path.dirname(train.__file__), "train.py")
    proc = subprocess.Popen([sys.executable, script, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    return proc, tmp_path / "log.txt"


def _wait_for_line(proc, path, text, timeout=180):
    import time

    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()[-2000:]
        time.sleep(0.05)


def test_ctrl_c_to_the_process_group_saves_and_a_second_one_stops_at_once(assets, tmp_path):
    """Ctrl-C as a terminal sends it, to the whole process group (the trainer and its DataLoader worker): one line
    says so, the step finishes, checkpoint-2 is written, one line says how to resume, exit 130, no traceback. A second
    Ctrl-C right after the first ends the process at once (killed by SIGINT); whatever it left resumes to the end."""
    out = str(tmp_path / "o")
    argv = flags(assets, out, max_steps=4, save_steps=0, logging_steps=1, dataloader_num_workers=1)
    proc, log = _train_process(argv, 2, tmp_path)
    _wait_for_line(proc, log, "step 1/4")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text and "Ctrl-C: stopping after this step with a checkpoint" in text, text[-3000:]
    assert text.rstrip().splitlines()[-1] == (
        f"stopped after step 2 of 4 (SIGINT (Ctrl-C)): saved {out}/checkpoint-2; to continue, run the same command "
        "with --resume_from_checkpoint auto"
    )
    two = tmp_path / "twice"
    two.mkdir()
    argv = flags(assets, out, max_steps=6, save_steps=0, logging_steps=1, resume_from_checkpoint="auto")
    proc, log = _train_process(argv, 4, two)
    _wait_for_line(proc, log, "step 3/6")
    os.killpg(proc.pid, signal.SIGINT)
    _wait_for_line(proc, log, "Ctrl-C: stopping")  # two signals before the handler runs would count as one
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == -signal.SIGINT
    train.main(argv)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def test_ctrl_c_during_start_up_stops_at_once_in_one_line(assets, tmp_path, capsys, monkeypatch):
    """Before the first step there is nothing to save: Ctrl-C stops the start-up at once, in one line, exit 130,
    and leaves no --output_dir behind."""
    out = str(tmp_path / "o")

    def interrupted(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "build_model", interrupted)
    code, err = _cli(flags(assets, out), capsys)
    assert (code, err) == (130, "interrupted (Ctrl-C): nothing saved\n") and not os.path.exists(out)


def test_an_earlier_run_in_output_dir_is_refused_unless_resumed_or_overwritten(assets, tmp_path, capsys):
    """A second run into a folder holding a finished run refuses to start in one line naming the flags, leaving
    every file as it was; --overwrite_output_dir starts over (metrics.jsonl holds only the new run); checkpoints of
    an unfinished run are refused the same way and --resume_from_checkpoint auto continues them as before."""
    out = str(tmp_path / "o")
    argv = flags(assets, out, stage=1, max_steps=2, logging_steps=1)
    assert train.cli(argv) == 0
    files = lambda: {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n != ".minillava.lock"}  # noqa: E731
    before = files()
    capsys.readouterr()
    refused = (f"error: --output_dir {out} holds a finished run (manifest.json, metrics.jsonl, minillava_config.json);"
               " pass --resume_from_checkpoint auto to continue it, --overwrite_output_dir to start over, or pass "
               "another --output_dir\n")  # fmt: skip
    assert _cli(argv, capsys) == (1, refused)
    assert files() == before
    assert train.cli([*argv, "--overwrite_output_dir", "True", "--max_steps", "3"]) == 0
    assert "--overwrite_output_dir: removed the earlier run's config.json, manifest.json, metrics.jsonl, " \
           "minillava_config.json, mm_projector.bin" in capsys.readouterr().out  # fmt: skip
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [row["step"] for row in map(json.loads, f)] == [1, 2, 3]

    unfinished = str(tmp_path / "u")
    two = flags(assets, unfinished, max_steps=4, save_steps=2)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(train, "train_step", _sigterm_at(3))
    assert train.cli(two) == EXIT_CODE
    monkey.undo()
    capsys.readouterr()
    code, err = _cli(two, capsys)
    assert code == 1 and err.startswith(f"error: --output_dir {unfinished} holds checkpoints of a run (checkpoint-3, ")
    assert train.cli([*two, "--resume_from_checkpoint", "auto"]) == 0


def test_folders_given_to_the_wrong_flag_say_what_they_are_and_which_flag_takes_them(assets, tmp_path, capsys):
    """--pretrain_mm_mlp_adapter given a stage-1 output, a stage-2 folder or a checkpoint folder; generate and export
    given a stage-1 output (only a projector): one line each saying what the folder is and how to use it."""
    from minillava import generate

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(flags(assets, one, stage=1, max_steps=1))
    train.main(flags(assets, two, max_steps=2, save_steps=1, save_total_limit=1))
    for folder, message in ((one, f"is a folder; its projector is {one}/mm_projector.bin: pass that file"),
                            (two, "is a stage-2 model folder: --model_name_or_path takes it"),
                            (f"{two}/checkpoint-2", "is a training checkpoint (checkpoint-N): --resume_from_checkpoint "
                                                    "takes it")):  # fmt: skip
        cfg = parse_args(flags(assets, str(tmp_path / "o"), pretrain_mm_mlp_adapter=folder))
        with pytest.raises(ValueError, match=f"^--pretrain_mm_mlp_adapter {folder}: {re.escape(message)}"):
            check_paths(cfg)
    capsys.readouterr()
    with pytest.raises(ValueError, match=rf"^'{one}': a stage-1 output, which holds only the projector "
                                         rf"\({one}/mm_projector.bin\): train stage 2 from it"):  # fmt: skip
        generate.main(["--checkpoint", one, "--image", "x.png", "--prompt", "hi"])
