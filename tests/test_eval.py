"""The validation loss (--eval_data_path with HF's --evaluation_strategy / --eval_strategy, --eval_steps,
--per_device_eval_batch_size): the token mean over the whole held-out set, dealt over the ranks, without gradients;
equal to the training loss of the same samples and weights, and the same on 2 ranks as on 1."""

import json
import os

import pytest
import torch
from conftest import flags
from dist import run_distributed

import train
from minillava.config import parse_args
from minillava.sampler import PAD_SAMPLE, eval_batches


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_batches_deal_in_order_and_keep_the_ranks_in_step():
    assert eval_batches(5, 2, 1, 0) == [[0, 1], [2, 3], [4]]
    assert eval_batches(5, 2, 2, 0) == [[0, 2], [4]]
    assert eval_batches(5, 2, 2, 1) == [[1, 3], [PAD_SAMPLE]]  # ran out: a masked sample keeps it in step
    assert eval_batches(1, 4, 3, 2) == [[PAD_SAMPLE]]
    for n, bs, world in ((7, 3, 2), (8, 2, 4), (3, 5, 2)):
        dealt = [eval_batches(n, bs, world, r) for r in range(world)]
        assert len({len(b) for b in dealt}) == 1  # every rank runs as many forwards
        assert sorted(i for b in dealt for batch in b for i in batch if i != PAD_SAMPLE) == list(range(n))


def _two_samples(assets, tmp_path):
    with open(assets["data"]) as f:
        records = json.load(f)
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    return str(path)


def test_eval_loss_equals_the_training_loss_of_the_same_samples_and_weights(assets, tmp_path, capsys):
    """Train on 2 samples, one micro-batch of both per step, and validate on the same 2 after every step: the
    validation loss after step 1 is step 2's training loss (the same samples through the same weights), and the
    console and metrics.jsonl show it."""
    data = _two_samples(assets, tmp_path)
    out = str(tmp_path / "o")
    argv = flags(assets, out, max_steps=3, logging_steps=1, data_path=data, eval_data_path=data,
                 eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1)  # fmt: skip
    assert train.cli(argv) == 0
    rows = _rows(out)
    train_loss = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3] and len(train_loss) == 3
    for k in (0, 1):
        assert evals[k]["eval_loss"] == pytest.approx(train_loss[k + 1], rel=1e-6, abs=0)
    assert all(r["eval_tokens"] > 0 for r in evals)
    assert f"eval after step 2/3 | eval_loss {evals[1]['eval_loss']:.4f} | " in capsys.readouterr().out


def _dist_main(rank, world, argv):
    train.main(argv)


@pytest.mark.dist
def test_eval_on_two_ranks_equals_one_rank(assets, tmp_path):
    """An odd validation set (5 samples) dealt over 2 ranks in micro-batches of 2 (one rank pads its last forward
    with a masked sample): the same validation losses as on 1 rank (the weights agree to 1e-5: 2 ranks == 1 rank)."""
    with open(assets["data"]) as f:
        records = json.load(f)
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(records[-5:]))
    common = dict(max_steps=2, eval_data_path=str(held_out), evaluation_strategy="epoch",
                  per_device_eval_batch_size=2)  # fmt: skip
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(flags(assets, one, gradient_accumulation_steps=2, **common))
    run_distributed(_dist_main, tmp_path, flags(assets, two, **common))
    evals = [[r["eval_loss"] for r in _rows(out) if "eval_loss" in r] for out in (one, two)]
    tokens = [[r["eval_tokens"] for r in _rows(out) if "eval_tokens" in r] for out in (one, two)]
    assert len(evals[0]) == 1 and tokens[0] == tokens[1]  # epoch strategy: the run's end (2 steps < an epoch)
    torch.testing.assert_close(evals[1], evals[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--evaluation_strategy", "steps"], "--eval_data_path and --evaluation_strategy go together"),
        (["--eval_data_path", "x.json"], "--eval_data_path and --evaluation_strategy go together"),
        (["--eval_strategy", "no", "--evaluation_strategy", "no"], "are the same flag; give one"),
        (["--eval_strategy", "sometimes"], "--evaluation_strategy 'sometimes': supported: no, steps, epoch"),
    ],
)
def test_eval_flags_are_checked(extra, message):
    argv = ["--stage", "2", "--model_name_or_path", "m", "--vision_tower", "c", "--data_path", "d",
            "--image_folder", "i", "--output_dir", "o", *extra]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        parse_args(argv)
    parse_args([*argv[:12], "--evaluation_strategy", "no", "--per_device_eval_batch_size", "4"])  # LLaVA's scripts


def test_a_bad_validation_file_is_named_by_its_own_flag(assets, tmp_path):
    """Errors about the validation file name --eval_data_path (they said --data_path, the training file's flag), and
    the start-up stops before a model is built."""
    bad = tmp_path / "held_out.json"
    bad.write_text('{"id": "not a list"}')
    argv = flags(assets, str(tmp_path / "o"), eval_data_path=str(bad), evaluation_strategy="epoch")
    with pytest.raises(ValueError, match=f"^--eval_data_path {bad}: expected a JSON list of samples, got a dict$"):
        train.main(argv)
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")
