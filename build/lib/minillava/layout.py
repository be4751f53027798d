"""The batch layout, finished on the host before the forward (pure torch on CPU tensors; no torch.distributed).

LLaVA's prepare_inputs_labels_for_multimodal (llava/model/llava_arch.py) discovers the layout inside the forward:
it expands each <image> placeholder to the image's P feature positions, truncates every sequence to
model_max_length after the expansion, and re-pads. Every step of that depends only on token ids and lengths, which
the collator already holds, so `lay_out` does it here, once, on the CPU. The forward then only gathers (token
embeddings, image features at `image_pos`) and computes: no nonzero, no boolean-mask indexing, no .item() on a
device tensor. The counts that loss normalisation and logging need (`num_label_tokens`, `seq_lens`) are host ints.

Two layouts of the same positions:
  padded (B, T): each sample's positions from 0, right-padded to the longest, with an attention mask;
  packed (1, N): the samples' real positions one after another, with cu_seqlens for varlen attention.
Labels are stored already shifted: hidden state `label_pos[i]` (a flat index into the layout) predicts
`label_ids[i]`, the next token of the same sample, so no position predicts across a sample boundary.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch
from torch import Tensor

from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True, eq=False)
class Batch(Mapping):
    """One micro-batch in its final layout. As a Mapping it is the forward's keyword arguments (model(**batch));
    the host facts (`seq_lens`, `num_label_tokens`, `num_images`, ...) are attributes only."""

    input_ids: Tensor  # (B, T) or (1, N) long: token ids, 0 at image positions (their embedding is replaced)
    position_ids: Tensor  # same shape: 0, 1, ... within each sample (0 on padding)
    pixel_values: Tensor  # (num_images, 3, H, W): one per sample, a zero image for text-only ones (LLaVA's)
    image_pos: Tensor  # (K,) long: flat layout positions that take an image feature row...
    image_rows: Tensor  # (K,) long: ...row image * P + p of the (num_images * P, D) projected features
    label_pos: Tensor  # (L,) long: flat positions whose hidden state predicts a label...
    label_ids: Tensor  # (L,) long: ...this label
    labels: Tensor  # input_ids' shape: the labels at their positions, unshifted (for inspection; not an input)
    attention_mask: Tensor | None  # (B, T) bool, padded layout only; None when no sample is padded
    cu_seqlens: Tensor | None  # (B + 1,) int32 sample boundaries, packed layout only
    max_len: int  # the longest sample's length
    seq_lens: tuple[int, ...]  # every sample's LLM length after expansion and truncation
    num_label_tokens: int  # L: labels that get a loss (the model's num_tokens)
    num_images: int  # images the layout consumes: placeholders + one zero image per text-only sample
    num_text_only: int = 0  # samples without an image
    num_lost_labels: int = 0  # label tokens truncation cut from these samples (the dataset's count; logging only)

    INPUTS = ("input_ids", "position_ids", "pixel_values", "image_pos", "image_rows", "label_pos", "label_ids")

    @cached_property
    def _inputs(self) -> dict:  # built once: model(**batch) reads every key
        out = {k: getattr(self, k) for k in self.INPUTS}
        if self.cu_seqlens is not None:
            out.update(cu_seqlens=self.cu_seqlens, max_len=self.max_len, seq_lens=self.seq_lens)
        else:
            out["attention_mask"] = self.attention_mask
        return out

    def __getitem__(self, key: str):
        return self._inputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def _map(self, fn) -> "Batch":
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(v) for k, v in tensors.items() if isinstance(v, Tensor)})

    def to(self, device: torch.device) -> "Batch":
        """On `device`; non_blocking only from pinned memory (the DataLoader pins on CUDA)."""
        return self._map(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this on custom batch types
        return self._map(lambda t: t.pin_memory())


def _expand(ids: Tensor, labels: Tensor, image_tokens: int, max_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One sample: (ids, labels) with placeholders -> its final (ids, labels), and for each kept image position its
    offset in the sample and the index p * placeholder of the feature it takes (local to the sample)."""
    is_img = ids == IMAGE_TOKEN_INDEX
    width = torch.where(is_img, image_tokens, 1)
    start = width.cumsum(0) - width  # output position of each input token
    n = min(int(width.sum()), max_len)  # truncation after expansion, as llava_arch.py
    out_ids = torch.zeros(n, dtype=torch.long)
    out_labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    text = ~is_img & (start < n)
    out_ids[start[text]] = ids[text]
    out_labels[start[text]] = labels[text]
    p = torch.arange(image_tokens)
    pos = (start[is_img][:, None] + p).flatten()  # (n_ph * P,)
    rows = (torch.arange(int(is_img.sum()))[:, None] * image_tokens + p).flatten()
    keep = pos < n
    return out_ids, out_labels, pos[keep], rows[keep]


