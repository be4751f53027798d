"""Export a LLaVA checkpoint as a llava-hf folder (transformers' LlavaForConditionalGeneration), from either source:

    python -m minillava.export --checkpoint STAGE2_DIR --output HF_DIR [--version V] [--vision_tower CLIP_DIR]
    python -m minillava.export --model_name_or_path LLM --pretrain_mm_mlp_adapter BIN --vision_tower CLIP --output DIR
    python -m minillava.export --merge_lora LORA_DIR --output STAGE2_DIR [--model_name_or_path BASE_LLM]

--merge_lora folds a LoRA run's adapters into its base LLM (scripts/merge_lora_weights.py: merge_and_unload) and
writes a LLaVA stage-2 folder, which generate, training and the llava-hf export read.

Each folder may be a hub id instead (lmsys/vicuna-7b-v1.5, openai/clip-vit-large-patch14-336, and a checkpoint's
mm_vision_tower): read from the hub cache, downloaded into it first unless HF_HUB_OFFLINE=1 (formats.hub.fetch).

Every LLM family and tower minillava trains (Llama, Mistral, Qwen2, Qwen3; CLIP, SigLIP) exports; --version is the
run's template, written as the processor's chat template.

A leaf tool on minillava.formats (which reads every folder kind and knows the llava-hf layout); this module adds
what only an export needs: the new <image> / <pad> rows (as convert_llava_weights_to_hf.py), the tokenizer, the chat
template and the processor.
"""

import argparse
import os
import sys
from typing import Any

import torch
from torch import Tensor
from transformers import AddedToken, AutoConfig, AutoTokenizer, GenerationConfig, LlavaProcessor
from transformers.models.llava import LlavaImageProcessorPil

from minillava.backbones import image_processor, tower_family
from minillava.cli import run_tool
from minillava.conversation import get_template
from minillava.data import load_tokenizer
from minillava.formats.folders import checkpoint_kind, folder_tower_config, pretrained_state_dict
from minillava.formats.hub import fetch
from minillava.formats.llava import fetch_checkpoint, load_llava_checkpoint_state, read_settings
from minillava.formats.llava_hf import EMBEDDINGS, build_hf_model, hf_config
from minillava.formats.lora_outputs import merged_lora_state
from minillava.formats.projector import projector_state
from minillava.model import LlavaSettings
from minillava.outputs import save_stage2_folder

IMAGE_TOKEN, PAD_TOKEN, VOCAB_MULTIPLE = "<image>", "<pad>", 64  # convert_llava_weights_to_hf.py: 32000 + 2 -> 32064


