"""Every on-disk format minillava reads or writes, and the starting state of a run built from them.

- LLaVA's key names (to_llava_key / from_llava_key): the module tree of llava/model/llava_arch.py.
- mm_projector.bin: read and checked against the projector; its content when written (llava/train/train.py
  safe_save_model_for_hf_trainer, tune_mm_mlp_adapter branch).
- a LLaVA stage-2 folder: config.json (LlavaLlamaForCausalLM, model_type llava_llama, or LLaVA-NeXT's class and
  type for another LLM family; LLaVA's mm_* fields) plus sharded safetensors and their index, as
  llava/model/builder.py load_pretrained_model reads it.
- a llava-hf folder: transformers' LlavaForConditionalGeneration (convert_llava_weights_to_hf.py).
- pretrained LLM / CLIP folders (safetensors, sharded or not, or pytorch_model*.bin), given as a local folder or a
  Hugging Face Hub id read from the hub cache (local_folder), as transformers' from_pretrained resolves a name.
- the run's start: model configs, LlavaSettings and rank 0's full initial weights from the flags.
- a LoRA run's output_dir (llava/train/train.py end of train()): config.json, peft's adapter_config.json and
  adapter_model.safetensors, non_lora_trainables.bin (the projector), keys under PeftModel's base_model.model.
- manifest.json: what a run's result depends on beyond its flags (code, library versions, data, tokenizer).
- the records cache: where each record of a data file starts, and its word count (data.load_records).

No torch.distributed: tensors come back as stored; callers cast, shard and gather (outputs.py writes).
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import fields

import torch
from huggingface_hub import constants, list_repo_files, snapshot_download, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava import LlavaImageProcessorPil

from minillava.backbones import llava_folder_llm_type, llm_family, tower_config, tower_family
from minillava.lora import merge_lora
from minillava.model import LlavaSettings, build_projector

# Buffers that are non-persistent today; old checkpoints carry them (Vicuna's rotary inv_freq, CLIP's position_ids).
_NON_PERSISTENT = (".inv_freq", ".position_ids")
_STRATEGY = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> vision_feature_select_strategy
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
EMBEDDINGS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")  # the rows a llava-hf export appends to


# ---------------------------------------------------------------------------------------------- key names

# Our parameter name prefix -> LLaVA's (LlavaLlamaForCausalLM: model.*, lm_head.*, model.mm_projector.*, and CLIP
# under model.vision_tower.vision_tower.vision_model.*: transformers 5 dropped CLIPVisionModel's `vision_model.`
# level, LLaVA's transformers 4 has it).
_LLAVA = (("llm.model.", "model."), ("llm.lm_head.", "lm_head."), ("mm_projector.", "model.mm_projector."),
          ("vision_tower.", "model.vision_tower.vision_tower.vision_model."))  # fmt: skip
_LLAVA_TOWER = "model.vision_tower.vision_tower."  # then a CLIP state dict (clip_vision_state)
# Our names <-> LlavaForConditionalGeneration's in-memory names. Its from_pretrained maps every on-disk layout to
# these (transformers <= 4.51 and 5.x save_pretrained, >= 4.52's, hub folders with CLIP's vision_model. level) and
# its save_pretrained picks the on-disk one, so no llava-hf file key is spelled here.
_HF = (("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
       ("mm_projector.0.", "model.multi_modal_projector.linear_1."),
       ("mm_projector.2.", "model.multi_modal_projector.linear_2."))  # fmt: skip


def to_llava_key(name: str) -> str:
    """Our parameter name -> LLaVA checkpoint key."""
    for ours, theirs in _LLAVA:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise ValueError(f"to_llava_key: {name!r} is not a LlavaModel parameter name")


def to_hf_key(name: str) -> str:
    """Our parameter name -> LlavaForConditionalGeneration's (in memory)."""
    ours, theirs = next((o, t) for o, t in _HF if name.startswith(o))
    return theirs + name[len(ours) :]


def from_hf_key(key: str, path: str) -> str:
    """LlavaForConditionalGeneration's in-memory name -> ours."""
    for ours, theirs in _HF:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise _unexpected(path, key)


def _unexpected(path: str, key: str) -> ValueError:
    return ValueError(f"{path!r}: unexpected weight {key!r} (only LLaVA-1.5 / llava-hf keys are mapped)")


def from_llava_key(key: str, path: str) -> str:
    """A LLaVA checkpoint key outside the CLIP copy -> our name (the longest matching prefix wins)."""
    for ours, theirs in sorted(_LLAVA[:3], key=lambda p: -len(p[1])):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise _unexpected(path, key)


