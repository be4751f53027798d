"""`python -m minillava.check_data`: exit codes and the listing of every bad record, run in-process via main(argv)."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import write_png_header
from PIL import Image

import minillava.data
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
    assert "1 bad of 3 samples (checked structure, decoded images, tokenization;" in out
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
    assert "checked structure, decoded images, tokenization, pixels; version v1" in capsys.readouterr().out
    assert main([*argv, "--version", "plain"]) == 1  # plain captions need an image in every sample
    assert "BAD sample 1 id='text': " in capsys.readouterr().out


def test_images_are_decoded_as_training_decodes_them(tmp_path, capsys):
    """PIL verify() passes all three bad files here; training's open_image refuses each, so check_data must too."""
    images = ["truncated.png", "wide.png", "deep.tif", "grey16.png"]
    argv = write(tmp_path, [{"id": x, "image": x, "conversations": [H("<image>\nHi?"), G("Yes.")]} for x in images])
    folder = tmp_path / "images"
    write_png_header(folder / "truncated.png", 40, 30)
    write_png_header(folder / "wide.png", 30000, 8)
    Image.fromarray(np.array([[0, 1 << 20]], dtype=np.int32)).save(folder / "deep.tif")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(folder / "grey16.png")  # fine: scaled to 8 bits
    assert main([*argv, "--num_workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "BAD sample 0 id='truncated.png': cannot read image " in out and "truncated" in out
    assert "BAD sample 1 id='wide.png': cannot read image " in out and "30000x8 has aspect ratio 3750:1" in out
    assert "BAD sample 2 id='deep.tif': cannot read image " in out and "PIL mode 'I' with values outside" in out
    assert "3 bad of 4 samples" in out


def test_size_bound_is_training_rule_for_the_aspect_ratio(tmp_path, monkeypatch, capsys):
    """One home for the rule: data.py's bound, with the canvas counted under pad only (ok.png is 40x30)."""
    monkeypatch.setattr(minillava.data, "MAX_IMAGE_PIXELS", 40 * 30)
    argv = write(tmp_path, GOOD[:1])
    assert main([*argv, "--image_aspect_ratio", "square"]) == 0
    assert main([*argv, "--image_aspect_ratio", "pad"]) == 1
    assert "BAD sample 0 id='img': cannot read image " in capsys.readouterr().out
    assert main([*argv]) == 1  # pad, LLaVA-1.5's finetuning setting, is the default
    assert "40x30 pads to 40x40 = 1,600 pixels, over the limit of 1,200 (downscale it)" in capsys.readouterr().out


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
