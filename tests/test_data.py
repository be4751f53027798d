"""Dataset, image preprocessing, collator and loaders (minillava/data.py) against LLaVA-1.5's train.py L658-908."""

import json
import logging
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import draw_shape, write_png_header
from PIL import Image

from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.conversation import preprocess
from minillava.data import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    DataCollator,
    LazySupervisedDataset,
    check_image_size,
    expand2square,
    load_image_processor,
    load_tokenizer,
    open_image,
    process_image,
    to_rgb,
)

CLIP_MEAN_RGB = (122, 116, 104)  # tuple(int(x * 255) for x in OpenAI CLIP's image_mean), train.py expand2square


def H(v):
    return {"from": "human", "value": v}


def G(v):
    return {"from": "gpt", "value": v}


def make_dataset(tmp_path, records, tokenizer, image_processor, **kw):
    """Write `records` (plus one red 40x30 image, img.png) and build a dataset over them."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(folder / "img.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    kw = {"image_folder": str(folder), "version": "v1", **kw}
    return LazySupervisedDataset(str(path), tokenizer, image_processor, **kw)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(("size", "offset"), [((40, 30), (0, 5)), ((30, 40), (5, 0)), ((41, 30), (0, 5))])
def test_expand2square_centres_on_background(size, offset):
    img = Image.new("RGB", size, (255, 0, 0))
    out = expand2square(img, CLIP_MEAN_RGB)
    side = max(size)
    assert out.size == (side, side) and out.mode == "RGB"
    ox, oy = offset
    w, h = size
    assert out.getpixel((ox, oy)) == (255, 0, 0) and out.getpixel((ox + w - 1, oy + h - 1)) == (255, 0, 0)
    assert out.getpixel((0, 0)) == CLIP_MEAN_RGB and out.getpixel((side - 1, side - 1)) == CLIP_MEAN_RGB
    # The band before the image is exactly the offset wide; the rest of the padding comes after (41-30 = 5 + 6).
    assert out.getpixel((ox - 1, oy) if ox else (ox, oy - 1)) == CLIP_MEAN_RGB
    assert out.getpixel((ox + w, oy) if ox else (ox, oy + h)) == CLIP_MEAN_RGB
    assert out.crop((ox, oy, ox + w, oy + h)).tobytes() == img.tobytes()


def test_expand2square_square_input_unchanged():
    img = Image.new("RGB", (28, 28), "blue")
    assert expand2square(img, CLIP_MEAN_RGB) is img


def test_process_image_pad_and_square(image_processor):
    img = draw_shape("red", "circle", size=(40, 30))
    assert tuple(int(x * 255) for x in image_processor.image_mean) == CLIP_MEAN_RGB
    pad = process_image(img, image_processor, "pad")
    assert pad.shape == (3, 28, 28) and pad.dtype == torch.float32
    expected = image_processor.preprocess(expand2square(img, CLIP_MEAN_RGB), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pad, expected)
    # The padding band (top rows of a wide image) normalises to ~0: the background is the mean colour.
    assert pad[:, 0, :].abs().max() < 0.02
    square = process_image(img, image_processor, "square")
    assert torch.equal(square, image_processor.preprocess(img, return_tensors="pt")["pixel_values"][0])
    assert not torch.equal(square, pad)
    # square = shortest edge to 28 then a centre crop: no mean-colour band, the white background reaches the top row.
    assert square[:, 0, :].min() > 1.5


def test_load_image_processor_roundtrip(tmp_path, image_processor):
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor.save_pretrained(tmp_path)
    loaded = load_image_processor(str(tmp_path))
    assert isinstance(loaded, CLIPImageProcessorPil)
    img = draw_shape("blue", "triangle", size=(30, 44))
    assert torch.equal(process_image(img, loaded, "pad"), process_image(img, image_processor, "pad"))


# ---------------------------------------------------------------- image files: PIL modes, size bounds

LEVELS = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)  # 16 grey levels, 0..255
DEEP = np.array([[0, 255, 256, 32767, 32768, 65279, 65280, 65535]])  # 16-bit values: their high byte is the 8-bit one


@pytest.mark.parametrize(
    ("name", "pixels", "mode", "expected"),
    [
        ("levels.png", LEVELS.astype(np.uint16) * 257, "I;16", LEVELS),  # 16-bit greyscale PNG
        ("deep.png", DEEP.astype(np.uint16), "I;16", DEEP >> 8),
        ("deep.tif", DEEP.astype(">u2"), "I;16B", DEEP >> 8),
        ("deep.pgm", DEEP.astype(np.uint16), "I", DEEP >> 8),  # Pillow decodes 16-bit PGM to I, 0..65535
        ("deep32.tif", DEEP.astype(np.int32), "I", DEEP >> 8),
        ("unit.tif", LEVELS.astype(np.float32) / 255, "F", LEVELS),  # floats in 0..1
    ],
)
def test_deep_greyscale_is_scaled_not_clipped(tmp_path, name, pixels, mode, expected):
    """convert("RGB") clips every value over 255 to white (and floats in 0..1 to black): these keep their levels."""
    Image.fromarray(pixels).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    img = open_image(str(tmp_path / name))
    assert img.mode == "RGB" and img.tobytes() == Image.fromarray(expected.astype(np.uint8)).convert("RGB").tobytes()


def save_as(mode, path, **kw):
    """A drawn RGB picture in PIL mode `mode`, saved to `path`."""
    img = draw_shape("red", "circle", size=(20, 12))
    if mode == "P+transparency":  # palette with a transparent index, as many web GIFs and PNGs have
        img, kw = img.convert("P"), {**kw, "transparency": 0}
    elif mode == "F":  # floats in 0..255: PIL's convert() as before
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) + 0.6)
    elif mode == "frames":  # first frame, as Image.open gives it
        img, kw = img.convert("P"), {**kw, "save_all": True, "append_images": [Image.new("P", img.size, 3)]}
    else:
        img = img.convert(mode)
    img.save(path, **kw)


@pytest.mark.parametrize(
    ("mode", "name"),
    [("1", "a.png"), ("L", "a.png"), ("P", "a.png"), ("P+transparency", "a.png"), ("RGB", "a.jpg"),
     ("RGBA", "a.png"), ("LA", "a.png"), ("PA", "a.tif"), ("CMYK", "a.jpg"), ("YCbCr", "a.tif"), ("LAB", "a.tif"),
     ("F", "a.tif"), ("frames", "a.gif"), ("frames", "a.tif")],
)  # fmt: skip
def test_other_modes_are_llava_convert_rgb(tmp_path, mode, name):
    """Fidelity: every mode LLaVA's convert("RGB") (train.py L697) handles sensibly gives exactly its pixels."""
    path = tmp_path / name
    save_as(mode, path)
    assert open_image(str(path)).tobytes() == Image.open(path).convert("RGB").tobytes()


