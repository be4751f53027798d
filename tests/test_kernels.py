"""What a step asks of the device, checked on the CPU where the CPU can tell: the padded path gives SDPA no mask (a
boolean (B, 1, T, T) mask rules out its flash kernel), the tower's features reach the projector without an fp32
round trip, and the loss holds one chunk's logits at a time."""

import os
import sys

import torch
import torch.nn.functional as F
from conftest import flags, trainer_parts
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode

from minillava import distributed as D
from minillava.config import parse_args
from minillava.loss import LinearCrossEntropy


class Calls(TorchFunctionMode):
    """Records (func, args, kwargs, result, calling file) of the torch functions in `funcs` called inside the mode."""

    def __init__(self, *funcs) -> None:
        super().__init__()
        self.funcs, self.calls = funcs, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.funcs:
            self.calls.append((func, args, kwargs or {}, out, sys._getframe(1).f_code.co_filename))
        return out


def _first_step(argv, *funcs):
    """Forward + backward of the first micro-batch of a run with `argv` (FSDP2 on 1 rank, as train.py builds it),
    with the calls of `funcs` recorded; returns (calls, batch)."""
    cfg = parse_args(argv)
    info = D.init_distributed()
    try:
        model, _, _, stream = trainer_parts(cfg, info, 2)
        batch = next(stream)[1]
        with Calls(*funcs) as calls:
            loss, _ = model(**batch)
            loss.backward()
        return calls.calls, batch
    finally:
        D.cleanup(info)


def test_the_padded_path_gives_sdpa_no_mask(assets, tmp_path):
    """Right padding: the causal mask alone keeps every real query off the padded keys, so the LLM's attention runs
    with is_causal and no mask (flash-eligible on CUDA); the tower's attention is unmasked and not causal."""
    argv = flags(assets, str(tmp_path / "o"), stage=2, padding_free=False, per_device_train_batch_size=4)
    calls, batch = _first_step(argv, F.scaled_dot_product_attention)
    assert batch.attention_mask is not None and not batch.attention_mask.all()  # this batch is padded
    masks = [kw.get("attn_mask", args[3] if len(args) > 3 else None) for _, args, kw, _, _ in calls]
    causal = [kw.get("is_causal", False) for _, _, kw, _, _ in calls]
    assert masks == [None] * len(calls)
    assert causal.count(True) == 2  # conftest.tiny_llama_config's 2 decoder layers; the tower's are not causal


def test_bf16_features_reach_the_projector_without_an_fp32_copy(assets, tmp_path):
    """Stage 1 in bf16 shards the projector on its own: read outside its forward, its weights are the fp32 masters,
    and the (N, P, C) features were cast to fp32 and back to bf16 by FSDP's input cast. Cast at call time, inside
    FSDP's pre-forward, they go in as they are."""
    argv = flags(assets, str(tmp_path / "o"), stage=1, bf16="True")
    calls, _ = _first_step(argv, torch.Tensor.to, torch.Tensor.float)
    model_py = os.path.join("minillava", "model.py")
    casts = [(args[0].dtype, out.dtype) for _, args, _, out, where in calls if where.endswith(model_py)]
    assert casts and (torch.bfloat16, torch.float32) not in casts  # the projector input: bf16 -> bf16 (was fp32)


def _loss_peak(rows: int, chunk: int, vocab: int = 8000, dim: int = 16) -> int:
    torch.manual_seed(0)
    h = torch.randn(rows, dim, requires_grad=True)
    w = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (rows,))
    tracker = MemTracker()
    tracker.track_external(h, w, t)
    with tracker:
        LinearCrossEntropy.apply(h, w, t, chunk).backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_the_loss_holds_one_chunks_logits_at_a_time():
    """Four chunks cost what one does, but for their rows' inputs and input gradients: the fp32 (C, V) logits buffer
    is reused in place for the softmax (no logsumexp temporary) and freed before the next chunk's exists."""
    chunk, vocab, dim = 256, 8000, 16
    one, four = _loss_peak(chunk, chunk, vocab, dim), _loss_peak(4 * chunk, chunk, vocab, dim)
    assert four - one <= 3 * chunk * dim * 4 * 3  # h, its gradient and the (L, D) gradient kept for backward
    assert one < 1.5 * chunk * vocab * 4  # a single (C, V) fp32 buffer at the peak
