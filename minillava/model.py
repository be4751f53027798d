"""LLaVA-1.5 glue around real transformers models: CLIP tower -> projector -> splice at <image> -> LLM -> loss.

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
from transformers import PretrainedConfig, PreTrainedModel

from minillava.attention import VARLEN_ATTENTION, register_padded_sdpa, register_varlen_attention
from minillava.backbones import build_llm, build_tower, tower_family
from minillava.constants import IGNORE_INDEX
from minillava.layout import Batch, lay_out
from minillava.lora import LoRALinear, add_lora, is_lora_param
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


def _input_to_own_dtype(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the projector: its input in the dtype of its own weights at call time. Under FSDP2 (whose
    pre-forward hook runs first) those are the gathered compute-dtype weights, so bf16 tower features go in as they
    are; read before the call, they would be the sharded fp32 masters: a bf16 -> fp32 -> bf16 round trip."""
    p = next(module.parameters(), None)
    return None if p is None else tuple(a.to(p.dtype) for a in args)


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


def _select_layer_forward(tower: nn.Module, pixel_values: Tensor, *, num_layers: int) -> Tensor:
    """The tower's hidden_states[num_layers] (before post_layernorm) without running the later layers."""
    h = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))  # (N, [1+]P, C)
    if hasattr(tower, "pre_layrnorm"):  # CLIP's; SigLIP has none
        h = tower.pre_layrnorm(h)  # = hidden_states[0]
    for layer in tower.encoder.layers[:num_layers]:
        h = layer(h, None)  # transformers 5 CLIPEncoderLayer(hidden_states, attention_mask): images need no mask
    return h