def test_unsupported_modes_are_rejected_by_name(tmp_path):
    for name, values in (("big.tif", [[0, 70000]]), ("signed.tif", [[-1, 5]])):  # 32-bit data, no one 8-bit scale
        Image.fromarray(np.array(values, dtype=np.int32)).save(tmp_path / name)
        with pytest.raises(ValueError, match=rf"^cannot read image .*{name}: PIL mode 'I' with values outside 0..65535 "
                                             r"is not supported \(convert it to RGB\)$"):  # fmt: skip
            open_image(str(tmp_path / name))
    with pytest.raises(ValueError, match=r"^PIL mode 'La' is not supported \(convert it to RGB\)$"):
        to_rgb(Image.new("La", (4, 4)))  # premultiplied grey + alpha: convert("RGB") raises
    for mode in ("HSV", "RGBa", "RGBX"):  # in-memory modes convert() handles: as it does
        img = Image.new(mode, (2, 2), (200, 100, 50, 128) if mode != "HSV" else (10, 200, 100))
        assert to_rgb(img).tobytes() == img.convert("RGB").tobytes()


def test_size_bounds_are_checked_from_the_header(tmp_path):
    """Extreme sizes are refused from the header alone (each file here decodes as truncated), naming size and limit;
    under pad the square canvas counts, under square the shortest-edge resize (bounded by the aspect ratio)."""
    for size in ((640, 480), (4000, 1000), (6000, 4000), (1080, 8192), (1000, 10)):  # COCO, panorama, camera, ...
        for aspect in ("pad", "square"):
            check_image_size(*size, aspect)
    cases = [
        ((30000, 8), "square", rf"30000x8 has aspect ratio 3750:1, over the limit of {MAX_ASPECT_RATIO}:1 \(crop it\)"),
        ((30000, 8), "pad", "30000x8 has aspect ratio 3750:1"),
        ((10, 100000), "pad", "10x100000 has aspect ratio 10000:1"),
        ((1011, 10), "square", "1011x10 has aspect ratio 101.1:1"),
        ((8193, 8000), "pad", rf"8193x8000 pads to 8193x8193 = 67,125,249 pixels, over the limit of "
                              rf"{MAX_IMAGE_PIXELS:,} \(downscale it\)"),
        ((9000, 8000), "square", "9000x8000 = 72,000,000 pixels, over the limit"),
    ]  # fmt: skip
    for (w, h), aspect, match in cases:
        write_png_header(tmp_path / "big.png", w, h)
        with pytest.raises(ValueError, match=rf"^cannot read image .*big.png: {match}"):
            open_image(str(tmp_path / "big.png"), aspect)
    write_png_header(tmp_path / "big.png", 8193, 8000)  # within the bounds under square: decoded, found truncated
    with pytest.raises(ValueError, match="truncated"):
        open_image(str(tmp_path / "big.png"), "square")


