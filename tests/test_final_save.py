"""The stage-2 final save's on-disk pieces: safetensors headers written ahead of the data."""

import math

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minillava.formats import SAFETENSORS_DTYPES, safetensors_header


def _random(shape, dtype, gen):
    """Random bytes as a tensor of any dtype (0/1 for bool)."""
    raw = torch.randint(0, 2 if dtype is torch.bool else 256, (math.prod(shape) * dtype.itemsize,), generator=gen)
    return raw.to(torch.uint8).view(dtype).reshape(shape)


def test_safetensors_header_gives_save_files_bytes(tmp_path):
    """Every dtype, in mixed order, with a scalar and an empty tensor: header + each tensor's bytes at its offset
    (written in the given order, not the file's) are save_file's file byte for byte."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (), (0, 4), (2, 1, 3), (7,)]
    tensors = {f"t{(i * 7) % 16}.{dtype}": _random(shapes[i % len(shapes)], dtype, gen)
               for i, dtype in enumerate(reversed(SAFETENSORS_DTYPES))}  # fmt: skip
    save_file(tensors, tmp_path / "theirs", metadata={"format": "pt"})
    header, offsets = safetensors_header((k, t.dtype, t.shape) for k, t in tensors.items())
    with open(tmp_path / "ours", "wb") as f:
        f.write(header)
        for key, t in tensors.items():
            f.seek(offsets[key])
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    with safe_open(tmp_path / "ours", "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)

