"""The demo: assets are deterministic LLaVA-format data and loadable HF folders, the colour evaluator scores what it
should, the demo's flags drive the real trainer, and a stage-2 output folder loads back for evaluation."""

import collections
import json
import os
import re
import shlex

import pytest
import torch
from conftest import build_llava_from_pretrained

from minillava import demo
from minillava.config import parse_args
from minillava.constants import IGNORE_INDEX
from minillava.conversation import build_inference_prompt, preprocess, tokenizer_image_token
from minillava.data import LazySupervisedDataset, load_image_processor, load_tokenizer, open_image, process_image

N_TRAIN, N_EVAL = 24, 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return demo.make_demo_assets(str(tmp_path_factory.mktemp("demo")), n_train=N_TRAIN, n_eval=N_EVAL, seed=0)


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_assets_are_deterministic_given_seed(assets, tmp_path):
    root = os.path.dirname(assets["llm"])
    again = demo.make_demo_assets(str(tmp_path / "again"), n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
    first, second = _files(root), _files(os.path.dirname(again["llm"]))
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []  # byte-identical, weights and PNGs included
    other = demo.make_demo_assets(str(tmp_path / "other"), n_train=N_TRAIN, n_eval=N_EVAL, seed=1)
    assert _load(other["eval"]) != _load(assets["eval"])
    assert _files(other["llm"])["model.safetensors"] != first["llm/model.safetensors"]


def test_draw_shape_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="hexagon"):
        demo.draw_shape("red", "hexagon")


def test_dataset_files_are_llava_format(assets):
    tokenizer = load_tokenizer(assets["llm"], 512)
    pretrain, finetune, evaluation = (_load(assets[k]) for k in ("pretrain", "finetune", "eval"))
    assert len(pretrain) == N_TRAIN and len(evaluation) == N_EVAL
    text_only = [r for r in finetune if "image" not in r]
    assert len(finetune) == N_TRAIN + len(text_only) and len(text_only) == max(1, N_TRAIN // 20)
    assert len({r["id"] for r in pretrain + finetune + evaluation}) == len(pretrain + finetune + evaluation)
    assert not {r["image"] for r in evaluation} & {r["image"] for r in finetune if "image" in r}  # held out
    # Held-out colours are balanced over the palette, so a constant guess scores exactly chance.
    assert collections.Counter(r["colour"] for r in evaluation) == dict.fromkeys(demo.SHAPE_COLOURS, 2)
    for r in pretrain:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].count("<image>") == 1 and gpt["from"] == "gpt"
        assert re.fullmatch(r"A (\w+) (\w+) on a (white|black) background\.", gpt["value"])
    assert any(len(r["conversations"]) == 4 for r in finetune)  # multi-turn
    sizes = set()
    for version, records in (("plain", pretrain), ("v1", finetune), ("v1", evaluation)):
        for r in records:
            roles = [t["from"] for t in r["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2)
            _, labels = preprocess(r["conversations"], tokenizer, version, has_image="image" in r)
            assert any(t != IGNORE_INDEX for t in labels)
            if "image" in r:
                width, height = open_image(os.path.join(assets["image_folder"], r["image"])).size
                sizes.add(width == height)
    assert False in sizes  # non-square images exist, so --image_aspect_ratio pad matters
    # The finetune answer to a colour question names the image's colour (checked against the pretrain caption).
    colour_of = {r["image"]: r["conversations"][1]["value"].split()[1] for r in pretrain}
    for r in finetune:
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True):
            if "colour" in q["value"]:
                assert a["value"] == demo.ANSWER.format(colour=colour_of[r["image"]])


def test_folders_load_with_from_pretrained(assets, tokenizer_dir):
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(assets["llm"])
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, None)
    text = "<image>\nWhat is the colour of the shape? ASSISTANT: The shape is red.</s>"
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(tokenizer_dir)(text).input_ids
    assert "<0x0A>" in tok.convert_ids_to_tokens(tok("a\nb").input_ids)  # newline through byte fallback
    with (
        open(os.path.join(assets["llm"], "tokenizer.model"), "rb") as a,
        open(os.path.join(tokenizer_dir, "tokenizer.model"), "rb") as b,
    ):
        assert a.read() == b.read()  # the same tokenizer as the test fixtures build
    llm = LlamaForCausalLM.from_pretrained(assets["llm"])
    assert llm.config.vocab_size == len(tok) and not llm.config.tie_word_embeddings
    tower = CLIPVisionModel.from_pretrained(assets["clip"])
    processor = load_image_processor(assets["clip"])
    assert tower.config.image_size == demo.IMAGE_SIZE == processor.crop_size["height"] == processor.crop_size["width"]
    model = build_llava_from_pretrained(assets["llm"], assets["clip"], mm_projector_type="mlp2x_gelu")
    ds = LazySupervisedDataset(
        assets["finetune"],
        load_tokenizer(assets["llm"], 512),
        processor,
        image_folder=assets["image_folder"],
        version="v1",
        image_aspect_ratio="pad",
    )
    sample = ds[0]
    raw = dict(
        input_ids=sample["input_ids"][None],
        labels=sample["labels"][None],
        attention_mask=torch.ones_like(sample["input_ids"][None], dtype=torch.bool),
        pixel_values=sample["pixel_values"][None],
    )
    loss, n = model(**model.layout(raw))
    assert torch.isfinite(loss) and n > 0


