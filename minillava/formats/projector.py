"""mm_projector.bin, the stage-1 output: read as --pretrain_mm_mlp_adapter and checked against the projector (every
way it can be wrong is one line naming the file), and its content when written (llava/train/train.py
safe_save_model_for_hf_trainer, tune_mm_mlp_adapter branch: keys model.mm_projector.*)."""

import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from minillava.formats.folders import checkpoint_kind
from minillava.formats.llava import to_llava_key
from minillava.model import build_projector

ADAPTER_EXPECTED = "a stage-1 mm_projector.bin (torch.save of {name: tensor}, as train.py --stage 1 writes it)"


def _folder_advice(path: str) -> str:
    """What a folder given as --pretrain_mm_mlp_adapter is, and the flag that takes it."""
    if os.path.isfile(projector := os.path.join(path, "mm_projector.bin")):
        return f"is a folder; its projector is {projector}: pass that file"
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return ("is a training checkpoint (checkpoint-N): --resume_from_checkpoint takes it (with the run's flags); "
                f"--pretrain_mm_mlp_adapter takes {ADAPTER_EXPECTED}")  # fmt: skip
    if checkpoint_kind(path) is not None:
        return ("is a stage-2 model folder: --model_name_or_path takes it (to finetune it further), with no "
                f"--pretrain_mm_mlp_adapter (it has its projector); that flag takes {ADAPTER_EXPECTED}")  # fmt: skip
    return f"is a folder without mm_projector.bin; expected {ADAPTER_EXPECTED}"


def _read_adapter(path: str) -> dict[str, Tensor]:
    """torch.load(weights_only=True) of --pretrain_mm_mlp_adapter; every way it can be wrong is one ValueError line
    naming the file and what was expected (never torch's own advice to load untrusted pickles)."""
    flag = f"--pretrain_mm_mlp_adapter {path}"
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {_folder_advice(path)}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: does not exist; expected {ADAPTER_EXPECTED}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{flag}: the file is empty; expected {ADAPTER_EXPECTED}")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, ... depending on the bytes (torch's advice is unsafe)
        raise ValueError(f"{flag}: not a tensor file torch.load can read safely; expected {ADAPTER_EXPECTED}") from e
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        got = type(weights).__name__ if not isinstance(weights, dict) else "a dict with non-tensor values"
        raise ValueError(f"{flag}: holds {got}; expected {ADAPTER_EXPECTED}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{flag}: NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]} (did stage 1 diverge?)")
    return weights


def read_mm_projector(model: nn.Module, path: str) -> dict[str, Tensor]:
    """LLaVA's mm_projector.bin as {mm_projector.*: tensor in the param dtype}, checked against model.mm_projector
    (shapes and dtypes only: a meta-device model will do)."""
    weights = _read_adapter(path)
    # llava/model/llava_arch.py initialize_vision_modules: keys after the last "mm_projector."
    weights = {k.split("mm_projector.")[-1]: v for k, v in weights.items() if "mm_projector." in k}
    expected = model.mm_projector.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {path}: missing keys {missing}, unexpected keys {unexpected} "
            "(is --mm_projector_type the one the adapter was trained with?)"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"--pretrain_mm_mlp_adapter {path}: mm_projector.{k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(expected[k].shape)}"
            )
    return {f"mm_projector.{k}": v.to(expected[k].dtype) for k, v in weights.items()}


def load_mm_projector(model: nn.Module, path: str) -> None:
    """Load --pretrain_mm_mlp_adapter into an unsharded model, strict; ValueError naming the file."""
    weights = read_mm_projector(model, path)
    model.mm_projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in weights.items()}, strict=True)


def projector_holder(projector_type: str, vision_config, llm_config) -> nn.Module:
    """A module holding only a new .mm_projector (read_mm_projector / load_mm_projector take any such module)."""
    holder = nn.Module()
    holder.mm_projector = build_projector(projector_type, vision_config.hidden_size, llm_config.hidden_size)
    return holder


def projector_state(projector_type: str, vision_config, llm_config, adapter: str | None = None) -> dict[str, Tensor]:
    """mm_projector.* weights of a new projector: PyTorch's default init from the global RNG (as LLaVA), or those
    of the `adapter` mm_projector.bin."""
    holder = projector_holder(projector_type, vision_config, llm_config)
    if adapter:
        load_mm_projector(holder, adapter)
    return holder.state_dict()


def mm_projector_content(named: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The mm_projector.bin dict from (our name, tensor) pairs: keys model.mm_projector.*, tensors in `dtype`."""
    return {to_llava_key(n): t.to(dtype) for n, t in named}
