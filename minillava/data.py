"""LLaVA-1.5 training data: the lazy JSON dataset, image preprocessing and the padding collator
(llava/train/train.py L658-773: LazySupervisedDataset, DataCollatorForSupervisedDataset). Scan a dataset
before a long run with `python -m minillava.check_data --data_path ... --image_folder ...`."""

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from minillava.backbones import TOWER_TYPES, image_processor, pad_token, processor_size
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.conversation import TokenizationMismatch, Tokenizer, get_template, preprocess
from minillava.formats.records import read_records_cache, records_cache_dir, write_records_cache
from minillava.layout import supervised_tokens
from minillava.sampler import PAD_SAMPLE

logger = logging.getLogger(__name__)
ASPECT_RATIOS = ("pad", "square")
IMAGE_LENGTH = 128  # what `lengths` adds for a sample with an image (train.py L679)
# What one image may cost, checked from its file's header before any pixel is decoded. LLaVA-665K's images are at most
# a few thousand pixels a side and rarely wider than 4:1: these bounds reject only pathological files.
# Pixels of the decoded image and, under pad, of its square canvas: 192 MB as RGB, below the 89M pixels at which PIL
# warns of a decompression bomb (Image.MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 8192 * 8192
# Longer side over shorter. Under square the processor scales the shorter side to 336: at most 33600x336.
MAX_ASPECT_RATIO = 100
# Modes whose convert("RGB") gives sensible pixels: kept exactly as LLaVA's (alpha, palette transparency dropped).
RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA")


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Paste `img` centred on a square canvas of its longer side filled with `background` (train.py L706-717)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - width) // 2, (side - height) // 2))
    return out


def check_image_size(width: int, height: int, image_aspect_ratio: str) -> None:
    """ValueError if an image of this size, or what `image_aspect_ratio` makes of it, is over the bounds above."""
    long, short = max(width, height), max(min(width, height), 1)
    if long > MAX_ASPECT_RATIO * short:
        raise ValueError(f"{width}x{height} has aspect ratio {long / short:g}:1, over the limit of "
                         f"{MAX_ASPECT_RATIO}:1 (crop it)")  # fmt: skip
    if image_aspect_ratio == "pad" and long * long > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} pads to {long}x{long} = {long * long:,} pixels, over the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (downscale it)")  # fmt: skip
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
                         "(downscale it)")  # fmt: skip


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB: LLaVA's img.convert("RGB") (train.py L697) for RGB_MODES, alpha and palette transparency
    dropped as there. convert() clips deeper greyscale to white, so I;16* keep their high byte, I is taken as 16-bit
    (Pillow decodes 16-bit PGM to I as 0..65535), and F as 0..1 (rounded) if its maximum is at most 1, else as
    0..255 (PIL's convert(), as before). ValueError for any other mode."""
    if img.mode in RGB_MODES:
        return img.convert("RGB")
    if img.mode == "F":
        if img.getextrema()[1] <= 1:
            img = img.point(lambda v: v * 255 + 0.5)  # + 0.5: convert() truncates
        return img.convert("RGB")
    if img.mode == "I":
        low, high = img.getextrema()
        if low < 0 or high > 65535:
            raise ValueError("PIL mode 'I' with values outside 0..65535 is not supported (convert it to RGB)")
    if img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)).convert("RGB")
    raise ValueError(f"PIL mode {img.mode!r} is not supported (convert it to RGB)")


