"""The host layout's counts must agree with what the model really computes: label tokens after the image splice and
truncation (global_token normalises by them before any forward), and spliced sequence lengths (tokens/s, MFU);
and the FLOP model."""

import pytest
import torch
from conftest import make_tiny_llava as make_model

from minillava.constants import IGNORE_INDEX as IGN
from minillava.constants import IMAGE_TOKEN_INDEX as IMG
from minillava.metrics import FlopModel


@pytest.mark.parametrize("max_len", [64, 9, 6])
def test_counts_match_the_models_splice_and_truncation(max_len):
    torch.manual_seed(0)
    model = make_model(model_max_length=max_len)
    ids = torch.tensor(
        [
            [1, IMG, 10, 11, 12, 13, 0, 0],  # image first
            [1, 20, IMG, 21, IMG, 22, 23, 24],  # two images, one in the middle
            [1, 30, 31, 32, 33, 0, 0, 0],  # text-only: still one (zero) image slot, no placeholder
        ]
    )
    mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 8, [1] * 5 + [0] * 3]).bool()
    labels = torch.where((ids > 9) & mask, ids, torch.full_like(ids, IGN))
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 28, 28)}
    layout = model.layout(batch)
    loss_sum, num_tokens = model(**layout)
    reference = torch.nn.functional.cross_entropy  # the model's loss recomputed from its spliced labels
    embeds, spliced_labels, spliced_mask, pos = model.embed_inputs(ids, mask, batch["pixel_values"], labels)
    logits = model.llm(inputs_embeds=embeds, attention_mask=spliced_mask, position_ids=pos).logits.float()
    ref = reference(logits[:, :-1].flatten(0, 1), spliced_labels[:, 1:].flatten(), reduction="sum")
    assert layout.num_label_tokens == num_tokens == int((spliced_labels[:, 1:] != IGN).sum())
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-5)
    assert list(layout.seq_lens) == spliced_mask.sum(1).tolist()


def test_flop_model_counts_frozen_llm_without_weight_gradients():
    model = make_model()
    stage2 = FlopModel.from_model(model)
    model.llm.requires_grad_(False)
    stage1 = FlopModel.from_model(model)
    assert stage2.llm_trainable and not stage1.llm_trainable
    t = 100
    assert stage2.sample_flops(t) - stage1.sample_flops(t) == pytest.approx(2 * stage1.llm_matmul * t)