def clip_vision_state(clip: dict[str, Tensor], vision_config=None) -> dict[str, Tensor]:
    """Tower weights keyed vision_tower.*: openai/clip-* and google/siglip-* folders (whole models) and transformers 4
    towers have a `vision_model.` level (the text half, if any, is dropped); a transformers 5 vision model has none.
    With a vision_config, the weights it has no place for are left out: the SigLIP layer and pooling head LLaVA-NeXT's
    tower deletes (backbones.tower_config)."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""
    keep = [k for k in clip if k.startswith(prefix) and not k.endswith(_NON_PERSISTENT)]
    out = {f"vision_tower.{k.removeprefix(prefix)}": clip[k] for k in keep}
    if vision_config is not None and vision_config.model_type == "siglip_vision_model":
        n, head = vision_config.num_hidden_layers, getattr(vision_config, "vision_use_head", True)
        layer = re.compile(r"vision_tower\.encoder\.layers\.(\d+)\.")
        out = {k: v for k, v in out.items() if not ((m := layer.match(k)) and int(m.group(1)) >= n)
               and (head or not k.startswith("vision_tower.head."))}  # fmt: skip
    return out


def folder_tower_config(folder: str, where: str):
    """A tower folder's vision config, as LLaVA builds the tower (backbones.tower_config)."""
    model_type = _config(folder).get("model_type")
    tower_family(model_type, where)  # an unsupported type: one line naming the flag
    return tower_config(folder, model_type)


# ---------------------------------------------------------------------------------------------- weight files


WEIGHT_NAMES = (INDEX_NAME, "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")


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


# ---------------------------------------------------------------------------------------------- hub ids

# Files of a hub repo no reader here uses: other frameworks' weights (openai/clip-* ship a TF and a Flax copy).
_NOT_READ = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "*.mlmodel", "*.pth", "*.pt", "*.ckpt"]


def is_repo_id(name: str) -> bool:
    """A valid Hugging Face Hub repo id (lmsys/vicuna-7b-v1.5, gpt2), as huggingface_hub validates one."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached(repo_id: str) -> str | None:
    """The hub cache's snapshot folder of `repo_id` at main (its config.json is there), or None. The cache is
    huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub, read when huggingface_hub is imported)."""
    config = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def local_folder(name: str, flag: str) -> str:
    """The folder to read for a model flag as given: a local folder is itself; a hub repo id is its snapshot in the
    hub cache (nothing is downloaded here: download, train.fetch_models). ValueError naming the flag otherwise."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not is_repo_id(name):
        why = "is not a folder" if os.path.exists(name) else "does not exist"
        raise ValueError(f"{flag} {name}: {why} (a local folder is expected)")
    if folder := _cached(name):
        return folder
    where = f"not a local folder, and not a model in the hub cache at {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{flag} {name}: does not exist ({where}; downloads are off (HF_HUB_OFFLINE=1): unset it, "
                         f"or run `hf download {name}` where the hub can be reached)")  # fmt: skip
    raise ValueError(f"{flag} {name}: does not exist ({where}; download it with `hf download {name}`)")


def download(name: str, flag: str) -> None:
    """Put hub id `name` into the hub cache unless it is a local folder, its snapshot there has all its weights, or
    downloads are off (HF_HUB_OFFLINE=1): huggingface_hub's snapshot_download of what the readers use (configs,
    tokenizer, processor, one copy of the weights: safetensors when the repo has them). ValueError naming the flag if
    the hub refuses or cannot be reached. Call it on one process per node (train.fetch_models)."""
    if os.path.isdir(name) or not is_repo_id(name) or constants.HF_HUB_OFFLINE:
        return
    if (folder := _cached(name)) and (files := weight_files(folder)) and all(map(os.path.isfile, files)):
        return
    try:
        skip = list(_NOT_READ)
        if any(f.endswith(".safetensors") for f in list_repo_files(name)):  # one copy, the one read_weights reads
            skip.append("pytorch_model*")
        snapshot_download(name, ignore_patterns=skip)
    except Exception as e:  # HfHubHTTPError (not found, gated, 5xx), connection errors, OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{flag} {name}: does not exist (not a local folder, and the Hugging Face Hub download "
                         f"failed: {type(e).__name__}: {reason})") from e  # fmt: skip


def fetch(name: str, flag: str) -> str:
    """download then local_folder: what a one-process tool (generate, export, check_data) calls for a model flag."""
    download(name, flag)
    return local_folder(name, flag)


def pretrained_state_dict(model_name_or_path: str, vision_tower: str) -> dict[str, Tensor]:
    """Pretrained LLM + CLIP tensors keyed by our names (llm.*, vision_tower.*), as stored; no projector."""
    llm = read_weights(local_folder(model_name_or_path, "--model_name_or_path"), "--model_name_or_path")
    out = {f"llm.{k}": v for k, v in llm.items() if not k.endswith(_NON_PERSISTENT)}
    if "llm.lm_head.weight" not in out and "llm.model.embed_tokens.weight" in out:  # tied (tie_word_embeddings):
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]  # the model's state dict names it twice
    tower = local_folder(vision_tower, "--vision_tower")
    return out | clip_vision_state(read_weights(tower, "--vision_tower"), folder_tower_config(tower, "--vision_tower"))


# ---------------------------------------------------------------------------------------------- mm_projector.bin


ADAPTER_EXPECTED = "a stage-1 mm_projector.bin (torch.save of {name: tensor}, as train.py --stage 1 writes it)"


def _folder_advice(path: str) -> str:
    """What a folder given as --pretrain_mm_mlp_adapter is, and the flag that takes it."""
    if os.path.isfile(projector := os.path.join(path, "mm_projector.bin")):
        return f"is a folder; its projector is {projector}: pass that file"
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return ("is a training checkpoint (checkpoint-N): --resume_from_checkpoint takes it (with the run's flags); "
                f"--pretrain_mm_mlp_adapter takes {ADAPTER_EXPECTED}")  # fmt: skip
    if checkpoint_kind(path) is not None:
        return ("is a stage-2 model folder: --model_name_or_path takes it (to finetune it further), with no "
                f"--pretrain_mm_mlp_adapter (it has its projector); that flag takes {ADAPTER_EXPECTED}")  # fmt: skip
    return f"is a folder without mm_projector.bin; expected {ADAPTER_EXPECTED}"


