"""Final outputs in LLaVA's formats (llava-reference.md 8), gathered from FSDP2 shards one tensor at a time.

stage 1 -> output_dir/mm_projector.bin (torch.save dict, keys model.mm_projector.*) + config.json
stage 2 -> output_dir as an HF folder: config.json (model_type llava_llama, mm_* fields), sharded safetensors +
           index with LLaVA's key names, generation_config.json, tokenizer files.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written output."""

import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from minillava.model import to_llava_key


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _full_tensors(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full CPU tensor) for every parameter/buffer of the state dict whose name starts with `prefix`.
    Every rank must call this (each DTensor.full_tensor() is an all-gather); only rank 0 should keep the results."""
    for name, value in model.state_dict().items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield name, value.detach().to("cpu")


def llava_config(model: nn.Module, cfg) -> dict:
    """The LLM's config.json plus LLaVA's mm_* fields (llava-reference.md 8.4), model_type llava_llama."""
    conf = model.llm.config.to_dict()
    m, d, t = cfg.model, cfg.data, cfg.train
    conf.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=m.vision_tower,
        use_mm_proj=True,
        mm_projector_type=m.mm_projector_type,
        mm_hidden_size=model.vision_tower.config.hidden_size,
        mm_vision_select_layer=m.mm_vision_select_layer,
        mm_vision_select_feature=m.mm_vision_select_feature,
        mm_patch_merge_type=m.mm_patch_merge_type,
        image_aspect_ratio=d.image_aspect_ratio,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=t.model_max_length,
        tune_mm_mlp_adapter=m.tune_mm_mlp_adapter,
        freeze_mm_mlp_adapter=t.freeze_mm_mlp_adapter,
        mm_use_im_start_end=m.mm_use_im_start_end,
        mm_projector_lr=t.mm_projector_lr,
        mm_use_im_patch_token=m.mm_use_im_patch_token,
        use_cache=True,
    )
    conf.pop("_name_or_path", None)
    return conf


def _write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)

    _atomic(path, write)


def save_projector(model: nn.Module, path: str, dtype: torch.dtype) -> None:
    """Write LLaVA's mm_projector.bin (keys model.mm_projector.{0,2}.{weight,bias}). Collective: call on all ranks."""
    state = {to_llava_key(n): t.to(dtype) for n, t in _full_tensors(model, "mm_projector.")}
    if dist.get_rank() == 0:
        _atomic(path, lambda tmp: torch.save(state, tmp))


def save_final(model: nn.Module, cfg, tokenizer, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30) -> None:
    """Stage 1: mm_projector.bin + config.json. Stage 2: a full HF folder, streamed shard by shard so rank 0 never
    holds more than one shard (plus one tensor) of the gathered model. Collective: call on all ranks."""
    out = cfg.train.output_dir
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(out, exist_ok=True)
    if cfg.model.tune_mm_mlp_adapter:
        save_projector(model, os.path.join(out, "mm_projector.bin"), dtype)
    else:
        shards: list[tuple[str, list[str]]] = []
        buf: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal buf, size
            name = f"model-{len(shards) + 1:05d}.safetensors"
            if rank0:
                _atomic(os.path.join(out, name), lambda tmp, b=buf: save_file(b, tmp, metadata={"format": "pt"}))
            shards.append((name, list(buf)))
            buf, size = {}, 0

        for name, t in _full_tensors(model):
            if not rank0:
                continue
            buf[to_llava_key(name)] = t.to(dtype).contiguous()
            size += t.numel() * dtype.itemsize
            if size >= max_shard_bytes:
                flush()
        if buf or not shards:
            flush()
        if rank0:
            # Rename to HF's model-0000x-of-0000y names once the shard count is known, then write the index.
            n, weight_map, total = len(shards), {}, 0
            for i, (name, keys) in enumerate(shards, 1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(os.path.join(out, name), os.path.join(out, final))
                weight_map.update(dict.fromkeys(keys, final))
            total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
            _write_json(
                os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
            model.llm.generation_config.save_pretrained(out)
            tokenizer.save_pretrained(out)
    if rank0:
        _write_json(os.path.join(out, "config.json"), llava_config(model, cfg))
    dist.barrier()
