"""Hugging Face model folders in general: their config.json, what kind of folder one is (checkpoint_kind), the
weights of a pretrained LLM or tower folder (safetensors, sharded or not, or pytorch_model*.bin) keyed by our names,
and the layout of the sharded safetensors files minillava writes (transformers' save_pretrained layout)."""

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig

from minillava.backbones import llava_folder_llm_type, tower_config, tower_family

# Buffers that are non-persistent today; old checkpoints carry them (Vicuna's rotary inv_freq, CLIP's position_ids).
NON_PERSISTENT = (".inv_freq", ".position_ids")
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's names
WEIGHT_NAMES = (INDEX_NAME, "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")


def folder_config(path: str) -> dict:
    """A folder's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def checkpoint_kind(path: str) -> str | None:
    """ "llava-hf" (LlavaForConditionalGeneration), "llava" (LLaVA / minillava stage 2), "llava-lora" (a LoRA run's
    adapters) or None (anything else)."""
    conf = folder_config(path) if os.path.isfile(os.path.join(path, "config.json")) else {}
    if conf.get("model_type") == "llava" and "text_config" in conf:
        return "llava-hf"
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and "mm_hidden_size" in conf:
        return "llava-lora"
    return "llava" if llava_folder_llm_type(conf) and "mm_hidden_size" in conf else None


def unexpected_key(path: str, key: str) -> ValueError:
    return ValueError(f"{path!r}: unexpected weight {key!r} (only LLaVA-1.5 / llava-hf keys are mapped)")


def llm_config_of(conf: dict):
    """The LLM's config from a LLaVA config.json (its family from the LLaVA model_type): LLaVA's mm_* fields and the
    LLaVA model_type are dropped."""
    model_type = llava_folder_llm_type(conf) or conf.get("model_type", "llama")
    config_class = type(AutoConfig.for_model(model_type))
    known = config_class().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    return config_class(**{k: v for k, v in conf.items() if k in known | {"rope_theta", "rope_scaling"}})


def weight_files(folder: str) -> list[str]:
    """The files of an HF folder's weights, as read_weights reads them (the first of WEIGHT_NAMES it has, a sharded
    index's shards); [] when it has none. A shard may be missing (an interrupted download)."""
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if not name.endswith(".index.json"):
                return [path]
            with open(path) as f:
                return [os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    return []


def read_weights(folder: str, flag: str) -> dict[str, Tensor]:
    """All tensors of an HF folder: model.safetensors, a sharded index, or pytorch_model*.bin (weights_only)."""
    files = weight_files(folder)
    if not files:
        raise ValueError(f"{flag} {folder!r}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    if missing := [f for f in files if not os.path.isfile(f)]:
        raise ValueError(f"{flag} {folder!r}: {os.path.basename(missing[0])}, listed in its index, does not exist")
    out: dict[str, Tensor] = {}
    for file in files:
        try:
            out.update(load_file(file) if file.endswith(".safetensors") else torch.load(file, "cpu", weights_only=True))
        except Exception as e:  # safetensors' SafetensorError, torch.load's UnpicklingError / RuntimeError, OSError
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{flag} {folder!r}: cannot read {os.path.basename(file)} ({detail}): the file is "
                             "damaged or incomplete; download or copy it again") from e  # fmt: skip
    return out


def clip_vision_state(clip: dict[str, Tensor], vision_config=None) -> dict[str, Tensor]:
    """Tower weights keyed vision_tower.*: openai/clip-* and google/siglip-* folders (whole models) and transformers 4
    towers have a `vision_model.` level (the text half, if any, is dropped); a transformers 5 vision model has none.
    With a vision_config, the weights it has no place for are left out: the SigLIP layer and pooling head LLaVA-NeXT's
    tower deletes (backbones.tower_config)."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""
    keep = [k for k in clip if k.startswith(prefix) and not k.endswith(NON_PERSISTENT)]
    out = {f"vision_tower.{k.removeprefix(prefix)}": clip[k] for k in keep}
    if vision_config is not None and vision_config.model_type == "siglip_vision_model":
        n, head = vision_config.num_hidden_layers, getattr(vision_config, "vision_use_head", True)
        layer = re.compile(r"vision_tower\.encoder\.layers\.(\d+)\.")
        out = {k: v for k, v in out.items() if not ((m := layer.match(k)) and int(m.group(1)) >= n)
               and (head or not k.startswith("vision_tower.head."))}  # fmt: skip
    return out


def folder_tower_config(folder: str, where: str):
    """A tower folder's vision config, as LLaVA builds the tower (backbones.tower_config)."""
    model_type = folder_config(folder).get("model_type")
    tower_family(model_type, where)  # an unsupported type: one line naming the flag
    return tower_config(folder, model_type)


def pretrained_state_dict(llm_folder: str, tower_folder: str) -> dict[str, Tensor]:
    """Pretrained LLM + tower tensors (local folders) keyed by our names (llm.*, vision_tower.*), as stored; no
    projector."""
    llm = read_weights(llm_folder, "--model_name_or_path")
    out = {f"llm.{k}": v for k, v in llm.items() if not k.endswith(NON_PERSISTENT)}
    if "llm.lm_head.weight" not in out and "llm.model.embed_tokens.weight" in out:  # tied (tie_word_embeddings):
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]  # the model's state dict names it twice
    tower = read_weights(tower_folder, "--vision_tower")
    return out | clip_vision_state(tower, folder_tower_config(tower_folder, "--vision_tower"))


# safetensors' dtype names, listed in the order of its Dtype enum: save_file lays a file's tensors out by descending
# enum order (so by descending alignment), then by name.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.complex64: "C64",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # fmt: skip


_DTYPE_ORDER = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}


def safetensors_header(tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> tuple[bytes, dict[str, int]]:
    """What safetensors.torch.save_file(..., metadata={"format": "pt"}) writes before the data of a file holding
    `tensors` (key, dtype, shape), and the file offset where each key's bytes (row-major) go. Writing every tensor
    there gives save_file's file byte for byte, in any order and without holding them all: the 8-byte little-endian
    header length, then the compact JSON header (metadata first, tensors in layout order) padded with spaces to a
    multiple of 8 bytes."""
    layout = sorted(tensors, key=lambda t: (-_DTYPE_ORDER[t[1]], t[0]))
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for key, dtype, shape in layout:
        end = begin + math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    offsets = {key: start + info["data_offsets"][0] for key, info in header.items() if key != "__metadata__"}
    return struct.pack("<Q", len(text)) + text, offsets


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split (key, bytes) pairs, in order, into shard files as transformers' shard_checkpoint (LLaVA's transformers
    4.31 save_pretrained) does: a tensor that would overflow the current shard starts the next one, so a tensor
    larger than max_shard_bytes fills a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    """The i-th (0-based) of n safetensors shards, as transformers' save_pretrained names them."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