def _read_adapter(path: str) -> dict[str, Tensor]:
    """torch.load(weights_only=True) of --pretrain_mm_mlp_adapter; every way it can be wrong is one ValueError line
    naming the file and what was expected (never torch's own advice to load untrusted pickles)."""
    flag = f"--pretrain_mm_mlp_adapter {path}"
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {_folder_advice(path)}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: does not exist; expected {ADAPTER_EXPECTED}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{flag}: the file is empty; expected {ADAPTER_EXPECTED}")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, ... depending on the bytes (torch's advice is unsafe)
        raise ValueError(f"{flag}: not a tensor file torch.load can read safely; expected {ADAPTER_EXPECTED}") from e
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        got = type(weights).__name__ if not isinstance(weights, dict) else "a dict with non-tensor values"
        raise ValueError(f"{flag}: holds {got}; expected {ADAPTER_EXPECTED}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{flag}: NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]} (did stage 1 diverge?)")
    return weights


def read_mm_projector(model: nn.Module, path: str) -> dict[str, Tensor]:
    """LLaVA's mm_projector.bin as {mm_projector.*: tensor in the param dtype}, checked against model.mm_projector
    (shapes and dtypes only: a meta-device model will do)."""
    weights = _read_adapter(path)
    # llava/model/llava_arch.py initialize_vision_modules: keys after the last "mm_projector."
    weights = {k.split("mm_projector.")[-1]: v for k, v in weights.items() if "mm_projector." in k}
    expected = model.mm_projector.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {path}: missing keys {missing}, unexpected keys {unexpected} "
            "(is --mm_projector_type the one the adapter was trained with?)"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"--pretrain_mm_mlp_adapter {path}: mm_projector.{k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(expected[k].shape)}"
            )
    return {f"mm_projector.{k}": v.to(expected[k].dtype) for k, v in weights.items()}


def load_mm_projector(model: nn.Module, path: str) -> None:
    """Load --pretrain_mm_mlp_adapter into an unsharded model, strict; ValueError naming the file."""
    weights = read_mm_projector(model, path)
    model.mm_projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in weights.items()}, strict=True)


def _projector_holder(projector_type: str, vision_config, llm_config) -> nn.Module:
    holder = nn.Module()  # read_mm_projector / load_mm_projector take any module with an .mm_projector
    holder.mm_projector = build_projector(projector_type, vision_config.hidden_size, llm_config.hidden_size)
    return holder


def projector_state(projector_type: str, vision_config, llm_config, adapter: str | None = None) -> dict[str, Tensor]:
    """mm_projector.* weights of a new projector: PyTorch's default init from the global RNG (as LLaVA), or those
    of the `adapter` mm_projector.bin."""
    holder = _projector_holder(projector_type, vision_config, llm_config)
    if adapter:
        load_mm_projector(holder, adapter)
    return holder.state_dict()