def image_tokens(vision_config, select_feature: str = "patch") -> int:
    """LLM positions one image takes: P patches (576 at 336px/14), plus CLS for cls_patch."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + (select_feature == "cls_patch")


class LlavaModel(nn.Module):
    """LlavaLlamaForCausalLM (llava_llama.py) as composition: `.llm`, `.vision_tower` (frozen), `.mm_projector`.

    The tower's `forward` is rebound to `_select_layer_forward`: `vision_tower(pixel_values)` returns the
    (N, 1+P, C) tensor hidden_states[mm_vision_select_layer], not a ModelOutput. Going through the tower's own
    __call__ keeps FSDP2's unshard hooks (the tower is one FSDP unit) working while skipping the later layers.
    """

    def __init__(
        self,
        llm: PreTrainedModel,
        vision_tower: nn.Module,
        settings: LlavaSettings | None = None,
        *,
        loss_chunk_size: int = 2048,
    ) -> None:
        super().__init__()
        self.settings = settings = settings or LlavaSettings()
        mm_projector_type, mm_vision_select_layer = settings.mm_projector_type, settings.mm_vision_select_layer
        mm_vision_select_feature, model_max_length = settings.mm_vision_select_feature, settings.model_max_length
        n, family = vision_tower.config.num_hidden_layers, tower_family(vision_tower.config.model_type, "the tower")
        if not -(n + 1) <= mm_vision_select_layer <= n:
            raise ValueError(f"--mm_vision_select_layer {mm_vision_select_layer}: the tower has {n} layers")
        if mm_vision_select_feature not in SELECT_FEATURES:
            raise ValueError(f"--mm_vision_select_feature {mm_vision_select_feature!r}: expected {SELECT_FEATURES}")
        if family.drop_last_layer and (mm_vision_select_layer not in (-1, -2) or mm_vision_select_feature != "patch"):
            raise ValueError("a SigLIP tower is read as LLaVA-NeXT reads it: every patch of its second-to-last layer "
                             "(--mm_vision_select_layer -2, --mm_vision_select_feature patch)")  # fmt: skip
        self.llm, self.vision_tower = llm, vision_tower
        self.mm_projector = build_projector(mm_projector_type, vision_tower.config.hidden_size, llm.config.hidden_size)
        self.mm_projector.to(llm.get_input_embeddings().weight.dtype)
        self.mm_projector.register_forward_pre_hook(_input_to_own_dtype)
        self.mm_projector_type, self.mm_vision_select_layer = mm_projector_type, mm_vision_select_layer
        self.mm_vision_select_feature, self.model_max_length = mm_vision_select_feature, model_max_length
        self.loss_chunk_size = loss_chunk_size
        llm.config.use_cache = False  # training, as LLaVA's train.py
        vision_tower.requires_grad_(False)  # clip_encoder.py load_model: never trained in v1.5
        # hidden_states has n + 1 entries; -2 -> n - 1 layers run. SigLIP: the tower was built without its last layer
        # (backbones.tower_config), so all of it runs.
        num_layers = n if family.drop_last_layer else mm_vision_select_layer % (n + 1)
        self.tower_layers_run, self.tower_cls = num_layers, family.cls_token
        vision_tower.forward = functools.partial(_select_layer_forward, vision_tower, num_layers=num_layers)

    @property
    def num_image_tokens(self) -> int:
        return image_tokens(self.vision_tower.config, self.mm_vision_select_feature)

    @property
    def padding_free(self) -> bool:
        """True when the LLM was built with the varlen attention (--padding_free): forward then packs each batch."""
        return self.llm.config._attn_implementation == VARLEN_ATTENTION

    def decoder_layers(self) -> list[nn.Module]:
        """The LLM's decoder layers (FSDP units / activation-checkpointing targets)."""
        return list(self.llm.model.layers)

    def encode_images(self, pixel_values: Tensor, dtype: torch.dtype) -> Tensor:
        """(N, 3, H, W) images -> (N, P, D) projected features in `dtype` (llava_arch.py encode_images)."""
        with torch.no_grad():  # the tower never gets a backward (clip_encoder.py forward)
            feats = self.vision_tower(pixel_values)  # (N, 1+P, C)
        if self.mm_vision_select_feature == "patch" and self.tower_cls:
            feats = feats[:, 1:]  # drop CLS: (N, P, C), P = 576 at 336px (SigLIP has none: 729 at 384px)
        # 2-D through the projector: a Linear on 3-D input returns a view, which FSDP2 warns about (a sharded
        # projector, stage 1) on every rank and step
        return self.mm_projector(feats.flatten(0, 1)).unflatten(0, feats.shape[:2]).to(dtype)  # (N, P, D)

    def layout(self, raw: dict[str, Tensor], padding_free: bool | None = None) -> Batch:
        """A LLaVA-collated batch in this model's final layout (host-side: what the training collator does)."""
        return lay_out(
            {k: v.cpu() for k, v in raw.items()},
            image_tokens=self.num_image_tokens,
            max_len=self.model_max_length,
            padding_free=self.padding_free if padding_free is None else padding_free,
        )

    def embed(self, input_ids: Tensor, pixel_values: Tensor, image_pos: Tensor, image_rows: Tensor) -> Tensor:
        """Token embeddings with every image's projected features written at their layout positions: (B, T, D)."""
        text_embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D); image positions are overwritten
        return splice(text_embeds, self.encode_images(pixel_values, text_embeds.dtype), image_pos, image_rows)

    def embed_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For inference and inspection: (inputs_embeds, labels, attention_mask, position_ids) of a LLaVA-collated
        batch in the padded layout, as LLaVA's prepare_inputs_labels_for_multimodal returns them."""
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        raw = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixel_values": pixel_values}
        b, dev = self.layout(raw, padding_free=False), input_ids.device
        embeds = self.embed(b.input_ids.to(dev), pixel_values, b.image_pos.to(dev), b.image_rows.to(dev))
        mask = torch.arange(b.max_len, device="cpu")[None, :] < torch.tensor(b.seq_lens, device="cpu")[:, None]
        return embeds, b.labels.to(dev), mask.to(dev), b.position_ids.to(dev)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        pixel_values: Tensor,
        image_pos: Tensor,
        image_rows: Tensor,
        label_pos: Tensor,
        label_ids: Tensor,
        attention_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_len: int | None = None,
        seq_lens: tuple[int, ...] | None = None,
    ) -> tuple[Tensor, int]:
        """(loss_sum fp32, num_tokens): summed next-token CE over the layout's labels (a minillava.layout.Batch,
        model(**batch)); the caller normalises. Gathers and computes only: the layout was finished on the host."""
        if (cu_seqlens is not None) != self.padding_free:
            raise ValueError(
                "a packed batch needs a model built with --padding_free True, and a padded one a model without it"
            )
        embeds = self.embed(input_ids, pixel_values, image_pos, image_rows)  # (B, T, D) or (1, N, D)
        if cu_seqlens is not None:  # one (1, N) sequence; attention stays inside each sample (attention.py)
            attn = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_len, max_length_k=max_len)
            attn["segment_lengths"] = seq_lens  # host values for the CPU fallback's per-segment attention
        else:  # right padding: SDPA's causal mask alone (see _causal_mask)
            attn = dict(attention_mask=None if attention_mask is None else self._causal_mask(attention_mask, embeds))
        out = self.llm.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **attn)
        hidden = out.last_hidden_state.flatten(0, 1)  # (B*T, D)
        return chunked_cross_entropy(hidden, label_pos, label_ids, self.llm.lm_head, self.loss_chunk_size)

    def _causal_mask(self, attention_mask: Tensor, embeds: Tensor) -> Tensor | None:
        """The attention mask of a right-padded (B, T) batch. SDPA: none. Every sample's padding follows its last
        token, so the causal mask alone already keeps each real query off every padded key: real positions get
        exactly what the padded mask gives them (padded positions carry no label), and with no mask SDPA may pick its
        flash kernel (a boolean (B, 1, T, T) mask forces the memory-efficient one). FA2 keeps the 2D mask (it unpads
        from it). Eager has no implicit causality: the (B, 1, T, T) additive mask HF would build, made here on the
        device (given a 2D mask, transformers' masking_utils reads it on the host every forward)."""
        impl = self.llm.config._attn_implementation
        if impl == "flash_attention_2":
            return attention_mask
        if impl != "eager":
            return None
        T = attention_mask.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]  # (B, 1, T, T) True = attend
        return torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(embeds.dtype).min
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
        for m in self.llm.modules():
            if isinstance(m, LoRALinear):
                m.reset_lora()


