"""Writing the final outputs (llava/train/train.py safe_save_model_for_hf_trainer), by rank 0 through a staging
directory renamed into place, so a kill never leaves a half-written output. What goes into each file (names,
contents, config.json) is minillava.formats'; how the weights leave the ranks is gather.py's.

stage 1 -> output_dir/mm_projector.bin + config.json
stage 2 -> output_dir as a LLaVA stage-2 folder: config.json, sharded safetensors + index, generation_config.json,
           tokenizer files (also save_stage2_folder, from a state dict: minillava.export --merge_lora)
LoRA    -> output_dir as LLaVA's LoRA run leaves it: config.json, adapter_config.json, adapter_model.safetensors,
           non_lora_trainables.bin (get_peft_state_maybe_zero_3 / get_peft_state_non_lora_maybe_zero_3)
"""

import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from torch import nn

from minillava.atomic import atomic_write, fsync_dir, make_tmp_dir, rank0, removed_on_error, write_json
from minillava.distributed import barrier
from minillava.formats.folders import ADAPTER_WEIGHTS, INDEX_NAME, SHARD_NAME
from minillava.formats.hub import local_folder
from minillava.formats.llava import llava_config
from minillava.formats.lora_outputs import NON_LORA, lora_config, lora_content
from minillava.formats.manifest import MANIFEST_NAME
from minillava.formats.projector import mm_projector_content
from minillava.gather import create_shards, full_tensors, save_shards, write_pieces
from minillava.lora import is_lora_param, lora_targets


def save_projector(model: nn.Module, path: str, dtype: torch.dtype) -> None:
    """Write LLaVA's mm_projector.bin. Collective: call on all ranks."""
    state = mm_projector_content(full_tensors(model, "mm_projector."), dtype)
    if rank0():
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def _publish(stage: str, out: str) -> None:
    """Move the staged files into `out`, index and config.json last; remove shards of an earlier save that the new
    index does not list. Every file was complete before its rename."""
    names = sorted(os.listdir(stage), key=lambda n: (n in (INDEX_NAME, "config.json"), n))
    if INDEX_NAME in names:
        for old in os.listdir(out):
            if SHARD_NAME.fullmatch(old) and old not in names:
                os.remove(os.path.join(out, old))
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    fsync_dir(out)
    os.rmdir(stage)


def save_final(
    model: nn.Module, cfg, tokenizer, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30, manifest=None
) -> None:
    """Stage 1: mm_projector.bin + config.json. Stage 2: a full HF folder, its weights streamed (save_shards). Both
    with the run's manifest.json (formats/manifest.py) when given. Everything is written into a staging directory
    inside output_dir and renamed into place at the end, so a kill mid-save leaves no partial file in output_dir.
    Collective: call on all ranks."""
    out = cfg.train.output_dir
    stage = make_tmp_dir(out, ".final.tmp-")
    full = not cfg.model.tune_mm_mlp_adapter and not cfg.train.lora_enable
    with removed_on_error(stage, out, out):
        if cfg.model.tune_mm_mlp_adapter:
            save_projector(model, os.path.join(stage, "mm_projector.bin"), dtype)
        elif cfg.train.lora_enable:
            _save_lora(model, stage, cfg, dtype)
        else:
            index = save_shards(model, stage, dtype, max_shard_bytes)
        if rank0():
            if full:
                llm = local_folder(cfg.model.model_name_or_path, "--model_name_or_path")
                _stage2_extras(stage, index, model.llm.generation_config, tokenizer, llm)
            if manifest is not None:
                write_json(os.path.join(stage, MANIFEST_NAME), manifest)
            write_json(os.path.join(stage, "config.json"), llava_config(model, cfg, dtype))
            _publish(stage, out)
    barrier()


def _stage2_extras(stage: str, index: dict, generation_config, tokenizer, tokenizer_src: str) -> None:
    """A stage-2 folder's files besides the weights: the index, generation_config.json and the tokenizer."""
    write_json(os.path.join(stage, INDEX_NAME), index)
    generation_config.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    sp_model = os.path.join(tokenizer_src, "tokenizer.model")
    if os.path.isfile(sp_model) and not os.path.exists(os.path.join(stage, "tokenizer.model")):
        shutil.copyfile(sp_model, os.path.join(stage, "tokenizer.model"))  # LLaVA loads use_fast=False


def _save_lora(model: nn.Module, stage: str, cfg, dtype: torch.dtype) -> None:
    """LLaVA's LoRA files (train.py end of train()): the adapters in peft's layout, every other trainable tensor
    (the projector) in non_lora_trainables.bin. Collective: every rank gathers, rank 0 writes."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if is_lora_param(n)}
    adapters = lora_content(full_tensors(model, names=lora), dtype)
    non_lora = lora_content(full_tensors(model, names=trainable - lora), dtype)
    if rank0():
        lora_config(cfg, lora_targets(model)).save_pretrained(stage)  # adapter_config.json
        save_file(adapters, os.path.join(stage, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(stage, ADAPTER_WEIGHTS), 0o644)  # safetensors creates 0600 files
        torch.save(non_lora, os.path.join(stage, NON_LORA))


def save_stage2_folder(
    out: str,
    state: dict[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype,
    generation_config,
    tokenizer,
    tokenizer_src: str,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """A LLaVA stage-2 folder from full tensors (our names), without a process group (minillava.export
    --merge_lora): the same shard writer as save_final's, one tensor cast at a time; staged and renamed into place
    as save_final's."""
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".final.tmp-", dir=out)
    shapes = [(name, t.shape) for name, t in state.items()]
    index = create_shards(stage, shapes, dtype, max_shard_bytes)
    pieces = ((name, [(0, t.to("cpu", dtype).contiguous().reshape(-1))]) for name, t in state.items())
    write_pieces(stage, shapes, dtype, max_shard_bytes, pieces)
    _stage2_extras(stage, index, generation_config, tokenizer, tokenizer_src)
    write_json(os.path.join(stage, "config.json"), config)
    _publish(stage, out)


def next_steps(cfg) -> str:
    """What the final outputs are and how to use them, printed at the end of a run."""
    out = os.path.abspath(cfg.train.output_dir)
    if cfg.train.lora_enable:
        return (f"LoRA adapters: {out} (LLaVA's LoRA layout; peft.PeftModel.from_pretrained loads them onto the base "
                f"LLM). For generate / export, merge them: python -m minillava.export --merge_lora {out} --output "
                f"{out}-merged")  # fmt: skip
    if cfg.model.tune_mm_mlp_adapter:
        return (f"projector: {out}/mm_projector.bin. Next, stage 2 (LLaVA's finetune.sh): the same launcher with "
                f"train.py --stage 2 --pretrain_mm_mlp_adapter {out}/mm_projector.bin --data_path <instruction "
                "data> --output_dir <stage-2 dir>")  # fmt: skip
    return (f"model: {out} (LLaVA stage-2 format). Try it: python -m minillava.generate --checkpoint {out} --image "
            f"<image> --prompt <question>; as a llava-hf folder: python -m minillava.export --checkpoint {out} "
            f"--output {out}-hf")  # fmt: skip