def open_image(path: str, image_aspect_ratio: str = "square") -> Image.Image:
    """Open an image as RGB (train.py L697), its size checked from the header before any pixel is decoded; ValueError
    naming the file if it is missing, unreadable, too large for `image_aspect_ratio` or of an unsupported mode."""
    try:
        with Image.open(path) as img:  # lazy: reads the header only
            check_image_size(img.width, img.height, image_aspect_ratio)
            return to_rgb(img)
    except ValueError as e:  # ours (size, mode), or PIL's own for some damaged files
        raise ValueError(f"cannot read image {path}: {e}") from None
    except Image.DecompressionBombError as e:  # over 2 x Image.MAX_IMAGE_PIXELS: refused by Image.open itself
        raise ValueError(f"cannot read image {path}: {e} (downscale it)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... depending on the format and damage
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def process_image(img: Image.Image, processor: Any, image_aspect_ratio: str) -> torch.Tensor:
    """pad: expand2square with the processor's mean colour (122, 116, 104 for CLIP), then the processor; square: the
    processor alone (shortest edge resize + centre crop). Returns FloatTensor[3, H, W] (train.py L699-720)."""
    if image_aspect_ratio == "pad":
        img = expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(img, return_tensors="pt")["pixel_values"][0]


_DECODER = json.JSONDecoder()
WORDS_INVALID = -(2**31)  # RecordFile.words of a record without turns or words (named when lengths are read)


class RecordFile(Sequence):
    """The records of a LLaVA JSON list, compact: two numpy arrays (the records cache, built once per data file by
    load_records), each record's byte offset in the data file and its signed word count (LLaVA's modality
    lengths); a record is read from the file (os.pread) and parsed when a sample is accessed. No Python object per
    record stays in memory, so a rank holds 12 bytes per sample instead of the parsed list, and forked DataLoader
    workers do not copy pages by touching reference counts. Indexing gives exactly json.load(data_path)[i]."""

    def __init__(self, path: str, offsets, words, flag: str = "--data_path") -> None:
        self.path, self.offsets, self.words, self.flag = path, offsets, words, flag  # flag: what errors name
        # Held open from the start (forked DataLoader workers share it): a file replaced by a new one (a rename, a
        # script writing a new file) leaves this run reading the one it started with.
        self._fd, self._pid = os.open(path, os.O_RDONLY), os.getpid()
        self._version = self._signature(self._fd)

    @staticmethod
    def _signature(fd: int) -> tuple[int, int, int]:
        st = os.fstat(fd)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, IndexError
        if self._pid != os.getpid():  # a spawned worker: its own fd, of the same file (pread is positionless)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        if self._signature(self._fd) != self._version:  # written over in place (cp onto it): the offsets are stale
            raise ValueError(f"{self.flag} {self.path}: the file changed while the run was reading it (written "
                             "over in place); put back the file the run started with")  # fmt: skip
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])  # the record, then a separator
        return _DECODER.raw_decode(os.pread(self._fd, end - start, start).decode())[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


def _signed_words(record: Any) -> int:
    try:
        n = word_count(record)
    except ValueError:
        return WORDS_INVALID
    return WORDS_INVALID if n == 0 else n if "image" in record else -n


def _scan_lines(data_path: str, text: str, flag: str) -> tuple[list[int], list[int]]:
    """_scan_records for JSON Lines (one record per line, blank lines skipped), as LLaVA-NeXT reads a .jsonl."""
    offsets, words, pos, end = [], [], 0, 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if line.strip():
            start = len(line) - len(line.lstrip())
            try:
                record, stop = _DECODER.raw_decode(line, start)
            except json.JSONDecodeError as e:
                raise ValueError(f"{flag} {data_path}: line {number} is not JSON ({e.msg}, column "
                                 f"{e.pos + 1})") from None  # fmt: skip
            if line[stop:].strip() or not isinstance(record, dict):
                raise ValueError(f"{flag} {data_path}: line {number} is not one JSON object (JSON Lines: one "
                                 "sample per line)")  # fmt: skip
            offsets.append(pos + start)
            words.append(_signed_words(record))
            end = pos + stop
        pos += len(line)
    if not offsets:
        raise ValueError(f"{flag} {data_path}: the file holds no samples")
    return [*offsets, end], words


def _scan_records(data_path: str, text: str, flag: str) -> tuple[list[int], list[int]]:
    """The records of the JSON list in `text` (JSON Lines for a .jsonl file), parsed one at a time (the parsed list
    is never held): the character offset where each record's JSON text starts, then where the last one ends; and
    their signed word counts."""
    if data_path.endswith(".jsonl"):
        return _scan_lines(data_path, text, flag)
    space, offsets, words = re.compile(r"\s*"), [], []
    pos = space.match(text).end()
    if text[pos : pos + 1] != "[":
        got = type(json.loads(text)).__name__  # a JSONDecodeError if it is not JSON at all
        raise ValueError(f"{flag} {data_path}: expected a JSON list of samples, got a {got}")
    pos = space.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        raise ValueError(f"{flag} {data_path}: the list holds no samples")
    while True:
        record, end = _DECODER.raw_decode(text, pos)
        offsets.append(pos)
        words.append(_signed_words(record))
        pos = space.match(text, end).end()
        if text[pos : pos + 1] == "]":
            break
        if text[pos : pos + 1] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = space.match(text, pos + 1).end()
    if space.match(text, pos + 1).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, pos + 1)
    return [*offsets, end], words


def _byte_offsets(text: str, chars: list[int]) -> list[int]:
    """Character offsets into `text` as byte offsets into its UTF-8 file."""
    if text.isascii():  # one byte per character
        return chars
    offsets, done, nbytes = [], 0, 0
    for c in chars:
        nbytes += len(text[done:c].encode())
        offsets.append(nbytes)
        done = c
    return offsets