def splice(text_embeds: Tensor, image_feats: Tensor, image_pos: Tensor, image_rows: Tensor) -> Tensor:
    """Write image feature rows `image_rows` of (N, P, D) at flat positions `image_pos` of (B, T, D).

    Every image feature enters through one index_select, so the tower/projector output stays in the graph (zero
    gradient where unused, e.g. a text-only sample's zero image or features past model_max_length), which is what
    LLaVA's zero-length `image_features[i][0:0]` achieves: every rank then runs the same backward collectives."""
    rows = image_feats.flatten(0, 1).index_select(0, image_rows)  # (K, D)
    return text_embeds.flatten(0, 1).index_copy(0, image_pos, rows).view_as(text_embeds)


def set_trainable(
    model: LlavaModel,
    *,
    tune_mm_mlp_adapter: bool,
    freeze_mm_mlp_adapter: bool = False,
    freeze_backbone: bool = False,
    lora: bool = False,
) -> None:
    """LLaVA's requires_grad sets (train.py): stage 1 projector only, stage 2 LLM + projector, LoRA the adapters +
    projector; tower frozen."""
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    if freeze_backbone:
        model.llm.model.requires_grad_(False)  # LLaVA freezes model.model: lm_head (and the projector) stay trainable
    if lora:  # get_peft_model freezes all but the adapters; the projector, built after it, trains
        model.llm.requires_grad_(False)
        for name, p in model.llm.named_parameters():
            p.requires_grad_(is_lora_param(name))
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
    if padding_free:
        llm_attn = register_varlen_attention()
    else:  # sdpa through our registration: the same kernel, no host reads in HF's mask builder (attention.py)
        llm_attn = register_padded_sdpa() if attn_implementation == "sdpa" else attn_implementation
    return llm_attn, "eager" if attn_implementation == "eager" else "sdpa"


def build_llava_from_config(
    llm_config: PretrainedConfig,
    vision_config: PretrainedConfig,
    settings: LlavaSettings | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    padding_free: bool = False,
    loss_chunk_size: int = 2048,
    lora: tuple[int, float, float] | None = None,
) -> LlavaModel:
    """LlavaModel from configs with random weights; cheap under `with torch.device("meta"):` (load weights later).
    lora (r, alpha, dropout): adapters on every Linear of the LLM body (LLaVA's find_all_linear_names)."""
    llm_attn, tower_attn = _attn_kw(attn_implementation, padding_free)
    llm = build_llm(llm_config, attn_implementation=llm_attn, dtype=dtype)  # the config's own class (backbones.py)
    tower = build_tower(vision_config, attn_implementation=tower_attn, dtype=dtype)
    if lora is not None:
        add_lora(llm.model, *lora)
    return LlavaModel(llm, tower, settings, loss_chunk_size=loss_chunk_size)
