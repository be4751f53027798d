"""Hermetic fixtures: a Vicuna-style SentencePiece tokenizer trained in-process, a CLIP image processor, tiny
Llama/CLIP configs, PIL images and a LLaVA-format JSON. Nothing is downloaded (HF offline mode is forced)."""

import gc
import json
import os
import random
import struct
import tempfile
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub download fails fast instead of hanging
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MINILLAVA_CACHE", tempfile.mkdtemp(prefix="minillava-cache-"))  # records caches: not ~/.cache

import pytest
import torch

from minillava.demo import COLOURS, SHAPES, SYSTEM, WORDS, build_tokenizer_dir, draw_shape  # noqa: F401


def pytest_collection_finish(session):
    """With every test module imported: move what exists now (torch, transformers and the rest, about 360,000
    objects) out of the garbage collector's reach. train.main ends with a full gc.collect() (FSDP2's reference
    cycles); scanning those objects again cost about 0.3 s a run, in this process and in each rank."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _tf32_off():
    """train.main turns TF32 on for its whole process (LLaVA ran with --tf32 True), so a GPU test comparing fp32
    results after an in-process run would compare TF32 matmuls: every test starts with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def build_image_processor(size: int = 28):
    """The real transformers CLIP processor (PIL backend: bit-identical to LLaVA's pixels), at a tiny size."""
    from transformers.models.clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_llama_config(vocab_size: int = 512, **kw):
    from transformers import LlamaConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    args.update(kw)
    return LlamaConfig(**args)


FAMILIES = {  # tiny LLM configs with each family's quirks: (config class name, quirks)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=64, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v biases; no lm_head.weight on disk
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=16)),  # q/k norms; head_dim != hidden / heads
}


def tiny_family_config(family: str, vocab_size: int = 512):
    import transformers

    config_class, quirks = FAMILIES[family]
    return getattr(transformers, config_class)(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, pad_token_id=0, **quirks)  # fmt: skip


SIGLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                     patch_size=14)  # fmt: skip 2 x 2 = 4 patches, no CLS


def siglip_folder(root, whole: bool = False) -> str:
    """A SigLIP tower folder (a SiglipVisionModel, or a whole SiglipModel with its text half) with its processor."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip import SiglipImageProcessorPil

    torch.manual_seed(0)
    folder = os.path.join(root, "siglip_whole" if whole else "siglip")
    if whole:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
        SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP_VISION)).save_pretrained(folder)
    else:
        SiglipVisionModel(SiglipVisionConfig(**SIGLIP_VISION)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def tiny_clip_config(**kw):
    from transformers import CLIPVisionConfig

    args = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,  # 2x2 = 4 patches + CLS
        projection_dim=16,
    )
    args.update(kw)
    return CLIPVisionConfig(**args)


def write_llava_dataset(
    root: str, n_image: int = 6, n_text: int = 2, multi_turn: bool = True, name: str = "data.json"
) -> tuple[str, str]:
    """Write images and a LLaVA-format JSON list (image and text-only samples; every odd image sample has a second
    turn unless multi_turn=False, which with n_text=0 gives plain/pretrain data). Returns (json_path, image_folder)."""
    r = random.Random(1)
    image_folder = os.path.join(root, "images")
    os.makedirs(image_folder, exist_ok=True)
    records = []
    for i in range(n_image):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        image_name = f"img_{i}.png"
        draw_shape(colour, shape, size=(40 + 4 * i, 30)).save(os.path.join(image_folder, image_name))
        convs = [
            {"from": "human", "value": "<image>\nWhat is the colour of the shape?"},
            {"from": "gpt", "value": f"The shape is {colour}."},
        ]
        if multi_turn and i % 2:
            convs += [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": f"A {shape}."}]
        records.append({"id": f"img-{i}", "image": image_name, "conversations": convs})
    for i in range(n_text):
        q = " ".join(r.choice(WORDS) for _ in range(5))
        records.append(
            {
                "id": f"text-{i}",
                "conversations": [{"from": "human", "value": q + "?"}, {"from": "gpt", "value": "Yes, it is."}],
            }
        )
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path, image_folder


def write_png_header(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (8-bit RGB) over a few bytes of pixel data: Image.open reads the size
    (it is lazy) and verify() passes, but decoding fails as truncated. A size bound must reject it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer_dir(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """Loaded exactly as a user loads Vicuna's folder (train.py uses the same call)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=2048, padding_side="right")


@pytest.fixture(scope="session")
def image_processor():
    return build_image_processor()