def mm_projector_content(named: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The mm_projector.bin dict from (our name, tensor) pairs: keys model.mm_projector.*, tensors in `dtype`."""
    return {to_llava_key(n): t.to(dtype) for n, t in named}


# ---------------------------------------------------------------------------------------------- safetensors shards

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


# ---------------------------------------------------------------------------------------------- LLaVA folders


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def checkpoint_kind(path: str) -> str | None:
    """ "llava-hf" (LlavaForConditionalGeneration), "llava" (LLaVA / minillava stage 2), "llava-lora" (a LoRA run's
    adapters) or None (anything else)."""
    conf = _config(path) if os.path.isfile(os.path.join(path, "config.json")) else {}
    if conf.get("model_type") == "llava" and "text_config" in conf:
        return "llava-hf"
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and "mm_hidden_size" in conf:
        return "llava-lora"
    return "llava" if llava_folder_llm_type(conf) and "mm_hidden_size" in conf else None


def _check_kind(path: str) -> str:
    if (kind := checkpoint_kind(path)) is None:
        raise ValueError(f"{path!r}: not a llava-hf or LLaVA-format stage-2 folder (config.json model_type)")
    if kind == "llava-lora":
        raise ValueError(f"{path!r}: LoRA adapters, not a model: python -m minillava.export --merge_lora {path} "
                         "--output DIR writes the stage-2 folder")  # fmt: skip
    return kind


def llava_config(model: nn.Module, cfg, dtype: torch.dtype) -> dict:
    """A LLaVA folder's config.json: the LLM's config plus LLaVA's mm_* fields (llava/train/train.py,
    llava/model/llava_arch.py), model_type the family's LLaVA one (llava_llama for LLaVA-1.5; LLaVA-NeXT's
    llava_mistral, llava_qwen). The inverse of read_settings."""
    conf = model.llm.config.to_dict()
    m, t, s = cfg.model, cfg.train, run_settings(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    family = llm_family(model.llm.config, "the LLM")
    conf.update(
        model_type=family.llava_model_type,
        architectures=[family.llava_class],
        dtype=dtype_name,  # of the saved weights (the in-memory LLM config says float32)
        torch_dtype=dtype_name,  # the key transformers 4.x (LLaVA's loader) reads
        mm_vision_tower=s.vision_tower,
        use_mm_proj=True,
        mm_projector_type=s.mm_projector_type,
        mm_hidden_size=model.vision_tower.config.hidden_size,
        mm_vision_select_layer=s.mm_vision_select_layer,
        mm_vision_select_feature=s.mm_vision_select_feature,
        mm_patch_merge_type=m.mm_patch_merge_type,
        image_aspect_ratio=s.image_aspect_ratio,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=s.model_max_length,
        tune_mm_mlp_adapter=m.tune_mm_mlp_adapter,
        freeze_mm_mlp_adapter=t.freeze_mm_mlp_adapter,
        mm_use_im_start_end=m.mm_use_im_start_end,
        mm_projector_lr=t.mm_projector_lr,
        mm_use_im_patch_token=m.mm_use_im_patch_token,
        use_cache=True,
    )
    conf.pop("_name_or_path", None)
    if "rope_theta" in (conf.get("rope_parameters") or {}):  # transformers 4.x (LLaVA) reads only the flat key
        conf.setdefault("rope_theta", conf["rope_parameters"]["rope_theta"])
    return conf


def shard_name(i: int, n: int) -> str:
    """The i-th (0-based) of n safetensors shards, as transformers' save_pretrained names them."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def read_settings(path: str) -> LlavaSettings:
    """A stage-2 folder's LlavaSettings: LLaVA's mm_* fields, or a llava-hf config plus its processor's do_pad."""
    conf, get = _config(path), _config(path).get
    if _check_kind(path) == "llava":
        return LlavaSettings(
            mm_projector_type=get("mm_projector_type", "linear"),  # LLaVA's getattr default (builder.py)
            mm_vision_select_layer=get("mm_vision_select_layer", -2),
            mm_vision_select_feature=get("mm_vision_select_feature", "patch"),
            image_aspect_ratio=get("image_aspect_ratio", "square"),
            model_max_length=get("tokenizer_model_max_length", 2048),
            vision_tower=get("mm_vision_tower"),
        )
    layer, strategy = get("vision_feature_layer", -2), get("vision_feature_select_strategy", "default")
    text, bias = conf["text_config"].get("model_type", "llama"), get("multimodal_projector_bias", True)
    tower = conf["vision_config"].get("model_type", "clip_vision_model")
    if not isinstance(layer, int) or get("projector_hidden_act", "gelu") != "gelu" or not bias or \
            (text, tower) != ("llama", "clip_vision_model"):  # fmt: skip
        raise ValueError(f"{path!r}: only Llama + CLIP + one int vision_feature_layer + biased gelu MLP maps to "
                         f"LLaVA-1.5 (this one: {text} + {tower}); read other llava-hf folders with transformers")
    return LlavaSettings(
        mm_vision_select_layer=layer,
        mm_vision_select_feature={v: k for k, v in _STRATEGY.items()}[strategy],
        image_aspect_ratio="pad" if LlavaImageProcessorPil.from_pretrained(path).do_pad else "square",
    )


def _llm_config(conf: dict):
    """The LLM's config from a LLaVA config.json (its family from the LLaVA model_type): LLaVA's mm_* fields and the
    LLaVA model_type are dropped."""
    model_type = llava_folder_llm_type(conf) or conf.get("model_type", "llama")
    config_class = type(AutoConfig.for_model(model_type))
    known = config_class().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    return config_class(**{k: v for k, v in conf.items() if k in known | {"rope_theta", "rope_scaling"}})


def clip_folder(path: str, vision_tower: str | None) -> str:
    """The local CLIP folder of a LLaVA folder: --vision_tower, else its config.json mm_vision_tower (a folder or a
    hub id, as LLaVA records openai/clip-vit-large-patch14-336), through local_folder."""
    if vision_tower:
        return local_folder(vision_tower, "--vision_tower")
    if not (clip := _config(path).get("mm_vision_tower")):
        raise ValueError(f"{path!r}: its config.json has no mm_vision_tower; pass --vision_tower CLIP_DIR")
    try:
        return local_folder(clip, f"{path!r}: its vision tower (config.json mm_vision_tower)")
    except ValueError as e:
        raise ValueError(f"{e}; pass --vision_tower CLIP_DIR") from None


def fetch_checkpoint(path: str, vision_tower: str | None, flag: str = "--checkpoint") -> tuple[str, str | None]:
    """fetch for a one-process tool's LLaVA / llava-hf checkpoint and the CLIP it reads: (its local folder, the
    local CLIP folder: --vision_tower, else a LLaVA folder's mm_vision_tower, else None)."""
    folder = fetch(path, flag)
    if vision_tower:
        return folder, fetch(vision_tower, "--vision_tower")
    if checkpoint_kind(folder) != "llava":
        return folder, None
    if clip := _config(folder).get("mm_vision_tower"):
        download(clip, f"{path!r}: its vision tower (config.json mm_vision_tower)")
    return folder, clip_folder(folder, None)


