"""Greedy decoding with a KV cache, for a quick look at what a stage-2 checkpoint does with an image.

    python -m minillava.generate --checkpoint DIR --image PATH --prompt "What is in the image?" [--max_new_tokens 64]

DIR is a LLaVA-format stage-2 folder (minillava's or LLaVA's) or a llava-hf folder (minillava.export), or a hub id of
either (downloaded into the hub cache unless HF_HUB_OFFLINE=1; so is a hub id as --vision_tower or as the folder's
mm_vision_tower). The prompt and the image go through exactly the training/eval path: conversation template,
tokenizer_image_token, expand2square.
"""

import argparse
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from minillava.cli import run_tool
from minillava.conversation import build_inference_prompt, tokenizer_image_token
from minillava.data import load_image_processor, load_tokenizer, open_image, process_image
from minillava.formats.folders import checkpoint_kind
from minillava.formats.llava import clip_folder, fetch_checkpoint, load_llava_checkpoint_state, read_settings
from minillava.model import LlavaModel, LlavaSettings, build_llava_from_config


def load_model(
    checkpoint: str, vision_tower: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[LlavaModel, LlavaSettings]:
    """LlavaModel with a checkpoint's weights (strict), in eval mode on `device`, plus the checkpoint's settings."""
    settings = read_settings(checkpoint)
    llm_config, vision_config, state = load_llava_checkpoint_state(checkpoint, vision_tower)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = build_llava_from_config(llm_config, vision_config, settings, dtype=dtype)
    model.to_empty(device="cpu")
    model.init_non_pretrained()  # non-persistent buffers (RoPE, CLIP position ids); every weight is loaded next
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(device).eval(), settings


def load_image_processor_for(checkpoint: str, settings: LlavaSettings, vision_tower: str | None) -> Any:
    """The PIL CLIP processor training used: from the vision tower folder (LLaVA format: `vision_tower`, else
    settings.vision_tower, the config's mm_vision_tower) or the llava-hf folder."""
    processor = load_image_processor(
        checkpoint if checkpoint_kind(checkpoint) == "llava-hf" else clip_folder(checkpoint, vision_tower)
    )
    processor.do_pad = False  # process_image pads (expand2square) when image_aspect_ratio is pad
    return processor


def _cache_keyword(llm: torch.nn.Module) -> str:
    """The KV-cache argument of the LLM's forward: `cache` where transformers renamed it (5.24 warns on the old name,
    a FutureWarning), else `past_key_values` (5.17 has no `cache`)."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model: LlavaModel,
    input_ids: Tensor,
    pixel_values: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    use_cache: bool = True,
) -> list[int]:
    """Greedy continuation of one prompt (input_ids (T,) with -200 placeholders, pixel_values (N, 3, H, W)).

    With use_cache the prompt runs once into a DynamicCache and each new token is one forward step; without it the
    whole sequence is recomputed every step (the reference the cache is tested against). Stops after eos."""
    ids = input_ids[None].to(model.llm.device)  # (1, T)
    embeds, _, mask, pos = model.embed_inputs(ids, torch.ones_like(ids, dtype=torch.bool), pixel_values)  # (1, T2, D)
    cache = {_cache_keyword(model.llm): DynamicCache(config=model.llm.config) if use_cache else None}
    step_embeds, step_pos, out = embeds, pos, []
    for _ in range(max_new_tokens):
        logits = model.llm(
            inputs_embeds=step_embeds,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=use_cache,
            logits_to_keep=1,
            **cache,  # the DynamicCache is filled in place
        ).logits  # (1, 1, V)
        token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(token))
        if out[-1] == eos_token_id:
            break
        new = model.llm.get_input_embeddings()(token)  # (1, 1, D)
        mask = F.pad(mask, (0, 1), value=True)
        if use_cache:  # only the new token goes in; keys/values of the past come from the cache
            step_embeds, step_pos = new, step_pos[:, -1:] + 1
        else:
            step_embeds = torch.cat([step_embeds, new], 1)
            step_pos = torch.arange(step_embeds.shape[1], device=ids.device)[None]
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: see the module docstring; prints the decoded answer."""
    p = argparse.ArgumentParser(prog="python -m minillava.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="LLaVA-format stage-2 folder or llava-hf folder, or hub id")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question (the template and <image> are added)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--version", default="v1", help="conversation template the checkpoint was trained with")
    p.add_argument("--vision_tower", help="CLIP folder or hub id (default: the checkpoint's mm_vision_tower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: bf16 on GPU")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    checkpoint, vision_tower = fetch_checkpoint(a.checkpoint, a.vision_tower)  # local folders
    model, settings = load_model(checkpoint, vision_tower, device=a.device, dtype=dtype)
    tokenizer = load_tokenizer(checkpoint, settings.model_max_length)
    processor = load_image_processor_for(checkpoint, settings, vision_tower)
    image = open_image(a.image, settings.image_aspect_ratio)
    pixel_values = process_image(image, processor, settings.image_aspect_ratio)[None]
    prompt = build_inference_prompt(a.prompt, a.version, has_image=True, tokenizer=tokenizer)
    input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer))
    out = greedy_generate(
        model,
        input_ids,
        pixel_values.to(a.device),
        max_new_tokens=a.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(out, skip_special_tokens=True).strip())


if __name__ == "__main__":
    sys.exit(run_tool(main))