def _index_file(data_path: str, flag: str) -> tuple[Any, Any]:
    """Read and scan the data file: (byte offsets, signed word counts) as numpy arrays; errors name `flag`."""
    try:
        with open(data_path, encoding="utf-8") as f:  # JSON is UTF-8 (RFC 8259), whatever the locale
            text = f.read()
        chars, words = _scan_records(data_path, text, flag)
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {data_path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}); save the file as UTF-8") from None  # fmt: skip
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {data_path}: cannot read JSON: {e}") from None
    return np.array(_byte_offsets(text, chars), dtype=np.int64), np.array(words, dtype=np.int32)


def load_records(data_path: str, flag: str = "--data_path") -> RecordFile:
    """The data file's records (a JSON list, as LLaVA's json.load at train.py L664; JSON Lines for a .jsonl, as
    LLaVA-NeXT's), from the records cache: built on first use by one process per machine (the others wait on a file
    lock), reused by every later run, rank, worker and check_data until the file changes (formats/records.py).
    The cache can never stop a run: a damaged entry is rebuilt, and where it cannot be written (a read-only home, a
    quota) the index is built in memory, with a note naming the cache folder. Errors name `flag` (the file's flag:
    --data_path, --eval_data_path)."""
    try:
        folder, size = records_cache_dir(data_path), os.path.getsize(data_path)
    except OSError as e:
        raise ValueError(f"{flag} {data_path}: cannot read JSON: {e}") from None
    if (cached := read_records_cache(folder, size)) is not None:
        return RecordFile(data_path, *cached, flag)
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        lock = open(folder + ".lock", "w")  # noqa: SIM115 (closed below)
    except OSError as e:
        return RecordFile(data_path, *_uncached(folder, data_path, flag, e), flag)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when a builder dies
        if (cached := read_records_cache(folder, size)) is None:
            cached = _index_file(data_path, flag)
            try:
                write_records_cache(folder, *cached)
            except OSError as e:
                _uncached(folder, data_path, flag, e, cached)
    return RecordFile(data_path, *cached, flag)


def _uncached(folder: str, data_path: str, flag: str, error: OSError, index=None):
    """The data file's index built in memory (or `index`, already built) when the cache folder cannot be written."""
    print(f"note: records cache {os.path.dirname(os.path.dirname(folder))} is not writable ({error.strerror}): "
          f"indexing {data_path} in memory for this run (set MINILLAVA_CACHE to a writable folder to keep it)",
          flush=True)  # fmt: skip
    return index if index is not None else _index_file(data_path, flag)


