"""A stage-1 step with the stage-1 defaults executes no FLOP it does not need: no activation recompute, no lm_head
recompute, no padding. Counted with torch.utils.flop_counter.FlopCounterMode over one train_step on a batch of
mixed lengths, against the FLOPs the step needs: the same model on each sample alone (real tokens only), no
checkpointing, lm_head and a plain F.cross_entropy on the labelled rows only, one backward."""

import json

from conftest import flags, trainer_parts
from torch.utils.flop_counter import FlopCounterMode

import train
from bench.counts import needed_flops
from minillava import distributed as D
from minillava.config import parse_args
from minillava.formats import run_configs, run_settings
from minillava.model import build_llava_from_config, set_trainable


def _needed_flops(cfg, micro) -> int:
    """bench/counts.py's reference, through a plain (unsharded, padded) copy of the model: one sample at a time."""
    model = build_llava_from_config(*run_configs(cfg), run_settings(cfg))
    set_trainable(model, tune_mm_mlp_adapter=cfg.model.tune_mm_mlp_adapter)
    return sum(needed_flops(model, batch) for batch in micro)


def _executed_and_needed(argv):
    cfg = parse_args(argv)
    info = D.init_distributed()
    try:
        model, optimizer, scheduler, stream = trainer_parts(cfg, info, 2)
        micro = [next(stream)[1]]
        assert len(set(micro[0].seq_lens)) > 1, "the test needs a batch of mixed lengths"
        with FlopCounterMode(display=False) as counter:
            train.train_step(model, micro, optimizer, scheduler, cfg)
        return counter.get_total_flops(), _needed_flops(cfg, micro)
    finally:
        D.cleanup(info)


def _captions(assets, tmp_path) -> str:
    """Stage-1 data whose captions differ in length (3 to 17 words), on the fixture's images."""
    words = ("a", "red", "shape", "on", "a", "white", "background", "with", "a", "small", "blue", "border", "and",
             "some", "text")
    records = [
        {"id": f"cap-{i}", "image": f"img_{i}.png",
         "conversations": [{"from": "human", "value": "<image>"},
                           {"from": "gpt", "value": " ".join(words[: 3 + 2 * i])}]}
        for i in range(8)
    ]  # fmt: skip
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records))
    return str(path)


def _argv(assets, tmp_path, **over):
    return flags(assets, str(tmp_path / "o"), stage=1, per_device_train_batch_size=4,
                 data_path=_captions(assets, tmp_path), **over)  # fmt: skip


def test_stage1_defaults_execute_only_needed_flops(assets, tmp_path):
    argv = _argv(assets, tmp_path)
    executed, needed = _executed_and_needed(argv)
    assert needed > 0 and executed <= 1.02 * needed, executed / needed


def test_llavas_own_settings_recompute_and_pad(assets, tmp_path):
    """What the test above guards against: LLaVA's --gradient_checkpointing True and padded batches."""
    argv = _argv(assets, tmp_path, gradient_checkpointing=True, padding_free=False)
    executed, needed = _executed_and_needed(argv)
    assert executed > 1.1 * needed
