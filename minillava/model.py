"""LLaVA-1.5 glue around real transformers models: CLIP tower -> projector -> splice at <image> -> Llama -> loss.

Pure architecture (no torch.distributed): FSDP2 and activation checkpointing are applied from outside, to each of
`decoder_layers()`, to `vision_tower` as one unit, then to the root. Shapes: Karpathy-style comments, `# (B, T, D)`.
Behaviour follows llava/model/llava_arch.py and language_model/llava_llama.py (assembly) and llava/train/train.py
(trainable sets).
"""

import functools
import importlib.util
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from minillava.attention import VARLEN_ATTENTION, pack_batch, register_varlen_attention
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.loss import chunked_cross_entropy

SELECT_FEATURES = ("patch", "cls_patch")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True, kw_only=True)
class LlavaSettings:
    """The LLaVA knobs a model is built, fed and saved with (LLaVA's mm_* config fields, llava/model/llava_arch.py).

    The model uses the first four; image_aspect_ratio is the data's, vision_tower the CLIP folder a LLaVA-format
    checkpoint names (llava-hf folders carry their vision config)."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"
    vision_tower: str | None = None


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """LLaVA's projector (builder.py L33-51): linear, mlp{N}x_gelu (exact GELU) or identity, with LLaVA's key names."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)  # bare Linear: keys mm_projector.weight/.bias, as LLaVA
    if m := re.fullmatch(r"mlp(\d+)x_gelu", projector_type):
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]  # mlp2x: indices 0, 1 (GELU), 2
        return nn.Sequential(*layers)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(
                f"--mm_projector_type identity needs mm_hidden_size == hidden_size, got "
                f"{mm_hidden_size} vs {hidden_size}"
            )
        return nn.Identity()
    raise ValueError(f"--mm_projector_type {projector_type!r}: expected linear, mlp<N>x_gelu or identity")


def _select_layer_forward(tower: CLIPVisionModel, pixel_values: Tensor, *, num_layers: int) -> Tensor:
    """CLIP's hidden_states[num_layers] (before post_layernorm) without running the later layers."""
    h = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))  # (N, 1+P, C)
    h = tower.pre_layrnorm(h)  # = hidden_states[0]
    for layer in tower.encoder.layers[:num_layers]:
        h = layer(h, None)  # transformers 5 CLIPEncoderLayer(hidden_states, attention_mask): images need no mask
    return h