def test_decompression_bombs_get_the_same_error(tmp_path):
    """PIL warns above Image.MAX_IMAGE_PIXELS (below it, our own bound refuses the image) and refuses twice that."""
    write_png_header(tmp_path / "bomb.png", 10000, 9000)
    over = r"^cannot read image .*bomb.png: 10000x9000 = 90,000,000 pixels, over the limit"
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match=over):
        open_image(str(tmp_path / "bomb.png"))
    write_png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"^cannot read image .*bomb.png: Image size \(400000000 pixels\) exceeds "
                                         r"limit .*\(downscale it\)$"):  # fmt: skip
        open_image(str(tmp_path / "bomb.png"))


# ---------------------------------------------------------------- tokenizer setup


def test_load_tokenizer_llava_setup_and_legacy_false(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, model_max_length=77)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert tok.padding_side == "right" and tok.model_max_length == 77 and tok.legacy is False
    tokens = tok.convert_ids_to_tokens(tok("A chat. USER: hi ASSISTANT: The red.</s>USER: hi").input_ids)
    # Vicuna's ids (legacy=False): word-prefix '▁' at the start, none right after </s>.
    assert tokens[:3] == ["<s>", "▁A", "▁chat"] and tokens[3:6] == [".", "▁USER", ":"]
    assert tokens[tokens.index("</s>") + 1] == "USER"
    assert "▁The" in tokens  # the answer's leading space lives in its first token