@pytest.fixture
def llava_data(tmp_path):
    """(json_path, image_folder) of a small LLaVA-format dataset with 6 image and 2 text-only samples."""
    return write_llava_dataset(str(tmp_path / "data"))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Local HF folders as a user has them: a Vicuna-like LLM folder (weights + tokenizer), a CLIP folder (weights +
    preprocessor config), and a LLaVA-format dataset with image and text-only samples."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("assets")
    llm_dir, clip_dir = str(root / "llm"), str(root / "clip")
    build_tokenizer_dir(llm_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(llm_dir)
    CLIPVisionModel(tiny_clip_config()).save_pretrained(clip_dir)
    build_image_processor().save_pretrained(clip_dir)
    data, images = write_llava_dataset(str(root / "data"), n_image=12, n_text=4)
    pretrain, _ = write_llava_dataset(str(root / "data"), n_image=12, n_text=0, multi_turn=False, name="pretrain.json")
    return {"llm": llm_dir, "clip": clip_dir, "data": data, "pretrain": pretrain, "images": images, "root": root}


def flags(assets, out, stage=2, **over):
    """train.py argv for a tiny run on `assets` (stage 2: a random projector unless an adapter is given)."""
    base = {
        "model_name_or_path": assets["llm"],
        "vision_tower": assets["clip"],
        "data_path": assets["data"] if stage == 2 else assets["pretrain"],
        "image_folder": assets["images"],
        "output_dir": out,
        "bf16": "False",
        "per_device_train_batch_size": "2",
        "gradient_accumulation_steps": "1",
        "max_steps": "3",
        "learning_rate": "1e-3",
        "report_to": "none",
        "dataloader_num_workers": "0",
        "model_max_length": "64",
    }
    if stage == 2 and "pretrain_mm_mlp_adapter" not in over:
        base.update(init_projector="random")
    base.update({k: str(v) for k, v in over.items()})
    argv = ["--stage", str(stage)]
    for k, v in base.items():
        argv += [f"--{k}", v]
    return argv


def losses(out):
    """The logged losses of a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def build_llava(llm_config, vision_config, **kw):
    """build_llava_from_config with LlavaSettings fields as keywords too (mm_vision_select_layer=..., ...)."""
    from dataclasses import fields

    from minillava.model import LlavaSettings, build_llava_from_config

    names = {f.name for f in fields(LlavaSettings)}
    settings = LlavaSettings(**{k: v for k, v in kw.items() if k in names})
    options = {k: v for k, v in kw.items() if k not in names}  # dtype, attn_implementation, padding_free, ...
    return build_llava_from_config(llm_config, vision_config, settings, **options)


def build_llava_from_pretrained(llm_dir: str, clip_dir: str, *, dtype=torch.float32, **kw):
    """The reference build: transformers' own from_pretrained of two local folders, then LlavaModel around them."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from minillava.model import LlavaModel, LlavaSettings

    for flag, path in (("--model_name_or_path", llm_dir), ("--vision_tower", clip_dir)):
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r}: not a local folder (nothing is downloaded)")
    llm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    tower = CLIPVisionModel.from_pretrained(clip_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return LlavaModel(llm, tower, LlavaSettings(**kw))


def mm_projector_state_dict(model):
    """What outputs.save_projector writes for `model` (an unsharded one): formats.mm_projector_content."""
    from minillava.formats import mm_projector_content

    state = model.mm_projector.state_dict()
    dtype = next(iter(state.values())).dtype
    return mm_projector_content(((f"mm_projector.{k}", v.detach()) for k, v in state.items()), dtype)


def make_tiny_llava(**kw):
    """A tiny LlavaModel (tiny_llama_config + tiny_clip_config), seeded; keywords as build_llava's."""
    torch.manual_seed(0)
    return build_llava(tiny_llama_config(), tiny_clip_config(), **kw)


def trainer_parts(cfg, info, total_steps: int):
    """train.py's own pieces for a test that drives train_step itself: (model, optimizer, scheduler, stream), the
    stream yielding (epoch, Batch) micro-batches on info.device in LLaVA's sampler order."""
    import train
    from minillava.data import load_image_processor, load_tokenizer
    from minillava.formats import run_configs

    model, _ = train.build_model(cfg, info, run_configs(cfg))
    tok = load_tokenizer(cfg.model.model_name_or_path, cfg.train.model_max_length)
    processor = load_image_processor(cfg.model.vision_tower)
    loader, sampler = train.build_loader(cfg, tok, processor, info, model.num_image_tokens)
    optimizer, scheduler = train.build_optimizer(model, cfg.train, total_steps)
    return model, optimizer, scheduler, train.micro_batch_stream(loader, sampler, 0, info.device)