def llava_checkpoint_configs(path: str, vision_tower: str | None = None) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """(llm_config, vision_config) of a llava-hf or LLaVA folder without reading weights (every rank builds the meta
    model from these). LLaVA format: CLIP's config from `vision_tower`, else the config's mm_vision_tower folder.
    llava-hf: vocab_size is the original one (image_token_index, the first row the converter appended)."""
    kind, conf = _check_kind(path), _config(path)
    if not weight_files(path) and os.path.isfile(projector := os.path.join(path, "mm_projector.bin")):
        raise ValueError(f"{path!r}: a stage-1 output, which holds only the projector ({projector}): train stage 2 "
                         f"from it (--pretrain_mm_mlp_adapter {projector}), or export it with its LLM and tower: "
                         f"python -m minillava.export --model_name_or_path LLM --pretrain_mm_mlp_adapter {projector} "
                         "--vision_tower TOWER --output DIR")  # fmt: skip
    if kind == "llava":
        tower = clip_folder(path, vision_tower)
        return _llm_config(conf), folder_tower_config(tower, f"{path!r}: its vision tower")
    read_settings(path)  # validates the vision feature settings
    llm_config = _llm_config(conf["text_config"])
    llm_config.vocab_size = min(llm_config.vocab_size, conf.get("image_token_index", 32000))
    if (llm_config.pad_token_id or 0) >= llm_config.vocab_size:  # <pad> was one of the appended rows
        llm_config.pad_token_id = None
    return llm_config, CLIPVisionConfig(**conf["vision_config"])


def _hf_state(path: str) -> dict[str, Tensor]:
    """A llava-hf folder's tensors keyed by our names, read by LlavaForConditionalGeneration.from_pretrained (in the
    config's dtype, dtype="auto"); every weight of the model must come from the folder and every file key be used."""
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, dtype="auto", local_files_only=True, output_loading_info=True
    )
    if problems := {k: v for k, v in info.items() if v}:
        raise ValueError(f"{path!r}: not a LLaVA-1.5 llava-hf folder ({problems})")
    return {from_hf_key(k, path): v for k, v in model.state_dict().items()}


def _llava_state(path: str, vision_tower: str | None, vision_config) -> dict[str, Tensor]:
    """A LLaVA folder's tensors keyed by our names; the tower from the checkpoint's copy, else from its folder (less
    what vision_config has no place for: SigLIP's dropped layer and head)."""
    state = read_weights(path, "checkpoint")
    clip = {k.removeprefix(_LLAVA_TOWER): v for k, v in state.items() if k.startswith(_LLAVA_TOWER)}
    out = {from_llava_key(k, path): v for k, v in state.items() if not k.startswith(_LLAVA_TOWER)}
    out = {k: v for k, v in out.items() if not k.endswith(_NON_PERSISTENT)}
    if not clip:  # LLaVA's FSDP path (and some released checkpoints) save no CLIP copy
        clip = read_weights(clip_folder(path, vision_tower), "--vision_tower")
    return out | clip_vision_state(clip, vision_config)


def load_llava_checkpoint_state(
    path: str, vision_tower: str | None = None
) -> tuple[LlamaConfig, CLIPVisionConfig, dict[str, Tensor]]:
    """(llm_config, vision_config, state keyed llm.* / vision_tower.* / mm_projector.*) of a llava-hf or LLaVA folder.

    llava-hf: the rows the converter appended (<image>, <pad>, padding to a multiple of 64) are dropped, so the LLM
    has its original vocabulary (minillava splices images at id -200 and never looks those rows up). LLaVA format:
    CLIP's weights are the checkpoint's copy (model.vision_tower.*), else those of the CLIP folder."""
    llm_config, vision_config = llava_checkpoint_configs(path, vision_tower)
    if checkpoint_kind(path) == "llava-hf":
        state = _hf_state(path)
        return llm_config, vision_config, state | {k: state[k][: llm_config.vocab_size] for k in EMBEDDINGS}
    return llm_config, vision_config, _llava_state(path, vision_tower, vision_config)


# ---------------------------------------------------------------------------------------------- llava-hf folders


def hf_config(llm, vision, s: LlavaSettings, vocab: int, image_id: int, pad_id: int) -> LlavaConfig:
    """The LlavaConfig of an export: the LLM's own config class (text_config.model_type llama, mistral, qwen2, qwen3),
    a gelu MLP projector, and the tower read as minillava reads it: CLIP's hidden_states[mm_vision_select_layer]
    ("default" drops the CLS); SigLIP's last layer of the tower we keep, which LLaVA-NeXT's is already one short of
    (hidden_states[-1], every patch: "full")."""
    if s.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {s.mm_projector_type!r}: LlavaForConditionalGeneration has mlp2x_gelu only"
        )
    family, tied = tower_family(vision.model_type, "the tower"), bool(getattr(llm, "tie_word_embeddings", False))
    text = type(llm).from_dict({**llm.to_dict(), "vocab_size": vocab})  # pad_token_id: the LLM's (Vicuna: 0)
    cls = family.cls_token and s.mm_vision_select_feature == "cls_patch"
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + cls,
        projector_hidden_act="gelu",  # exact erf GELU, as LLaVA's nn.GELU() (multimodal_projector/builder.py)
        vision_feature_layer=-1 if family.drop_last_layer else s.mm_vision_select_layer,
        vision_feature_select_strategy=_STRATEGY[s.mm_vision_select_feature] if family.cls_token else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,  # Qwen2-0.5B: lm_head is the embedding
        pad_token_id=pad_id,
    )


