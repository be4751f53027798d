"""train.py as a user meets it: `--help` prints and exits 0."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_prints_and_exits_0():
    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == ""
    first = run.stdout.splitlines()[:5]
    assert first[0].startswith("usage: [torchrun ...] train.py [--stage {1,2}] --model_name_or_path DIR")
    assert first[2:5] == [
        "Train LLaVA-1.5 with FSDP2 in LLaVA's two stages (scripts/v1_5):",
        "  --stage 1  pretrain the projector on image-caption pairs (pretrain.sh); writes output_dir/mm_projector.bin",
        "  --stage 2  finetune the LLM and the projector on conversations (finetune.sh); writes a LLaVA-format model "
        "folder",
    ]
    assert "torchrun --nproc_per_node 8 train.py --stage 1 --model_name_or_path" in run.stdout