def word_count(record: Any) -> int:
    """Whitespace words over all turns, LLaVA's length proxy (train.py L675-690); ValueError without turns."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise ValueError("no 'conversations' list")
    return sum(len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))


def describe(i: int, record: Any, data_path: str) -> str:
    """How every data error names its sample: "sample 3 (id='x') of data.json"."""
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    return f"sample {i} (id={rid!r}) of {data_path}"


TOKENS_PER_WORD = 1.6  # LLM tokens per whitespace word, an upper estimate (no tokenizer at hand)
TEMPLATE_TOKENS = 64  # the template's system prompt and role tokens, an upper estimate


def longest_samples(records: RecordFile, count: int, *, tokenizer: Tokenizer | None, version: str, image_tokens: int,
                    max_len: int) -> list[int]:  # fmt: skip
    """LLM lengths (images expanded, truncated to max_len) of the `count` longest samples: the largest micro-batch
    the sampler can make holds no more. The candidates are the 4 x count longest by LLaVA's word lengths; each is
    tokenized with the run's template (no image is read), or, with no tokenizer, estimated from its words
    (TOKENS_PER_WORD, TEMPLATE_TOKENS). Samples that do not tokenize are left to the training loop to report."""
    words = np.where(records.words == WORDS_INVALID, 0, np.abs(records.words.astype(np.int64)))
    has_image = records.words > 0
    order = np.argsort(-(words + IMAGE_LENGTH * has_image), kind="stable")[: 4 * count]
    out = []
    for i in order.tolist():
        n = int(has_image[i]) * image_tokens + int(words[i] * TOKENS_PER_WORD) + TEMPLATE_TOKENS
        if tokenizer is not None:
            try:
                ids, _ = preprocess(records[i]["conversations"], tokenizer, version, bool(has_image[i]))
            except (TokenizationMismatch, ValueError, KeyError, TypeError):
                continue
            n = len(ids) + sum(t == IMAGE_TOKEN_INDEX for t in ids) * (image_tokens - 1)
        out.append(min(n, max_len))
    return sorted(out, reverse=True)[:count]


class LazySupervisedDataset(Dataset):
    """LLaVA's LazySupervisedDataset (train.py L658-739): the JSON list in memory, each sample processed on access.

    __getitem__ -> input_ids, labels (LongTensor[T], truncated to model_max_length), pixel_values
    (FloatTensor[3, H, W]; zeros of the processor's crop size for text-only samples, as LLaVA L733-735) and
    lost_labels (the label tokens truncation cut, image expansion counted: a 0-d LongTensor)."""

    def __init__(
        self,
        data_path: str,
        tokenizer: Tokenizer,
        image_processor: Any,
        *,
        image_folder: str | None,
        version: str,
        image_aspect_ratio: str = "square",
        model_max_length: int = 2048,
        is_multimodal: bool = True,
        image_tokens: int = 1,
        data_flag: str = "--data_path",  # the flag file errors name (--eval_data_path for the validation set)
    ) -> None:
        get_template(version)  # an unknown --version fails here, not in a DataLoader worker
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"--image_aspect_ratio {image_aspect_ratio!r}: supported values are {ASPECT_RATIOS}")
        if is_multimodal and image_processor is None:
            raise ValueError("a multimodal dataset needs an image processor (--vision_tower)")
        self.records = load_records(data_path, data_flag)
        self.data_path, self.tokenizer, self.image_processor = data_path, tokenizer, image_processor
        self.image_folder, self.version, self.image_aspect_ratio = image_folder, version, image_aspect_ratio
        self.model_max_length, self.is_multimodal = model_max_length, is_multimodal
        self.image_tokens = image_tokens  # LLM positions one <image> becomes (576 for CLIP-L/336); 1 counts text only
        # Per process: with DataLoader workers each worker counts its own samples (the warnings name them all, once).
        self.num_fully_masked, self._warned = 0, set()

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def modality_lengths(self) -> list[int]:
        """Word count per sample, positive with an image, negative without (train.py L683-690), counted once when
        the records cache was built; the first invalid sample is named."""
        words = self.records.words
        invalid = (words == WORDS_INVALID).nonzero()[0]
        if len(invalid):
            i = int(invalid[0])
            record, where = self.records[i], describe(i, self.records[i], self.data_path)
            try:
                word_count(record)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            # zero words: its sign could not carry the modality; LLaVA's sampler asserts on it
            raise ValueError(f"{where}: the sample has zero words")
        return words.tolist()

    @property
    def lengths(self) -> list[int]:
        """Word count plus 128 for samples with an image (train.py L675-681)."""
        return [abs(n) + (IMAGE_LENGTH if n > 0 else 0) for n in self.modality_lengths]

    def load_image(self, i: int) -> torch.Tensor:
        """Sample i's image as processed pixel values, FloatTensor[3, H, W]."""
        record, where = self.records[i], describe(i, self.records[i], self.data_path)
        if not isinstance(record["image"], str) or self.image_folder is None:
            raise ValueError(f"{where}: 'image' must be a path relative to --image_folder, got {record['image']!r}")
        try:
            img = open_image(os.path.join(self.image_folder, record["image"]), self.image_aspect_ratio)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return process_image(img, self.image_processor, self.image_aspect_ratio)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        where = describe(i, record, self.data_path)
        if not isinstance(record, dict) or "conversations" not in record:
            raise ValueError(f"{where}: no 'conversations' list")
        has_image = "image" in record
        if has_image and not self.is_multimodal:
            raise ValueError(f"{where}: the sample has an image but the run has no vision tower")
        reason = f"all its answers lie beyond model_max_length={self.model_max_length}"
        try:
            input_ids, labels = preprocess(record["conversations"], self.tokenizer, self.version, has_image)
        except TokenizationMismatch as e:
            # LLaVA masks such a sample and trains on it: "tokenization mismatch ... (ignored)" (train.py L482-490).
            input_ids, labels, reason = e.input_ids, [IGNORE_INDEX] * len(e.input_ids), str(e)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        # LLaVA truncates text-only samples here and every sample in the collator: the same ids either way, but
        # per sample we can see the ones left without a single supervised token.
        full = supervised_tokens(torch.tensor(input_ids), torch.tensor(labels), self.image_tokens, sys.maxsize)
        input_ids, labels = input_ids[: self.model_max_length], labels[: self.model_max_length]
        out = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        kept = supervised_tokens(out["input_ids"], out["labels"], self.image_tokens, self.model_max_length)
        out["lost_labels"] = torch.tensor(full - kept)  # label tokens truncation cut (logged per step)
        if kept == 0:
            if any(t != IGNORE_INDEX for t in labels[1:]):  # the text fits; its image tokens push the answers out
                reason = (f"its {self.image_tokens} image tokens push all its answers past "
                          f"model_max_length={self.model_max_length}")  # fmt: skip
            if i not in self._warned:
                self._warned.add(i)
                self.num_fully_masked += 1
                logger.warning("%s: skipped: no supervised tokens (%s); it adds no loss and no token count", where,
                               reason)  # fmt: skip
        if has_image:
            out["pixel_values"] = self.load_image(i)
        elif self.is_multimodal:
            out["pixel_values"] = torch.zeros(3, *processor_size(self.image_processor))  # LLaVA's zero image
        return out


class EvalSamples(Dataset):
    """A validation set read through sampler.eval_batches' indices: PAD_SAMPLE is sample 0 with every label masked
    (it keeps a rank that ran out of samples in step with the others, adding no loss and no token)."""

    def __init__(self, dataset: LazySupervisedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i != PAD_SAMPLE:
            return self.dataset[i]
        out = self.dataset[0]
        return {**out, "labels": torch.full_like(out["labels"], IGNORE_INDEX), "lost_labels": torch.tensor(0)}


@dataclass
class DataCollator:
    """Right-pad samples into a batch (DataCollatorForSupervisedDataset, train.py L742-773).

    Deliberate deviation: LLaVA's attention mask is `input_ids != pad` with pad = unk = 0, which also hides every
    real <unk> in the content (and the model's splice then drops it). Ours comes from the true lengths."""

    pad_token_id: int
    model_max_length: int

    def __call__(self, instances: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Truncating before padding gives the same tensors as LLaVA's pad-then-truncate.
        ids = [x["input_ids"][: self.model_max_length] for x in instances]
        labels = [x["labels"][: self.model_max_length] for x in instances]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)  # (B, T)
        lengths = torch.tensor([len(x) for x in ids])
        batch = {
            "input_ids": input_ids,
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
            "attention_mask": torch.arange(input_ids.shape[1])[None, :] < lengths[:, None],
        }
        if "pixel_values" in instances[0]:
            batch["pixel_values"] = torch.stack([x["pixel_values"] for x in instances])  # (B, 3, H, W)
        if "lost_labels" in instances[0]:  # the dataset's count of label tokens truncation cut, for logging
            batch["lost_labels"] = torch.stack([x["lost_labels"] for x in instances]).sum()
        return batch


class _HarmlessNotes(logging.Filter):
    """transformers log lines that say nothing wrong here, dropped where they are logged: a LLaVA folder's
    config.json read for its tokenizer ("a model of type llava_llama to instantiate a model of type ..."), and a
    sample longer than model_max_length (truncated after its labels are placed, and counted: LazySupervisedDataset)."""

    KNOWN = ("You are using a model of type `llava", "Token indices sequence length is longer than")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.KNOWN)


def _quiet_transformers_notes() -> None:
    for name in ("transformers.configuration_utils", "transformers.tokenization_utils_base"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _HarmlessNotes) for f in log.filters):
            log.addFilter(_HarmlessNotes())


def load_tokenizer(path: str, model_max_length: int) -> Any:
    """The tokenizer as LLaVA sets it up for plain/v1 (train.py L878-908): right padding, pad = unk (or, for a
    vocabulary without one, backbones.pad_token's choice)."""
    from transformers import AutoTokenizer

    _quiet_transformers_notes()
    # LLaVA asked for the slow SentencePiece class (use_fast=False); transformers 5 has one Llama tokenizer, which
    # gives Vicuna's ids when the folder's tokenizer_config.json says legacy=false. So
    # `legacy` is taken from the folder, never overridden.
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=model_max_length, padding_side="right")
    tokenizer.pad_token = pad_token(tokenizer)
    return tokenizer


def load_image_processor(path: str) -> Any:
    """The PIL-backed processor of a local vision tower folder, CLIP's or SigLIP's by its config.json (measured
    bit-identical to LLaVA's; the torchvision-backed default differs by up to 0.03 on non-square images); CLIP's for
    a folder that is not a tower (a llava-hf folder)."""
    from transformers.models.clip import CLIPImageProcessorPil

    try:
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type in TOWER_TYPES:
        return image_processor(path, model_type)
    return CLIPImageProcessorPil.from_pretrained(path)