class OracleModel(torch.nn.Module):
    """Answers from a lookup of the true colour by pixel values: loss 0 for the true colour, 1 otherwise (or the
    reverse with liar=True). Records the supervised text of every candidate it is asked to score."""

    model_max_length = 512

    def __init__(self, truth, tokenizer, liar=False):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.truth, self.tokenizer, self.liar, self.seen, self.prompts = truth, tokenizer, liar, [], []

    def layout(self, raw):  # the evaluator lays batches out as the trainer does; the oracle reads them raw
        return _AsIs(raw)

    def forward(self, input_ids, labels, attention_mask, pixel_values):
        assert input_ids.shape[0] == 1 and attention_mask.all()
        colour = self.truth[pixel_values[0].numpy().tobytes()]
        text = self.tokenizer.decode([t for t in labels[0].tolist() if t != IGNORE_INDEX])
        first = (labels[0] != IGNORE_INDEX).nonzero()[0, 0].item()
        self.seen.append(text)
        self.prompts.append(input_ids[0, :first].tolist())
        wrong = colour not in text.split(".")[0].split()
        return torch.tensor(float(wrong != self.liar)), torch.tensor(len(text))


class _AsIs(dict):
    def to(self, device):
        return self


def _truth(assets, processor, aspect):
    return {
        process_image(open_image(os.path.join(assets["image_folder"], r["image"])), processor, aspect)
        .numpy()
        .tobytes(): r["colour"]
        for r in _load(assets["eval"])
    }


@pytest.mark.parametrize("version, aspect", [("v1", "pad"), ("plain", "square")])
def test_evaluator_scores_the_answer_for_the_right_image(assets, version, aspect):
    tokenizer, processor = load_tokenizer(assets["llm"], 512), load_image_processor(assets["clip"])
    args = (tokenizer, processor, assets["eval"], assets["image_folder"])
    oracle = OracleModel(_truth(assets, processor, aspect), tokenizer)
    assert demo.evaluate_colour_accuracy(oracle, *args, version=version, image_aspect_ratio=aspect) == 1.0
    first = _load(assets["eval"])[0]
    if version == "v1":  # exactly the training answer, with its closing </s>, and nothing of the prompt
        expected = [demo.ANSWER.format(colour=c) + "</s>" for c in demo.SHAPE_COLOURS]
    else:  # stage 1's target: the caption and the plain separator
        expected = [demo.CAPTION.format(colour=c, shape=first["shape"], background=first["background"]) + "\n"
                    for c in demo.SHAPE_COLOURS]  # fmt: skip
    assert oracle.seen[: len(expected)] == expected
    # What precedes the answer is the inference prompt (v1: system, USER: <image>\nQ, ASSISTANT:).
    prompt = tokenizer_image_token(build_inference_prompt(demo.EVAL_QUESTION, version, has_image=True), tokenizer)
    assert all(p == prompt for p in oracle.prompts)
    liar = OracleModel(oracle.truth, tokenizer, liar=True)
    assert demo.evaluate_colour_accuracy(liar, *args, version=version, image_aspect_ratio=aspect) == 0.0


def test_evaluator_chance_for_a_model_that_ignores_the_answer(assets):
    """A real (untrained) LlavaModel whose scores do not depend on the image is at chance; a constant scorer picks
    the first colour on every image, which the balanced eval set scores at exactly 1 / len(colours)."""
    tokenizer, processor = load_tokenizer(assets["llm"], 512), load_image_processor(assets["clip"])
    args = (tokenizer, processor, assets["eval"], assets["image_folder"])
    constant = OracleModel({k: "none" for k in _truth(assets, processor, "pad")}, tokenizer)
    assert demo.evaluate_colour_accuracy(constant, *args) == 1 / len(demo.SHAPE_COLOURS)
    model = build_llava_from_pretrained(assets["llm"], assets["clip"], mm_projector_type="mlp2x_gelu")
    model.train()
    subset = os.path.join(os.path.dirname(assets["eval"]), "subset.json")
    with open(subset, "w") as f:
        json.dump(_load(assets["eval"])[: len(demo.SHAPE_COLOURS)], f)
    accuracy = demo.evaluate_colour_accuracy(model, tokenizer, processor, subset, assets["image_folder"])
    assert accuracy in [i / len(demo.SHAPE_COLOURS) for i in range(len(demo.SHAPE_COLOURS) + 1)]
    assert model.training  # training mode restored
    bad = os.path.join(os.path.dirname(assets["eval"]), "bad.json")
    with open(bad, "w") as f:
        json.dump([{**_load(assets["eval"])[0], "id": "x", "colour": "pink"}], f)
    with pytest.raises(ValueError, match=r"id='x'.*bad\.json.*colour"):
        demo.evaluate_colour_accuracy(model, tokenizer, processor, bad, assets["image_folder"])