def build_hf_model(config: LlavaConfig, state: dict[str, Tensor]) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration holding `state` (our names), loaded strictly; built on meta, so nothing is
    initialised twice (a 7B export never holds a random copy). Its save_pretrained writes the llava-hf folder."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict({to_hf_key(k): v for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    lm, emb = model.model.language_model, model.model.vision_tower.embeddings  # non-persistent buffers: recompute
    lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand(1, -1), persistent=False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model.eval()


# ---------------------------------------------------------------------------------------------- LoRA outputs

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's names
NON_LORA = "non_lora_trainables.bin"  # LLaVA's: the projector
_PEFT = "base_model.model."  # PeftModel's prefix before LlavaLlamaForCausalLM's keys, in both files


def to_peft_key(name: str) -> str:
    """Our parameter name -> its key in LLaVA's LoRA files (base_model.model.model.layers.0...lora_A.weight)."""
    return _PEFT + to_llava_key(name)


def from_peft_key(key: str, path: str) -> str:
    """A key of LLaVA's LoRA files -> our name (peft < 0.5 and LLaVA's own keys have no adapter-name level)."""
    if not key.startswith(_PEFT):
        raise _unexpected(path, key)
    return from_llava_key(key[len(_PEFT) :], path)


def lora_config(cfg, target_modules: list[str]):
    """adapter_config.json as peft's LoraConfig, built as LLaVA's train() builds it (task CAUSAL_LM)."""
    from peft import LoraConfig  # the optional extra minillava[lora]; check_paths asks for it up front

    t = cfg.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules=target_modules, lora_dropout=t.lora_dropout,
                      bias=t.lora_bias, task_type="CAUSAL_LM",
                      base_model_name_or_path=recorded_name(cfg.model.model_name_or_path))  # fmt: skip