def supervised_tokens(ids: Tensor, labels: Tensor, image_tokens: int, max_len: int) -> int:
    """Labels of one sample that get a loss once each <image> is expanded to image_tokens positions and the result
    truncated to max_len (LLaVA's order): what the layout will train. Zero for a sample whose answers the image
    tokens push past max_len, which LLaVA trains on silently with no loss."""
    _, out_labels, _, _ = _expand(ids, labels, image_tokens, max_len)
    return int((out_labels[1:] != IGNORE_INDEX).sum())


def lay_out(raw: dict[str, Tensor], *, image_tokens: int, max_len: int, padding_free: bool) -> Batch:
    """LLaVA's collated batch (DataCollator: right-padded input_ids with IMAGE_TOKEN_INDEX placeholders, labels,
    attention_mask, pixel_values) -> its final padded or packed layout. Images are consumed in batch order, and a
    text-only sample still owns one image slot (its zero image), as LLaVA's cur_image_idx does."""
    mask = raw["attention_mask"].bool()
    samples, image_base, text_only = [], 0, 0
    for ids, labels, m in zip(raw["input_ids"], raw["labels"], mask, strict=True):
        ids, labels = ids[m], labels[m]
        out_ids, out_labels, pos, rows = _expand(ids, labels, image_tokens, max_len)
        samples.append((out_ids, out_labels, pos, rows + image_base * image_tokens))
        placeholders = int((ids == IMAGE_TOKEN_INDEX).sum())
        image_base += max(placeholders, 1)
        text_only += placeholders == 0
    pixel_values = raw["pixel_values"]
    if pixel_values.shape[0] != image_base:
        n_ph = sum(int((ids[m] == IMAGE_TOKEN_INDEX).sum()) for ids, m in zip(raw["input_ids"], mask, strict=True))
        raise ValueError(
            f"{n_ph} <image> placeholders plus {image_base - n_ph} text-only samples (one zero image each) need "
            f"{image_base} images, got {pixel_values.shape[0]}"
        )
    seq_lens = tuple(len(s[0]) for s in samples)
    T = max(seq_lens)
    # flat offset of each sample's position 0: row b * T (padded) or the running total (packed)
    offsets = [sum(seq_lens[:b]) for b in range(len(samples))] if padding_free else [b * T for b in range(len(samples))]
    width = sum(seq_lens) if padding_free else T
    shape = (1, width) if padding_free else (len(samples), T)
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    flat_ids, flat_pos = input_ids.view(-1), position_ids.view(-1)
    all_labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    image_pos, image_rows, label_pos, label_ids = [], [], [], []
    for off, (ids, labels, pos, rows) in zip(offsets, samples, strict=True):
        n = len(ids)
        flat_ids[off : off + n] = ids
        flat_pos[off : off + n] = torch.arange(n)
        all_labels.view(-1)[off : off + n] = labels
        image_pos.append(pos + off)
        image_rows.append(rows)
        has_label = labels[1:] != IGNORE_INDEX  # hidden state t predicts label t + 1 of the same sample
        label_pos.append(torch.arange(n - 1)[has_label] + off)
        label_ids.append(labels[1:][has_label])
    lengths = torch.tensor(seq_lens)
    padded = not padding_free and any(n < T for n in seq_lens)
    label_pos_t = torch.cat(label_pos)
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        pixel_values=pixel_values,
        image_pos=torch.cat(image_pos),
        image_rows=torch.cat(image_rows),
        label_pos=label_pos_t,
        label_ids=torch.cat(label_ids),
        labels=all_labels,
        attention_mask=(torch.arange(T)[None, :] < lengths[:, None]) if padded else None,
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]) if padding_free else None,
        max_len=T,
        seq_lens=seq_lens,
        num_label_tokens=len(label_pos_t),
        num_images=image_base,
        num_text_only=text_only,
        num_lost_labels=int(raw.get("lost_labels", 0)),
    )


@dataclass(frozen=True)
class LayoutCollator:
    """The training DataLoader's collate_fn: LLaVA's collator (minillava.data.DataCollator), then lay_out, so each
    batch leaves the worker in its final layout. Picklable for worker processes."""

    collate: Callable[[list[dict[str, Tensor]]], dict[str, Tensor]]
    image_tokens: int
    max_len: int
    padding_free: bool

    def __call__(self, instances: list[dict[str, Tensor]]) -> Batch:
        raw = self.collate(instances)
        return lay_out(raw, image_tokens=self.image_tokens, max_len=self.max_len, padding_free=self.padding_free)