def _shell_commands(text, out):
    """The torchrun command lines of a bash script, continuations joined and $OUT substituted."""
    joined = text.replace("\\\n", " ").replace('"$OUT', out).replace('$OUT"', "").replace('"', "")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("torchrun")]


def _flags(argv):
    i = argv.index("train.py")
    rest = argv[i + 1 :]
    return dict(zip(rest[::2], rest[1::2], strict=True))


def test_demo_sh_runs_the_printed_commands_and_they_parse(assets, capsys):
    with open(os.path.join(ROOT, "configs", "demo.sh")) as f:
        script = f.read()
    out = "/x/demo_out"
    from_script = [_flags(c) for c in _shell_commands(script, out)]
    printed = [_flags(shlex.split(c)) for c in demo.training_commands(out)]
    assert from_script == printed and len(printed) == 2
    assert "python -m minillava.demo --out" in script and "--evaluate --checkpoint" in script
    for stage, flags in enumerate(printed, 1):
        cfg = parse_args([x for kv in flags.items() for x in kv])
        assert cfg.train.stage == stage and cfg.train.bf16 is False and cfg.train.learning_rate == 1e-3
        assert cfg.model.model_name_or_path == f"{out}/llm" and cfg.data.image_folder == f"{out}/data"
    assert cfg.model.pretrain_mm_mlp_adapter == f"{out}/stage1/mm_projector.bin"
    assert cfg.data.image_aspect_ratio == "pad" and cfg.model.version == "v1"


def _argv(command, **over):
    """train.py's argv from one of the demo's printed commands, with flags overridden or (None) removed."""
    flags = _flags(shlex.split(command))
    for k, v in over.items():
        flags.pop(f"--{k}", None)
        if v is not None:
            flags[f"--{k}"] = str(v)
    return [x for kv in flags.items() for x in kv]


def test_stage2_output_loads_back_for_evaluation(assets, tmp_path, capsys):
    """The demo's own flags drive the real trainer (2 steps per stage); the stage-2 folder loads with every weight
    and `python -m minillava.demo --evaluate` reports its accuracy."""
    from safetensors.torch import load_file

    import train
    from minillava.formats import to_llava_key

    root = os.path.dirname(assets["llm"])
    s1, s2 = demo.training_commands(root)
    over = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1)
    train.main(_argv(s1, output_dir=tmp_path / "stage1", **over))
    adapter = tmp_path / "stage1" / "mm_projector.bin"
    train.main(_argv(s2, output_dir=tmp_path / "stage2", pretrain_mm_mlp_adapter=adapter, **over))
    model, tokenizer, _, aspect = demo.load_stage2(str(tmp_path / "stage2"))
    assert aspect == "pad" and model.model_max_length == 512 and tokenizer.pad_token_id == 0
    saved = {}
    for name in os.listdir(tmp_path / "stage2"):
        if name.endswith(".safetensors"):
            saved.update(load_file(tmp_path / "stage2" / name))
    state = model.state_dict()
    assert len(saved) == len(state) and all(torch.equal(saved[to_llava_key(k)], v) for k, v in state.items())
    projector = torch.load(adapter, weights_only=True)
    assert not torch.equal(projector["model.mm_projector.0.weight"], state["mm_projector.0.weight"])  # trained on
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"below --min_accuracy 1\.01"):
        demo.main(["--evaluate", "--checkpoint", str(tmp_path / "stage2"), "--out", root, "--min_accuracy", "1.01"])
    printed = re.search(r"held-out colour accuracy of (\S+): ([\d.]+) \(chance 0.167\)", capsys.readouterr().out)
    assert printed[1] == str(tmp_path / "stage2") and 0.0 <= float(printed[2]) <= 1.0
    with pytest.raises(ValueError, match=r"--checkpoint .*config\.json"):
        demo.load_stage2(str(tmp_path))


def test_main_writes_assets_and_prints_the_commands(tmp_path, capsys):
    out = str(tmp_path / "d")
    demo.main(["--out", out, "--n_train", "6", "--n_eval", "6", "--seed", "3"])
    printed = capsys.readouterr().out
    assert all(c in printed for c in demo.training_commands(out))
    assert f"--evaluate --checkpoint {out}/stage2" in printed
    assert len(_load(os.path.join(out, "data", "eval.json"))) == 6


@pytest.mark.e2e
@pytest.mark.dist
def test_readme_demo_learns_colours(tmp_path):
    """The README's demo command end to end (2-rank torchrun, stage 1 then stage 2, from nothing): the model must
    answer the held-out colour question far above chance (1/6); configs/demo.sh itself fails below 0.5."""
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path / "demo"), "PYTHONPATH": ROOT}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "configs", "demo.sh")], env=env, capture_output=True, timeout=1500
    )
    log = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, log[-4000:]
    accuracy = float(re.search(r"held-out colour accuracy of .*?: ([0-9.]+)", log).group(1))
    assert accuracy >= 0.8, log[-2000:]
    assert os.path.exists(tmp_path / "demo" / "stage1" / "mm_projector.bin")
    assert os.path.exists(tmp_path / "demo" / "stage2" / "model.safetensors.index.json")