class LlavaModel(nn.Module):
    """LlavaLlamaForCausalLM (llava_llama.py) as composition: `.llm`, `.vision_tower` (frozen), `.mm_projector`.

    The tower's `forward` is rebound to `_select_layer_forward`: `vision_tower(pixel_values)` returns the
    (N, 1+P, C) tensor hidden_states[mm_vision_select_layer], not a ModelOutput. Going through the tower's own
    __call__ keeps FSDP2's unshard hooks (the tower is one FSDP unit) working while skipping the later layers.
    """

    def __init__(
        self,
        llm: LlamaForCausalLM,
        vision_tower: CLIPVisionModel,
        settings: LlavaSettings | None = None,
        *,
        loss_chunk_size: int = 2048,
    ) -> None:
        super().__init__()
        self.settings = settings = settings or LlavaSettings()
        mm_projector_type, mm_vision_select_layer = settings.mm_projector_type, settings.mm_vision_select_layer
        mm_vision_select_feature, model_max_length = settings.mm_vision_select_feature, settings.model_max_length
        n = vision_tower.config.num_hidden_layers
        if not -(n + 1) <= mm_vision_select_layer <= n:
            raise ValueError(f"--mm_vision_select_layer {mm_vision_select_layer}: the tower has {n} layers")
        if mm_vision_select_feature not in SELECT_FEATURES:
            raise ValueError(f"--mm_vision_select_feature {mm_vision_select_feature!r}: expected {SELECT_FEATURES}")
        self.llm, self.vision_tower = llm, vision_tower
        self.mm_projector = build_projector(mm_projector_type, vision_tower.config.hidden_size, llm.config.hidden_size)
        self.mm_projector.to(llm.get_input_embeddings().weight.dtype)
        self.mm_projector_type, self.mm_vision_select_layer = mm_projector_type, mm_vision_select_layer
        self.mm_vision_select_feature, self.model_max_length = mm_vision_select_feature, model_max_length
        self.loss_chunk_size = loss_chunk_size
        llm.config.use_cache = False  # training, as LLaVA's train.py
        vision_tower.requires_grad_(False)  # clip_encoder.py load_model: never trained in v1.5
        num_layers = mm_vision_select_layer % (n + 1)  # hidden_states has n + 1 entries; -2 -> n - 1 layers run
        vision_tower.forward = functools.partial(_select_layer_forward, vision_tower, num_layers=num_layers)

    @property
    def num_image_tokens(self) -> int:
        """LLM positions one image takes: P patches (576 at 336px/14), plus CLS for cls_patch."""
        cfg = self.vision_tower.config
        return (cfg.image_size // cfg.patch_size) ** 2 + (self.mm_vision_select_feature == "cls_patch")

    @property
    def padding_free(self) -> bool:
        """True when the LLM was built with the varlen attention (--padding_free): forward then packs each batch."""
        return self.llm.config._attn_implementation == VARLEN_ATTENTION

    def decoder_layers(self) -> list[nn.Module]:
        """The LlamaDecoderLayer modules (FSDP units / activation-checkpointing targets)."""
        return list(self.llm.model.layers)

    def encode_images(self, pixel_values: Tensor, dtype: torch.dtype) -> Tensor:
        """(N, 3, H, W) images -> (N, P, D) projected features in `dtype` (llava_arch.py encode_images)."""
        with torch.no_grad():  # the tower never gets a backward (clip_encoder.py forward)
            feats = self.vision_tower(pixel_values)  # (N, 1+P, C)
        if self.mm_vision_select_feature == "patch":
            feats = feats[:, 1:]  # drop CLS: (N, P, C), P = 576 at 336px
        # Inside the root's forward the projector's parameters are the unsharded, compute-dtype ones under FSDP2.
        proj_dtype = next(self.mm_projector.parameters(), feats).dtype
        return self.mm_projector(feats.to(proj_dtype)).to(dtype)  # (N, P, D)

    def embed_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Spliced (inputs_embeds, labels, attention_mask, position_ids) for the LLM (LLaVA's prepare_inputs_...)."""
        text_embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, D); -200 rows unused
        image_feats = self.encode_images(pixel_values, text_embeds.dtype)  # (N, P, D)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        return splice_image_features(input_ids, labels, attention_mask, text_embeds, image_feats, self.model_max_length)

    def forward(
        self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor, pixel_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(loss_sum fp32, num_tokens int64): summed next-token CE over labels != -100; the caller normalises."""
        embeds, labels, attention_mask, position_ids = self.embed_inputs(
            input_ids, attention_mask, pixel_values, labels
        )
        if self.padding_free:  # one (1, N) sequence of real tokens; attention stays inside each sample (attention.py)
            p = pack_batch(embeds, labels, attention_mask)
            out = self.llm.model(
                inputs_embeds=p.embeds, position_ids=p.position_ids, use_cache=False, **p.attention_kwargs()
            )
            return chunked_cross_entropy(out.last_hidden_state, p.targets, self.llm.lm_head, self.loss_chunk_size)
        out = self.llm.model(  # right padding through HF's 2D-mask SDPA path
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return chunked_cross_entropy(
            out.last_hidden_state[:, :-1], labels[:, 1:], self.llm.lm_head, self.loss_chunk_size
        )

    @torch.no_grad()
    def init_non_pretrained(self) -> None:
        """After to_empty(): recompute non-persistent buffers and give the projector PyTorch's default init (as LLaVA).

        pretrained_state_dict() holds neither (CLIP position_ids, RoPE inv_freq; the projector is new or comes from
        --pretrain_mm_mlp_adapter), and to_empty() leaves them as garbage.
        """
        emb = self.vision_tower.embeddings
        pos = emb.position_ids
        pos.copy_(torch.arange(pos.shape[-1], device=pos.device).expand_as(pos))
        rope = self.llm.model.rotary_emb
        with torch.device("cpu"):  # a fresh rotary module computes inv_freq for any rope_type
            fresh = type(rope)(rope.config)
        rope.inv_freq.copy_(fresh.inv_freq)
        rope.original_inv_freq.copy_(fresh.original_inv_freq)
        rope.attention_scaling = fresh.attention_scaling
        for m in self.mm_projector.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()


def splice_image_features(
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor,
    text_embeds: Tensor,
    image_feats: Tensor,
    model_max_length: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Replace each IMAGE_TOKEN_INDEX by the next image's P features, in batch order (as LLaVA's
    prepare_inputs_labels_for_multimodal in llava/model/llava_arch.py).

    Drops padding (attention_mask False), expands each placeholder to P positions labelled -100, truncates every
    sequence to model_max_length after expansion, re-pads right (zero embeddings, -100 labels). A text-only sample
    still owns one image slot (its zero image), as LLaVA's cur_image_idx does. Every image feature enters the output
    through one gather, so the tower/projector output stays in the graph (zero gradient where unused), which is what
    LLaVA's zero-length `image_features[i][0:0]` achieves: every rank then runs the same backward collectives.
    Returns (embeds (B, T2, D), labels (B, T2), attention_mask bool (B, T2), position_ids (B, T2)).
    """
    B, T = input_ids.shape
    N, P, D = image_feats.shape
    mask = attention_mask.bool()
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & mask  # (B, T)
    slots = is_img.sum(1).clamp(min=1)  # (B,) images each sample consumes
    if int(slots.sum()) != N:
        n_ph, n_text = int(is_img.sum()), int((~is_img.any(1)).sum())
        raise ValueError(
            f"{n_ph} <image> placeholders plus {n_text} text-only samples (one zero image each) need "
            f"{n_ph + n_text} images, got {N}"
        )
    width = torch.where(is_img, P, 1) * mask  # (B, T) output positions per input position (0 for padding)
    start = width.cumsum(1) - width  # (B, T) output position of each input position
    new_len = width.sum(1).clamp(max=model_max_length)  # (B,) truncation after expansion, as llava_arch.py
    T2 = int(new_len.max())
    # Gather table: rows [0, B*T) text, [B*T, B*T + N*P) image features, last row = padding.
    pad_row = B * T + N * P
    table = torch.cat([text_embeds.reshape(B * T, D), image_feats.reshape(N * P, D), text_embeds.new_zeros(1, D)])
    label_table = torch.cat([labels.reshape(B * T), labels.new_full((N * P + 1,), IGNORE_INDEX)])
    src = torch.full((B, T2), pad_row, dtype=torch.long, device=input_ids.device)  # (B, T2) row of table
    b, t = torch.nonzero(mask & ~is_img, as_tuple=True)  # text tokens
    col, keep = start[b, t], start[b, t] < T2  # col >= T2 only when past model_max_length
    src[b[keep], col[keep]] = (b * T + t)[keep]
    b, t = torch.nonzero(is_img, as_tuple=True)  # placeholders, row-major = batch order
    slot = (slots.cumsum(0) - slots)[b] + is_img.cumsum(1)[b, t] - 1  # (N_ph,) image index of each placeholder
    p = torch.arange(P, device=input_ids.device)
    col = start[b, t][:, None] + p  # (N_ph, P)
    keep = col < T2
    src[b[:, None].expand(-1, P)[keep], col[keep]] = (B * T + slot[:, None] * P + p)[keep]
    pos = torch.arange(T2, device=input_ids.device).expand(B, T2)  # (B, T2)
    new_mask = pos < new_len[:, None]
    return table[src], label_table[src], new_mask, pos * new_mask  # positions: arange on the valid prefix, else 0


def set_trainable(
    model: LlavaModel, *, tune_mm_mlp_adapter: bool, freeze_mm_mlp_adapter: bool = False, freeze_backbone: bool = False
) -> None:
    """LLaVA's requires_grad sets (train.py): stage 1 projector only, stage 2 LLM + projector; tower frozen."""
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    if freeze_backbone:
        model.llm.model.requires_grad_(False)  # LLaVA freezes model.model: lm_head (and the projector) stay trainable
    if tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.mm_projector.requires_grad_(True)
    if freeze_mm_mlp_adapter:
        model.mm_projector.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter leaves no trainable parameter")


COMPONENTS = ("vision_tower", "mm_projector", "llm.embed_tokens", "llm.layers", "llm.norm", "llm.lm_head")


def _component(name: str) -> str:
    name = name.replace("llm.model.", "llm.", 1)
    return next((c for c in COMPONENTS if name.startswith(c + ".")), "other")


def parameter_report(model: LlavaModel) -> str:
    """Table of trainable/frozen parameter counts per component (prismatic's freeze log; DTensors count globally)."""
    counts = {c: [0, 0] for c in (*COMPONENTS, "other")}
    for name, p in model.named_parameters():
        counts[_component(name)][0 if p.requires_grad else 1] += p.numel()
    rows = [(c, t, f) for c, (t, f) in counts.items() if c != "other" or t + f]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return "\n".join(
        [f"{'component':<18}{'trainable':>16}{'frozen':>16}"] + [f"{c:<18}{t:>16,}{f:>16,}" for c, t, f in rows]
    )


def _attn_kw(attn_implementation: str, padding_free: bool = False) -> tuple[str, str]:
    """(LLM, tower) attn_implementation; padding_free gives the LLM the varlen attention (the tower keeps SDPA)."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation {attn_implementation!r}: expected one of {ATTN_IMPLEMENTATIONS}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "--attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn)"
        )
    # The tower stays on SDPA unless eager is asked for: FA2 would need a bf16/fp16 tower.
    llm_attn = register_varlen_attention() if padding_free else attn_implementation
    return llm_attn, "eager" if attn_implementation == "eager" else "sdpa"


def build_llava_from_config(
    llm_config: LlamaConfig,
    vision_config: CLIPVisionConfig,
    settings: LlavaSettings | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    padding_free: bool = False,
    loss_chunk_size: int = 2048,
) -> LlavaModel:
    """LlavaModel from configs with random weights; cheap under `with torch.device("meta"):` (load weights later)."""
    llm_attn, tower_attn = _attn_kw(attn_implementation, padding_free)
    llm = LlamaForCausalLM._from_config(llm_config, attn_implementation=llm_attn, dtype=dtype)
    tower = CLIPVisionModel._from_config(vision_config, attn_implementation=tower_attn, dtype=dtype)
    return LlavaModel(llm, tower, settings, loss_chunk_size=loss_chunk_size)