def lora_content(named: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The adapter_model.safetensors / non_lora_trainables.bin dict from (our name, tensor) pairs."""
    return {to_peft_key(n): t.to(dtype).contiguous() for n, t in named}


def read_lora_output(path: str) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """(adapter_config, adapter weights, non-LoRA trainables) of a LoRA output_dir, tensors keyed by our names.
    The weights are adapter_model.safetensors, or adapter_model.bin (peft < 0.6, as LLaVA's releases)."""
    if checkpoint_kind(path) != "llava-lora":
        raise ValueError(f"--merge_lora {path}: not a LoRA output_dir ({ADAPTER_CONFIG} + LLaVA config.json)")
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        conf = json.load(f)
    if conf.get("peft_type", "LORA") != "LORA" or conf.get("bias", "none") != "none":
        raise ValueError(f"--merge_lora {path}: only LoRA adapters without bias are supported")
    file = os.path.join(path, ADAPTER_WEIGHTS)
    raw = load_file(file) if os.path.isfile(file) else torch.load(file[: -len(".safetensors")] + ".bin",
                                                                  weights_only=True)  # fmt: skip
    adapters = {from_peft_key(k, path).replace(".default.", "."): v for k, v in raw.items()}
    non_lora = torch.load(os.path.join(path, NON_LORA), weights_only=True)
    return conf, adapters, {from_peft_key(k, path): v for k, v in non_lora.items()}


def merged_lora_state(path: str, base: str | None = None, vision_tower: str | None = None) -> tuple[dict, dict, str]:
    """(config.json, full state keyed by our names, base) of a LoRA output_dir merged into its base: the LLM of `base`
    (default: adapter_config's base_model_name_or_path) with W + B A alpha / r, CLIP from `vision_tower` (default
    the config's mm_vision_tower), the projector from non_lora_trainables.bin (scripts/merge_lora_weights.py)."""
    conf_lora, adapters, non_lora = read_lora_output(path)
    base = base or conf_lora.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"--merge_lora {path}: pass --model_name_or_path, the base LLM the adapters were trained on")
    base = local_folder(base, "--model_name_or_path")
    conf = _config(path)
    state = pretrained_state_dict(base, clip_folder(path, vision_tower))
    if missing := sorted(k for k in adapters if k.rsplit(".lora_", 1)[0] + ".weight" not in state):
        raise ValueError(f"--model_name_or_path {base}: no base weight for adapter {missing[0]}")
    return conf, merge_lora(state, adapters, conf_lora["lora_alpha"] / conf_lora["r"]) | non_lora, base


# ---------------------------------------------------------------------------------------------- a run's start


def recorded_name(name: str) -> str:
    """A model flag as an output records it: a local folder as its absolute path (the output then works from any
    directory), a hub id as given."""
    return os.path.abspath(name) if os.path.exists(name) else name


def run_settings(cfg) -> LlavaSettings:
    """The LlavaSettings of a run's flags (its tower recorded_name'd: what config.json's mm_vision_tower says)."""
    m = cfg.model
    return LlavaSettings(
        mm_projector_type=m.mm_projector_type,
        mm_vision_select_layer=m.mm_vision_select_layer,
        mm_vision_select_feature=m.mm_vision_select_feature,
        image_aspect_ratio=cfg.data.image_aspect_ratio,
        model_max_length=cfg.train.model_max_length,
        vision_tower=recorded_name(m.vision_tower),
    )


def model_names(cfg) -> dict[str, str]:
    """{flag: name} of the model flags whose value is not a local folder (a hub id to read from the cache)."""
    names = {"--model_name_or_path": cfg.model.model_name_or_path, "--vision_tower": cfg.model.vision_tower}
    return {flag: name for flag, name in names.items() if name is not None and not os.path.isdir(name)}


def check_paths(cfg) -> None:
    """Start-up checks that read the disk (config.py validates without it), before any model is loaded and before
    --output_dir is created: the package --report_to needs is installed, every path exists (a model flag: a local
    folder, a hub id in the hub cache, or one to download when downloads are on), then, when both model flags are
    local folders, check_model_files (otherwise train.fetch_models runs it once the hub ids are in the cache);
    ValueError naming the flag."""
    d, t = cfg.data, cfg.train
    if t.report_to == "wandb" and importlib.util.find_spec("wandb") is None:  # imported later, by metrics.py
        raise ValueError("--report_to wandb: wandb is not installed: pip install wandb (or pip install "
                         "'minillava[wandb]'), or pass --report_to none")  # fmt: skip
    for flag, name in model_names(cfg).items():
        if not is_repo_id(name) or constants.HF_HUB_OFFLINE:  # else not cached yet is fine: it is downloaded
            local_folder(name, flag)
    resume = t.resume_from_checkpoint if t.resume_from_checkpoint != "auto" else None
    paths = {"--data_path": (d.data_path, "file"), "--image_folder": (d.image_folder, "folder"),
             "--eval_data_path": (d.eval_data_path, "file"),
             "--resume_from_checkpoint": (resume, "folder")}  # fmt: skip
    for flag, (path, kind) in paths.items():
        if path is not None and not (os.path.isdir if kind == "folder" else os.path.isfile)(path):
            why = "does not exist" if not os.path.exists(path) else f"is not a {kind}"
            raise ValueError(f"{flag} {path}: {why} (a local {kind} is expected)")
    if os.path.isfile(cfg.train.output_dir):
        raise ValueError(f"--output_dir {cfg.train.output_dir}: is a file, not a folder")
    if cfg.train.lora_enable and importlib.util.find_spec("peft") is None:
        raise ValueError("--lora_enable True writes peft's adapter format: pip install 'minillava[lora]' (peft)")
    if not model_names(cfg):
        check_model_files(cfg)


def check_model_files(cfg) -> None:
    """The start-up checks that read the model folders: stage 2's adapter rule, and --pretrain_mm_mlp_adapter a
    readable, finite projector of the run's shapes (read here by every rank, so a bad file stops them all at once)."""
    m = cfg.model
    # LLaVA silently starts stage 2 from a random projector when the adapter path is forgotten (its default
    # is None), which wastes a whole finetune. We refuse unless the user opts in with --init_projector random;
    # a llava-hf / LLaVA stage-2 folder as --model_name_or_path brings its projector.
    needs_adapter = not m.tune_mm_mlp_adapter and m.pretrain_mm_mlp_adapter is None and m.init_projector == "auto"
    if needs_adapter and checkpoint_kind(local_folder(m.model_name_or_path, "--model_name_or_path")) is None:
        raise ValueError(
            "--pretrain_mm_mlp_adapter is required when the projector is not trained from scratch "
            "(--tune_mm_mlp_adapter False, i.e. stage 2): pass the stage-1 output_dir/mm_projector.bin, "
            "or --init_projector random to start from a random projector on purpose (what LLaVA does silently)"
        )
    if m.pretrain_mm_mlp_adapter is not None:
        llm_config, vision_config = run_configs(cfg)
        with torch.device("meta"):
            holder = _projector_holder(m.mm_projector_type, vision_config, llm_config)
        read_mm_projector(holder, m.pretrain_mm_mlp_adapter)


def run_configs(cfg) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """(llm_config, vision_config) from the LLM + CLIP folders, or from a llava-hf / LLaVA-format stage-2 folder
    given as --model_name_or_path (then its mm_* settings must match the flags). No weights are read."""
    m = cfg.model
    llm = local_folder(m.model_name_or_path, "--model_name_or_path")
    if checkpoint_kind(llm) is None:
        clip = local_folder(m.vision_tower, "--vision_tower")
        tower_family(_config(clip).get("model_type"), f"--vision_tower {m.vision_tower}")
        llm_config = AutoConfig.from_pretrained(llm)
        llm_family(llm_config, f"--model_name_or_path {m.model_name_or_path}")
        return llm_config, folder_tower_config(clip, "--vision_tower")
    trained, flags = read_settings(llm), run_settings(cfg)
    for f in (f.name for f in fields(LlavaSettings) if f.name.startswith("mm_")):  # the model must be the one trained
        ours, theirs = getattr(flags, f), getattr(trained, f)
        if ours != theirs:
            raise ValueError(f"--{f} {ours!r}: {m.model_name_or_path} was trained with {theirs!r}")
    return llava_checkpoint_configs(llm, m.vision_tower)


def initial_state(cfg, llm_config, vision_config) -> dict[str, Tensor]:
    """Rank 0 only: the full starting weights (LLM + tower from their folders, or a whole LLaVA checkpoint) plus
    the projector: the checkpoint's, seeded-random, or from --pretrain_mm_mlp_adapter."""
    m = cfg.model
    llm = local_folder(m.model_name_or_path, "--model_name_or_path")
    from_llava = checkpoint_kind(llm) is not None
    if from_llava:  # LLM, tower and projector from the checkpoint
        state = load_llava_checkpoint_state(llm, m.vision_tower)[2]
    else:
        state = pretrained_state_dict(m.model_name_or_path, m.vision_tower)
    if from_llava and not m.pretrain_mm_mlp_adapter and m.init_projector != "random":
        return state  # keep the checkpoint's projector
    torch.manual_seed(cfg.train.seed)
    return state | projector_state(m.mm_projector_type, vision_config, llm_config, m.pretrain_mm_mlp_adapter)


# ---------------------------------------------------------------------------------------------- manifest.json

MANIFEST_NAME = "manifest.json"  # saved with every checkpoint and final output


def _git_revision() -> str | None:
    """The minillava checkout's commit (+ "-dirty" with uncommitted changes), None outside a git checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what the tokenizer maps (vocabulary, added and special tokens), not of its files' bytes."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special, type(tokenizer).__name__], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_manifest(cfg, tokenizer) -> dict:
    """Rank 0 at start-up: the resolved config, minillava's revision, the library versions and hashes of the
    data file and the tokenizer. Resume compares it with the checkpoint's (manifest_changes)."""
    import transformers

    import minillava

    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    return {
        "config": cfg.to_dict(),
        "minillava": {"version": minillava.__version__, "git": _git_revision()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        },
        "data_sha256": data_sha256(cfg.data.data_path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }


def manifest_changes(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's manifest and this run's, beyond the config (reported on its own)."""
    changes = []
    for section, label in (("minillava", "minillava "), ("versions", "")):
        for key, value in new[section].items():
            if (was := old.get(section, {}).get(key)) != value:
                changes.append(f"{label}{key} {was} -> {value}")
    for key, what in (("data_sha256", "--data_path content"), ("tokenizer_sha256", "tokenizer vocabulary")):
        if old.get(key) != new[key]:
            changes.append(f"{what} (sha256 {str(old.get(key))[:12]} -> {new[key][:12]})")
    return changes


# ---------------------------------------------------------------------------------------------- the records cache

RECORDS_VERSION = 2  # bump when the layout below changes: older caches are then rebuilt


def records_cache_dir(data_path: str) -> str:
    """Where the compact form of a data file lives: $MINILLAVA_CACHE (default ~/.cache/minillava)/records/<key>,
    the key naming the file's real path, inode, size, modification and change times: any write to the file (even
    one that keeps its size and modification time) changes the change time, so an edited file gets a new cache."""
    st = os.stat(data_path)
    key = f"{os.path.realpath(data_path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{RECORDS_VERSION}"
    root = os.environ.get("MINILLAVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minillava")
    return os.path.join(root, "records", hashlib.sha256(key.encode()).hexdigest()[:24])


def _records_digest(offsets, words) -> bytes:
    return hashlib.sha256(offsets.tobytes() + words.tobytes()).digest()


def write_records_cache(folder: str, offsets: list[int], words: list[int]) -> None:
    """index.npz: the byte offset of every record's JSON text in the data file (int64, n records + 1: record i is
    bytes offsets[i]:offsets[i + 1], separators included), each record's signed word count (int32, see
    data.RecordFile) and the sha256 of both (read_records_cache checks it). Written under a temporary name and
    renamed into place. OSError if the cache cannot be written."""
    import numpy as np

    offsets, words = np.array(offsets, dtype=np.int64), np.array(words, dtype=np.int32)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"index.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, offsets=offsets, words=words, digest=np.frombuffer(_records_digest(offsets, words), np.uint8))
        os.replace(tmp, os.path.join(folder, "index.npz"))
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def data_sha256(data_path: str) -> str:
    """file_sha256 of a data file, kept beside its records cache (same key: path, size, modification time), so
    only the first run reads the whole file for it (about 3 s for LLaVA-665K's 1.36 GB)."""
    path = os.path.join(records_cache_dir(data_path), "sha256")
    try:
        with open(path) as f:
            if len(digest := f.read().strip()) == 64:
                return digest
    except OSError:
        pass
    digest = file_sha256(data_path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run the hash again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, path)
    return digest


def read_records_cache(folder: str, data_size: int):
    """(offsets, words) of a complete cache folder for a data file of data_size bytes; None if there is none. A
    damaged one (truncated, empty, not what write_records_cache wrote, its digest wrong) is removed, with a note
    naming it, and None returned: the caller rebuilds it."""
    import numpy as np

    path = os.path.join(folder, "index.npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as index:
            offsets, words, digest = index["offsets"], index["words"], index["digest"].tobytes()
        problem = None if digest == _records_digest(offsets, words) else "its checksum does not match"
        if problem is None and (len(words) != len(offsets) - 1 or np.any(np.diff(offsets) < 0)
                                or offsets[-1] > data_size):  # fmt: skip
            problem = "its offsets do not fit the data file"
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError: whatever the damage
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return offsets, words
    print(f"note: records cache {folder}: damaged ({problem}); rebuilding it", flush=True)
    with contextlib.suppress(OSError):
        os.remove(path)
    return None