def sample_new_rows(weight: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n float64 rows drawn from N(mu, 1e-5 * Sigma) of `weight`'s rows, as convert_llava_weights_to_hf.py does.

    Sigma is the population covariance (divided by the row count), as there; sampling uses a Cholesky factor (a
    symmetric square root when Sigma is singular) and a seeded generator, so an export is reproducible. Deviation:
    the reference draws lm_head's rows from the input embeddings' statistics too; each matrix uses its own here
    (as transformers' resize_token_embeddings(mean_resizing=True)), since the two have different scales."""
    w = weight.double()
    centred = w - (mu := w.mean(0))
    cov = 1e-5 * (centred.T @ centred) / w.shape[0]  # (D, D)
    factor, info = torch.linalg.cholesky_ex(cov)
    if info:
        evals, evecs = torch.linalg.eigh(cov)
        factor = evecs * evals.clamp(min=0).sqrt()
    return mu + torch.randn(n, w.shape[1], generator=generator, dtype=torch.float64) @ factor.T  # (n, D)


def _chat_parts(version: str) -> dict[str, str]:
    """The pieces of `version`'s prompt around each message (conversation.py get_prompt, chat_turns.py): the default
    system, the strings before and after the system, user and assistant messages, the generation prompt."""
    t = get_template(version)
    if t.style == "two":
        return dict(system=t.system, sys_open="", sys_close=t.sep, user_open=f"{t.roles[0]}: ", user_close=t.sep,
                    bot_open=f"{t.roles[1]}: ", bot_close=t.sep2, generation=f"{t.roles[1]}:")
    if t.style in ("qwen", "llama3"):
        head = ("<|im_start|>{}\n" if t.style == "qwen" else "<|start_header_id|>{}<|end_header_id|>\n\n").format
        close = t.sep + ("\n" if t.style == "qwen" else "")
        return dict(system=t.system, sys_open=head("system"), sys_close=close, user_open=head("user"),
                    user_close=close, bot_open=head("assistant"), bot_close=close, generation=head("assistant"))
    if t.style == "mpt":
        head = "<|im_start|>system\n"
        return dict(system=t.system.removeprefix(head), sys_open=head, sys_close=t.sep, user_open=t.roles[0],
                    user_close=t.sep, bot_open=t.roles[1], bot_close=t.sep, generation=t.roles[1])
    if t.style == "llama_2":  # the system goes inside the first [INST], as <<SYS>>
        return dict(system=t.system, sys_open="", sys_close="", user_open="[INST] ", user_close=" [/INST]",
                    bot_open=" ", bot_close=f" {t.sep2}", generation="")
    raise ValueError(f"--version {version!r}: the {t.style} template has no chat template (it is stage 1's)")


def image_marker(tokenizer: Any) -> str:
    """What one image renders as in a chat template (images first, as preprocess_multimodal puts them): "<image>\\n",
    or "<image> \\n" for a SentencePiece tokenizer. LLaVA tokenizes the text after an image on its own
    (tokenizer_image_token), so SentencePiece puts its word prefix there; a fast tokenizer splitting at the special
    <image> adds none, and the space restores it: chat template + processor give exactly the ids LLaVA trained on."""
    after_image = tokenizer(IMAGE_TOKEN + "\nQ", add_special_tokens=False).input_ids[1:]
    return "<image>\n" if after_image == tokenizer("\nQ", add_special_tokens=False).input_ids else "<image> \n"


def chat_template(version: str, image: str = "<image>\n") -> str:
    """Jinja for `version`'s inference prompt, as build_inference_prompt renders it, for a llava-hf processor:
    messages with string content or lists of {"type": "image"} / {"type": "text"} items, each image as `image`
    (image_marker); a leading system message replaces the template's system."""
    p = _chat_parts(version) | {"image": image}
    texts = "(c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' '))"
    llama_2 = get_template(version).style == "llama_2"
    system = ("{%- if loop.first and ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}"
              "{%- endif -%}") if llama_2 else ""  # fmt: skip
    return (
        f"{{%- set ns = namespace(system={p['system']!r}) -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set c = messages[0]['content'] -%}"
        f"{{%- set ns.system = c if c is string else {texts} -%}}{{%- endif -%}}"
        + ("" if llama_2 else f"{{{{- {p['sys_open']!r} + ns.system + {p['sys_close']!r} -}}}}")
        + "{%- for m in messages if m['role'] != 'system' -%}{%- set c = m['content'] -%}"
        f"{{{{- {p['user_open']!r} if m['role'] == 'user' else {p['bot_open']!r} -}}}}{system}"
        "{%- if c is not string -%}{%- for i in c if i['type'] == 'image' -%}"
        f"{{{{- {p['image']!r} -}}}}{{%- endfor -%}}{{%- endif -%}}"
        f"{{{{- c if c is string else {texts} -}}}}{{{{- {p['user_close']!r} if m['role'] == 'user' else "
        f"{p['bot_close']!r} -}}}}{{%- endfor -%}}{{%- if add_generation_prompt -%}}{{{{- {p['generation']!r} -}}}}"
        "{%- endif -%}"
    )


def add_llava_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add <image> (special, unnormalised), then <pad> as the converter does, unless the tokenizer has a pad token of
    its own (not a stand-in: unk for Vicuna, EOS for Llama-3); (<image> id, pad id): (32000, 32001) for Vicuna,
    (151646, 151643) for Qwen2 (<|endoftext|>)."""
    tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.pad_token in (None, tokenizer.unk_token, tokenizer.eos_token):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        assert tokenizer.pad_token_id == image_id + 1, "a tokenizer that had <pad> but not <image>"
    return image_id, tokenizer.pad_token_id


def _image_processor(tower: str, vision_config, do_pad: bool) -> LlavaImageProcessorPil:
    """The tower's preprocessing as a LlavaImageProcessor (which pads as LLaVA's expand2square, filling with the
    mean: 127 for SigLIP's 0.5, LLaVA-NeXT's fill): CLIP's as saved; SigLIP's exact resize, no crop."""
    if tower_family(vision_config.model_type, "--vision_tower").cls_token:
        return LlavaImageProcessorPil.from_pretrained(tower, do_pad=do_pad)
    siglip = image_processor(tower, vision_config.model_type)
    return LlavaImageProcessorPil(do_pad=do_pad, do_center_crop=False, size=dict(siglip.size),
                                  resample=siglip.resample, image_mean=siglip.image_mean, image_std=siglip.image_std,
                                  rescale_factor=siglip.rescale_factor, do_convert_rgb=True)  # fmt: skip


def _source(checkpoint: str | None, llm: str | None, adapter: str | None, clip: str | None) -> tuple:
    """(settings, llm_config, vision_config, state, CLIP folder, tokenizer folder) of either export source; folders
    and hub ids in, local folders out."""
    if checkpoint:
        folder, clip = fetch_checkpoint(checkpoint, clip)
        if checkpoint_kind(folder) != "llava":
            raise ValueError(f"--checkpoint {checkpoint!r}: not a LLaVA-format stage-2 folder (model_type llava_llama)")
        settings, llm_config, vision_config, state = read_settings(folder), *load_llava_checkpoint_state(folder, clip)
        return settings, llm_config, vision_config, state, clip, folder
    if not (llm and adapter and clip):
        raise ValueError("give --checkpoint, or all of --model_name_or_path, --pretrain_mm_mlp_adapter, --vision_tower")
    llm, clip = fetch(llm, "--model_name_or_path"), fetch(clip, "--vision_tower")
    stage1 = os.path.dirname(os.path.abspath(adapter))  # a stage-1 output_dir has LLaVA's config.json next to it
    s = read_settings(stage1) if checkpoint_kind(stage1) == "llava" else LlavaSettings()
    llm_config, vision_config = AutoConfig.from_pretrained(llm), folder_tower_config(clip, "--vision_tower")
    state = pretrained_state_dict(llm, clip) | projector_state(s.mm_projector_type, vision_config, llm_config, adapter)
    return s, llm_config, vision_config, state, clip, llm


def export_llava_hf(
    output: str,
    *,
    checkpoint: str | None = None,
    model_name_or_path: str | None = None,
    pretrain_mm_mlp_adapter: str | None = None,
    vision_tower: str | None = None,
    version: str = "v1",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> None:
    """Write `output` as a llava-hf folder: weights (dtype None: the checkpoint's), config, generation config,
    tokenizer (+<image>, and <pad> unless it has a pad of its own), LlavaProcessor (the tower folder's
    preprocessing, do_pad = image_aspect_ratio pad, `version`'s chat template).
    AutoProcessor.from_pretrained(output, backend="pil") preprocesses exactly as training did; the default
    torchvision backend differs slightly (data.load_image_processor)."""
    s, llm_config, vision_config, state, clip, tok_dir = _source(
        checkpoint, model_name_or_path, pretrain_mm_mlp_adapter, vision_tower
    )
    dtype = dtype or state[EMBEDDINGS[0]].dtype
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_id, pad_id = add_llava_tokens(tokenizer)
    old = llm_config.vocab_size
    vocab = -(-max(old, len(tokenizer)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # 32000 + 2 -> 32064, as llava-hf
    generator = torch.Generator().manual_seed(seed)
    for k in EMBEDDINGS:
        state[k] = torch.cat([state[k].to(dtype), sample_new_rows(state[k], vocab - old, generator).to(dtype)])
    if getattr(llm_config, "tie_word_embeddings", False):  # one matrix: lm_head gets the embedding's new rows
        state[EMBEDDINGS[1]] = state[EMBEDDINGS[0]]
    config = hf_config(llm_config, vision_config, s, vocab, image_id, pad_id)
    config.text_config.dtype = config.vision_config.dtype = dtype  # save_pretrained sets only the top-level one
    model = build_hf_model(config, {k: v.to(dtype) for k, v in state.items()})
    if os.path.isfile(os.path.join(tok_dir, "generation_config.json")):  # the LLM's (bos, eos, sampling defaults)
        model.generation_config = GenerationConfig.from_pretrained(tok_dir)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(output)
    LlavaProcessor(
        image_processor=_image_processor(clip, vision_config, s.image_aspect_ratio == "pad"),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP's CLS ("default" drops it again) or none (SigLIP): <image> -> image_seq_length ids
        num_additional_image_tokens=int(tower_family(vision_config.model_type, "--vision_tower").cls_token),
        chat_template=chat_template(version, image_marker(tokenizer)),
    ).save_pretrained(output)


def merge_lora_output(
    lora_dir: str,
    output: str,
    *,
    model_name_or_path: str | None = None,
    vision_tower: str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `output` as a LLaVA stage-2 folder: the LoRA run's base LLM (default: adapter_config.json's
    base_model_name_or_path) with the adapters merged, its projector, the CLIP tower, the base's tokenizer and
    generation config, the run's config.json. dtype None: the LoRA run's (config.json dtype)."""
    conf, state, base = merged_lora_state(lora_dir, model_name_or_path, vision_tower)
    dtype = dtype or getattr(torch, conf.get("dtype") or "float32")
    tokenizer = load_tokenizer(base, conf.get("tokenizer_model_max_length", 2048))
    if os.path.isfile(os.path.join(base, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(base)
    else:
        generation = GenerationConfig(**{k: conf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    conf = {**conf, "dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch.")}
    save_stage2_folder(output, state, conf, dtype, generation, tokenizer, base)


def main(argv: list[str] | None = None) -> None:
    """CLI: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m minillava.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="LLaVA-format stage-2 folder (minillava's or LLaVA's), or hub id")
    p.add_argument("--merge_lora", help="a LoRA run's output_dir: write a merged LLaVA stage-2 folder instead")
    p.add_argument("--model_name_or_path", help="base LLM folder or hub id (with --pretrain_mm_mlp_adapter or "
                   "--merge_lora)")  # fmt: skip
    p.add_argument("--pretrain_mm_mlp_adapter", help="stage-1 mm_projector.bin")
    p.add_argument("--vision_tower", help="CLIP folder or hub id (default: the checkpoint's mm_vision_tower)")
    p.add_argument("--output", required=True, help="llava-hf folder to write (stage-2 folder with --merge_lora)")
    p.add_argument("--version", default="v1", help="the run's --version: the processor's chat template (v1, qwen_2, "
                   "llava_llama_3, ...)")  # fmt: skip
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed for the new <image>/<pad>/padding embedding rows")
    kw = vars(p.parse_args(argv))
    kw["dtype"] = None if kw["dtype"] == "auto" else getattr(torch, kw["dtype"])
    output, lora = kw.pop("output"), kw.pop("merge_lora")
    if lora:
        if kw["checkpoint"] or kw["pretrain_mm_mlp_adapter"]:
            raise ValueError("--merge_lora takes no --checkpoint / --pretrain_mm_mlp_adapter")
        merge_lora_output(lora, output, model_name_or_path=kw["model_name_or_path"], vision_tower=kw["vision_tower"],
                          dtype=kw["dtype"])  # fmt: skip
    else:
        export_llava_hf(output, **kw)
    print(f"wrote {os.path.abspath(output)}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