def test_load_tokenizer_honours_legacy_true(tokenizer_dir, tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    tok = load_tokenizer(str(folder), model_max_length=2048)
    assert tok.legacy is True
    tokens = tok.convert_ids_to_tokens(tok("hi.</s>USER: hi").input_ids)
    assert tokens[tokens.index("</s>") + 1] == "▁USER"


# ---------------------------------------------------------------- dataset


def test_dataset_items(llava_data, tokenizer, image_processor):
    json_path, folder = llava_data
    ds = LazySupervisedDataset(json_path, tokenizer, image_processor, image_folder=folder, version="v1")
    with open(json_path) as f:
        records = json.load(f)
    assert len(ds) == len(records) == 8
    for i, rec in enumerate(records):
        item = ds[i]
        assert set(item) == {"input_ids", "labels", "pixel_values", "lost_labels"} and item["lost_labels"] == 0
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["pixel_values"].shape == (3, 28, 28) and item["pixel_values"].dtype == torch.float32
        ids, labels = preprocess(rec["conversations"], tokenizer, "v1", "image" in rec)
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        if "image" in rec:
            assert ids.count(IMAGE_TOKEN_INDEX) == 1
            expected = process_image(Image.open(f"{folder}/{rec['image']}").convert("RGB"), image_processor, "square")
            assert torch.equal(item["pixel_values"], expected)
        else:
            assert IMAGE_TOKEN_INDEX not in ids and not item["pixel_values"].any()  # zero image of crop size
    answer = tokenizer.decode([t for t in ds[0]["labels"].tolist() if t != IGNORE_INDEX])
    assert answer == "The shape is red.</s>"
    assert ds.num_fully_masked == 0


def test_dataset_pad_matches_expand2square(llava_data, tokenizer, image_processor):
    json_path, folder = llava_data
    kw = {"image_folder": folder, "image_aspect_ratio": "pad"}
    ds = LazySupervisedDataset(json_path, tokenizer, image_processor, version="v1", **kw)
    img = Image.open(f"{folder}/img_3.png").convert("RGB")
    expected = image_processor.preprocess(expand2square(img, CLIP_MEAN_RGB), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ds[3]["pixel_values"], expected)
    item = LazySupervisedDataset(json_path, tokenizer, image_processor, version="plain", **kw)[
        0
    ]  # plain: [BOS, -200, caption..., "\n"]; the question and the second round are gone
    assert item["input_ids"][:2].tolist() == [1, IMAGE_TOKEN_INDEX] and item["input_ids"][-1] == 13
    assert tokenizer.decode(item["labels"][2:]) == "The shape is red.\n"


def test_lengths_and_modality_lengths(llava_data, tokenizer, image_processor):
    json_path, folder = llava_data
    ds = LazySupervisedDataset(json_path, tokenizer, image_processor, image_folder=folder, version="v1")
    with open(json_path) as f:
        records = json.load(f)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    assert ds.modality_lengths == [w if "image" in r else -w for w, r in zip(words, records, strict=True)]
    assert ds.lengths == [w + (128 if "image" in r else 0) for w, r in zip(words, records, strict=True)]
    assert ds.modality_lengths[0] == 12 and ds.lengths[0] == 140  # "<image>\nWhat" is two words, as in LLaVA
    assert ds.modality_lengths[-1] < 0


def test_truncation_and_fully_masked_report(tmp_path, tokenizer, image_processor, caplog):
    records = [
        {"id": "long-q", "conversations": [H("What is the colour of the shape? " * 20), G("Red.")]},
        {"id": "ok", "conversations": [H("Hi?"), G("Yes.")]},
        {"id": "cap", "image": "img.png", "conversations": [H("<image>\nDescribe."), G("A red shape on white.")]},
    ]
    ds = make_dataset(tmp_path, records, tokenizer, image_processor, model_max_length=60)
    with caplog.at_level(logging.WARNING, logger="minillava.data"):
        long_item, ok_item = ds[0], ds[1]
    assert long_item["input_ids"].shape == (60,) and (long_item["labels"] == IGNORE_INDEX).all()
    assert ds.num_fully_masked == 1 and "'long-q'" in caplog.text and "model_max_length=60" in caplog.text
    assert tokenizer.decode(ok_item["labels"][ok_item["labels"] != IGNORE_INDEX]) == "Yes.</s>"
    # plain: a caption cut to nothing leaves only [BOS, -200]
    plain = make_dataset(tmp_path, records[2:], tokenizer, image_processor, version="plain", model_max_length=2)
    with caplog.at_level(logging.WARNING, logger="minillava.data"):
        item = plain[0]
    assert item["input_ids"].tolist() == [1, IMAGE_TOKEN_INDEX] and plain.num_fully_masked == 1
    assert "'cap'" in caplog.text


class ColonMergingTokenizer:
    """Fuses ": " into one token, so answer boundaries fall inside a token (the fake of test_conversation.py)."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 0, 0

    def __call__(self, text, add_special_tokens=True):
        ids, i = ([1] if add_special_tokens else []), 0
        while i < len(text):
            step = 4 if text.startswith("</s>", i) else 2 if text.startswith(": ", i) else 1
            ids.append(2 if step == 4 else 3 if step == 2 else ord(text[i]) + 10)
            i += step
        return SimpleNamespace(input_ids=ids)


def test_tokenization_mismatch_is_masked_and_reported(tmp_path, caplog):
    records = [{"id": "mm", "conversations": [H("Hi?"), G("Yes.")]}]
    ds = make_dataset(tmp_path, records, ColonMergingTokenizer(), None, is_multimodal=False)
    with caplog.at_level(logging.WARNING, logger="minillava.data"):
        item = ds[0]
    assert "pixel_values" not in item and len(item["input_ids"]) > 0 and (item["labels"] == IGNORE_INDEX).all()
    assert ds.num_fully_masked == 1 and "'mm'" in caplog.text and "tokenization mismatch" in caplog.text


# ---------------------------------------------------------------- bad input: ValueError naming index, id and file

GOOD = {"id": "good", "conversations": [H("Hi?"), G("Yes.")]}


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"id": "noimg", "image": "missing.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "missing.png"),
        ({"id": "corrupt", "image": "bad.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "cannot read image"),
        ({"id": "noconv", "image": "img.png"}, "no 'conversations'"),
        ({"id": "alt", "conversations": [H("Hi?"), H("Hi again?"), G("Yes.")]}, "alternate"),
        ({"id": "tok", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "no 'image' key"),
        ({"id": "notok", "image": "img.png", "conversations": [H("Hi?"), G("Yes.")]}, "exactly one <image>"),
        ({"id": "path", "image": ["img.png"], "conversations": [H("<image>\nHi?"), G("Yes.")]}, "relative to"),
        ({"id": "wide", "image": "wide.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "30000x8 has aspect"),
        ({"id": "deep", "image": "deep.tif", "conversations": [H("<image>\nHi?"), G("Yes.")]}, "PIL mode 'I'"),
    ],
)
def test_bad_records_name_index_id_and_file(tmp_path, tokenizer, image_processor, record, match):
    ds = make_dataset(tmp_path, [GOOD, record], tokenizer, image_processor)
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write_png_header(tmp_path / "images" / "wide.png", 30000, 8)
    Image.fromarray(np.array([[0, 1 << 20]], dtype=np.int32)).save(tmp_path / "images" / "deep.tif")
    ds[0]
    with pytest.raises(ValueError, match=match) as err:
        ds[1]
    assert f"sample 1 (id={record['id']!r})" in str(err.value) and str(tmp_path / "data.json") in str(err.value)


def test_zero_word_and_missing_conversations_fail_lengths(tmp_path, tokenizer, image_processor):
    empty = {"id": "empty", "conversations": [H(" "), G("\n")]}
    ds = make_dataset(tmp_path, [GOOD, empty], tokenizer, image_processor)
    with pytest.raises(ValueError, match=r"sample 1 \(id='empty'\) of .*data.json: the sample has zero words"):
        _ = ds.lengths
    ds = make_dataset(tmp_path, [{"id": "x", "turns": []}, GOOD], tokenizer, image_processor)
    with pytest.raises(ValueError, match=r"sample 0 \(id='x'\).*no 'conversations'"):
        _ = ds.modality_lengths


def test_bad_dataset_arguments(tmp_path, tokenizer, image_processor):
    (tmp_path / "dict.json").write_text(json.dumps({"conversations": []}))
    kw = {"image_folder": str(tmp_path), "version": "v1"}
    with pytest.raises(ValueError, match=r"--data_path .*dict.json: expected a JSON list"):
        LazySupervisedDataset(str(tmp_path / "dict.json"), tokenizer, image_processor, **kw)
    with pytest.raises(ValueError, match=r"--data_path .*nope.json"):
        LazySupervisedDataset(str(tmp_path / "nope.json"), tokenizer, image_processor, **kw)
    with pytest.raises(ValueError, match="--version 'v9'"):
        make_dataset(tmp_path, [GOOD], tokenizer, image_processor, version="v9")
    with pytest.raises(ValueError, match="--image_aspect_ratio 'anyres'"):
        make_dataset(tmp_path, [GOOD], tokenizer, image_processor, image_aspect_ratio="anyres")
    record = {"id": "img", "image": "img.png", "conversations": [H("<image>\nHi?"), G("Yes.")]}
    ds = make_dataset(tmp_path, [record], tokenizer, None, is_multimodal=False)
    with pytest.raises(ValueError, match="no vision tower"):
        ds[0]


# ---------------------------------------------------------------- collator


def test_collator_pads_truncates_and_masks_by_length():
    def item(ids, labels):
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": torch.ones(3, 4, 4)}

    # The second sample holds a real <unk> (id 0 == pad): LLaVA's `ids != pad` mask would hide it; ours does not.
    batch = DataCollator(pad_token_id=0, model_max_length=5)(
        [item([1, 5, 6], [-100, 5, 6]), item([1, 0, 7, 8, 9, 10, 11], [-100, -100, 7, 8, 9, 10, 11])]
    )
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 0, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 7, 8, 9]]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    short = DataCollator(0, 2048)([item([1, 5], [-100, 5])])
    assert short["input_ids"].shape == (1, 2) and short["attention_mask"].all()


def test_collator_with_dataloader_and_pickle(llava_data, tokenizer, image_processor):
    json_path, folder = llava_data
    ds = LazySupervisedDataset(json_path, tokenizer, image_processor, image_folder=folder, version="v1")
    collator = pickle.loads(pickle.dumps(DataCollator(tokenizer.pad_token_id or 0, 2048)))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collator))
    assert len(batches) == 2
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["pixel_values"].shape == (4, 3, 28, 28)
        assert b["input_ids"].shape[1] == lengths.max()
        for row, n in enumerate(lengths.tolist()):
            assert (b["input_ids"][row, n:] == 0).all() and (b["labels"][row, n:] == IGNORE_INDEX).all()
    assert (batches[1]["pixel_values"][2:] == 0).all()  # the two text-only samples at the end


def test_text_only_run_has_no_pixel_values(tmp_path, tokenizer):
    ds = make_dataset(tmp_path, [GOOD, GOOD], tokenizer, None, is_multimodal=False)
    batch = DataCollator(0, 2048)([ds[0], ds[1]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2


def test_image_tokens_that_push_the_answer_out_are_a_named_counted_skip(tmp_path, tokenizer, image_processor, caplog):
    """The text fits model_max_length, but its image's P positions push the answer past it: LLaVA would train on
    it with no label token and no word. The dataset names it once (a skip: no loss, no token count) and counts it."""
    records = [{"id": "pushed", "image": "img.png", "conversations": [H("<image>\nWhat colour?"), G("Red.")]}]
    ds = make_dataset(tmp_path, records, tokenizer, image_processor, model_max_length=200, image_tokens=190)
    with caplog.at_level(logging.WARNING, logger="minillava.data"):
        ds[0], ds[0]
    assert ds.num_fully_masked == 1 and caplog.text.count("'pushed'") == 1
    assert "skipped" in caplog.text
    assert "its 190 image tokens push all its answers past model_max_length=200" in caplog.text
    assert len(ds[0]["input_ids"]) < 200  # the text alone fits
    fits = make_dataset(tmp_path, records, tokenizer, image_processor, model_max_length=200, image_tokens=4)
    fits[0]
    assert fits.num_fully_masked == 0



def test_a_jsonl_data_file_trains_like_the_json_list(assets, tmp_path, capsys):
    """--data_path x.jsonl (LLaVA-NeXT's other format) gives the JSON list's losses; a malformed line stops the run
    before any model is built, in one line naming the file and the line."""
    from conftest import flags, losses

    import train

    with open(assets["data"]) as f:
        records = json.load(f)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = []
    for name, data_path in (("list", assets["data"]), ("lines", str(jsonl))):
        train.main(flags(assets, str(tmp_path / name), max_steps=2, logging_steps=1, data_path=data_path))
        runs.append(losses(str(tmp_path / name)))
    assert runs[0] == runs[1] and len(runs[0]) == 2
    jsonl.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:-1] + "\n")
    capsys.readouterr()
    assert train.cli(flags(assets, str(tmp_path / "bad"), data_path=str(jsonl))) == 1
    err = capsys.readouterr().err
    assert err == f"error: --data_path {jsonl}: line 2 is not JSON (Expecting ',' delimiter, column " \
                  f"{len(json.dumps(records[1])) + 1})\n"  # fmt: skip  (1-based: just past the cut)
