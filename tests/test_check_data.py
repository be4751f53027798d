"""`python -m minillava.check_data`: exit codes and the listing of every bad record, run in-process via main(argv)."""

import json
import os
import subprocess
import sys

from PIL import Image

from minillava.check_data import main


def H(v):
    return {"from": "human", "value": v}


def G(v):
    return {"from": "gpt", "value": v}


def write(tmp_path, records):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return ["--data_path", str(path), "--image_folder", str(folder)]


BAD = [  # (record, reason substring)
    ({"id": "missing", "image": "nope.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "nope.png"),
    ({"id": "corrupt", "image": "corrupt.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "cannot read image"),
    ({"id": "noconv", "image": "ok.png"}, "no 'conversations'"),
    ({"id": "alt", "conversations": [H("Hi?"), H("Hi?"), G("Yes.")]}, "alternate"),
    ({"id": "stray", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "no 'image' key"),
    ({"id": "forgot", "image": "ok.png", "conversations": [H("Hi?"), G("Yes.")]}, "exactly one <image>"),
    ({"id": "empty", "conversations": [H(" "), G(" ")]}, "zero words"),
]
GOOD = [
    {"id": "img", "image": "ok.png", "conversations": [H("What is it?\n<image>"), G("A red box.")]},
    {"id": "text", "conversations": [H("Hi?"), G("Yes."), H("Sure?"), G("Yes.")]},
]


def test_clean_dataset_exits_zero(llava_data, capsys):
    json_path, folder = llava_data
    assert main(["--data_path", json_path, "--image_folder", folder]) == 0
    out = capsys.readouterr().out
    assert "0 bad of 8 samples" in out and "BAD" not in out


def test_every_bad_record_is_listed(tmp_path, capsys):
    records = [GOOD[0], *[r for r, _ in BAD], GOOD[1]]
    assert main([*write(tmp_path, records), "--num_workers", "3"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(lines) == len(BAD)
    for k, (line, (record, reason)) in enumerate(zip(lines, BAD, strict=True)):
        assert line.startswith(f"BAD sample {k + 1} id={record['id']!r}: ") and reason in line, line


def test_tokenizer_checks_find_fully_masked_samples(tmp_path, tokenizer_dir, capsys):
    long = {"id": "long", "conversations": [H("What is the colour of the shape? " * 30), G("Red.")]}
    argv = write(tmp_path, [*GOOD, long])
    assert main(argv) == 0  # structure alone is fine
    tiny = ["--image_tokens", "4"]  # a tiny tower's 2 x 2 patches: only 'long' loses its answer
    assert main([*argv, "--model_name_or_path", tokenizer_dir, "--model_max_length", "64", *tiny]) == 1
    out = capsys.readouterr().out
    assert "BAD sample 2 id='long': no supervised tokens within --model_max_length 64" in out
    assert "1 bad of 3 samples (checked structure, image files, tokenization;" in out
    assert main([*argv, "--tokenizer", tokenizer_dir, "--model_max_length", "2048"]) == 0
    # CLIP-L/336's 576 image tokens (the default) push the image sample's short answer past 64 positions too
    assert main([*argv, "--model_name_or_path", tokenizer_dir, "--model_max_length", "64"]) == 1
    out = capsys.readouterr().out
    assert "BAD sample 0 id='img': no supervised tokens within --model_max_length 64: its 576 image tokens" in out


def test_version_rules_and_vision_tower(tmp_path, tokenizer_dir, image_processor, capsys):
    argv = write(tmp_path, GOOD)
    image_processor.save_pretrained(tmp_path / "clip")
    extra = ["--vision_tower", str(tmp_path / "clip"), "--image_aspect_ratio", "pad"]
    assert main([*argv, "--version", "v1", "--model_name_or_path", tokenizer_dir, *extra]) == 0
    assert "checked structure, image files, tokenization, pixels; version v1" in capsys.readouterr().out
    assert main([*argv, "--version", "plain"]) == 1  # plain captions need an image in every sample
    assert "BAD sample 1 id='text': " in capsys.readouterr().out


def test_unusable_input_exits_two(tmp_path, capsys):
    (tmp_path / "dict.json").write_text(json.dumps({"id": 1}))
    assert main(["--data_path", str(tmp_path / "dict.json")]) == 2
    assert "expected a JSON list" in capsys.readouterr().err
    assert main(["--data_path", str(tmp_path / "dict.json"), "--version", "v9"]) == 2
    assert "known versions" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    argv = write(tmp_path, [GOOD[0], BAD[0][0]])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run(
        [sys.executable, "-m", "minillava.check_data", *argv], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert "BAD sample 1 id='missing'" in proc.stdout and "1 bad of 2 samples" in proc.stdout
