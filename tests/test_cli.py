"""train.py as a user meets it: `--help` prints and exits 0, a start-up error is one line on stderr (exit 1) before
any model is loaded where it can be, and a run that fails its start-up leaves --output_dir as it found it."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from conftest import flags

import train
from minillava.config import parse_args
from minillava.formats import check_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_prints_and_exits_0():
    """--help prints and exits 0 without importing torch (it opens at once; -X importtime lists every import)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()}
    assert run.returncode == 0 and "minillava.config" in imported and not {"torch", "transformers"} & imported
    first = run.stdout.splitlines()[:5]
    assert first[0].startswith("usage: [torchrun ...] train.py [--stage {1,2}] --model_name_or_path DIR")
    assert first[2:5] == [
        "Train LLaVA-1.5 with FSDP2 in LLaVA's two stages (scripts/v1_5):",
        "  --stage 1  pretrain the projector on image-caption pairs (pretrain.sh); writes output_dir/mm_projector.bin",
        "  --stage 2  finetune the LLM and the projector on conversations (finetune.sh); writes a LLaVA-format model "
        "folder",
    ]
    assert "torchrun --nproc_per_node 8 train.py --stage 1 --model_name_or_path" in run.stdout


def _without_wandb(monkeypatch):
    """find_spec says wandb is absent, whether or not it is installed here."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))


def _bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": ')
    return {"data_path": str(path)}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wandb", "--report_to wandb: wandb is not installed: pip install wandb (or pip install 'minillava[wandb]')"),
        ("resume", "--resume_from_checkpoint {missing}: does not exist"),
        ("data", "--data_path {bad}: cannot read JSON"),  # read after the model is built
    ],
)
def test_a_failed_start_up_leaves_no_output_dir(assets, tmp_path, monkeypatch, capsys, case, message):
    """Each error is one line, and the nested --output_dir the run would have made is not there (before, the
    missing wandb was a ModuleNotFoundError after the model was loaded, and the other two left output_dir with
    the lock and minillava_config.json)."""
    missing, bad = str(tmp_path / "nowhere" / "checkpoint-2"), str(tmp_path / "bad.json")
    over = {"wandb": {"report_to": "wandb"}, "resume": {"resume_from_checkpoint": missing}, "data": _bad_json(tmp_path)}
    if case == "wandb":
        _without_wandb(monkeypatch)
    out = tmp_path / "runs" / "a" / "o"
    assert train.cli(flags(assets, str(out), **over[case])) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + message.format(missing=missing, bad=bad))
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_up_leaves_an_existing_output_dir_as_it_was(assets, tmp_path):
    """A folder the user made, with their file and an earlier run's checkpoint in it: nothing is added or removed
    (before: .minillava.lock and minillava_config.json were left in it)."""
    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "COMPLETE").write_text("")
    (out / "notes.txt").write_text("mine")
    before = sorted(os.walk(out))
    assert train.cli(flags(assets, str(out), **_bad_json(tmp_path))) == 1
    assert sorted(os.walk(out)) == before and (out / "notes.txt").read_text() == "mine"


def test_wandb_installed_passes_the_start_up_check(assets, tmp_path, monkeypatch):
    cfg = parse_args(flags(assets, str(tmp_path / "o"), report_to="wandb"))
    _without_wandb(monkeypatch)
    with pytest.raises(ValueError, match="pip install wandb"):
        check_paths(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    check_paths(cfg)


def _tool(args, **env):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})  # fmt: skip


def test_tools_print_one_line_errors_and_keep_the_traceback_for_developers(assets, tmp_path):
    """generate and export on a missing folder and on a damaged safetensors file: one `error:` line naming it, exit 1
    (they printed 80-line tracebacks); MINILLAVA_DEBUG=1 keeps the traceback."""
    missing = str(tmp_path / "no_such_model")
    run = _tool(["minillava.generate", "--checkpoint", missing, "--image", "x.png", "--prompt", "hi"])
    assert (run.returncode, run.stdout) == (1, "") and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: --checkpoint {missing}") and "Traceback" not in run.stderr
    damaged = tmp_path / "llm"
    shutil.copytree(assets["llm"], damaged)
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    args = ["minillava.export", "--model_name_or_path", str(damaged), "--pretrain_mm_mlp_adapter", missing,
            "--vision_tower", assets["clip"], "--output", str(tmp_path / "hf")]  # fmt: skip
    run = _tool(args)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"error: --model_name_or_path {str(damaged)!r}: cannot read model.safetensors (")
    assert run.stderr.rstrip().endswith("the file is damaged or incomplete; download or copy it again")
    assert not (tmp_path / "hf").exists()
    run = _tool(args, MINILLAVA_DEBUG="1")
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr


def test_a_start_up_error_under_torchrun_is_one_line_and_names_itself_in_torchruns_report(assets, tmp_path):
    """torchrun, 2 ranks, a data file that is not JSON: the first rank prints the one line, once; torchrun's own
    failure report (printed after it, exit code 1) names it for each rank (`traceback : error: ...`, from the ranks'
    error files) instead of "To enable traceback see ..."."""
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    argv = flags(assets, str(tmp_path / "o"), data_path=str(bad))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    line = f"error: --data_path {bad}: cannot read JSON: "
    printed = [x for x in run.stderr.splitlines() if x.startswith(line)]
    assert run.returncode == 1 and len(printed) == 1, run.stderr[-3000:]  # once, by the first rank
    assert run.stderr.count(f"traceback : {line}") == 2 and "To enable traceback" not in run.stderr  # each rank's
