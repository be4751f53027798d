"""Hugging Face Hub ids given for a model flag (lmsys/vicuna-7b-v1.5, as LLaVA's scripts pass them): read from the hub
cache as transformers' from_pretrained resolves a name (local_folder), downloaded once per node when downloads are
on (download; formats/run.py fetch_models)."""

import os

from huggingface_hub import constants, list_repo_files, snapshot_download, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from minillava.formats.folders import weight_files

# Files of a hub repo no reader here uses: other frameworks' weights (openai/clip-* ship a TF and a Flax copy).
_NOT_READ = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "*.mlmodel", "*.pth", "*.pt", "*.ckpt"]


def is_repo_id(name: str) -> bool:
    """A valid Hugging Face Hub repo id (lmsys/vicuna-7b-v1.5, gpt2), as huggingface_hub validates one."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached(repo_id: str) -> str | None:
    """The hub cache's snapshot folder of `repo_id` at main (its config.json is there), or None. The cache is
    huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub, read when huggingface_hub is imported)."""
    config = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def local_folder(name: str, flag: str) -> str:
    """The folder to read for a model flag as given: a local folder is itself; a hub repo id is its snapshot in the
    hub cache (nothing is downloaded here: download, formats/run.py fetch_models). ValueError naming the flag
    otherwise."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not is_repo_id(name):
        why = "is not a folder" if os.path.exists(name) else "does not exist"
        raise ValueError(f"{flag} {name}: {why} (a local folder is expected)")
    if folder := _cached(name):
        return folder
    where = f"not a local folder, and not a model in the hub cache at {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{flag} {name}: does not exist ({where}; downloads are off (HF_HUB_OFFLINE=1): unset it, "
                         f"or run `hf download {name}` where the hub can be reached)")  # fmt: skip
    raise ValueError(f"{flag} {name}: does not exist ({where}; download it with `hf download {name}`)")


def download(name: str, flag: str) -> None:
    """Put hub id `name` into the hub cache unless it is a local folder, its snapshot there has all its weights, or
    downloads are off (HF_HUB_OFFLINE=1): huggingface_hub's snapshot_download of what the readers use (configs,
    tokenizer, processor, one copy of the weights: safetensors when the repo has them). ValueError naming the flag if
    the hub refuses or cannot be reached. Call it on one process per node (formats/run.py fetch_models)."""
    if os.path.isdir(name) or not is_repo_id(name) or constants.HF_HUB_OFFLINE:
        return
    if (folder := _cached(name)) and (files := weight_files(folder)) and all(map(os.path.isfile, files)):
        return
    try:
        skip = list(_NOT_READ)
        if any(f.endswith(".safetensors") for f in list_repo_files(name)):  # one copy, the one read_weights reads
            skip.append("pytorch_model*")
        snapshot_download(name, ignore_patterns=skip)
    except Exception as e:  # HfHubHTTPError (not found, gated, 5xx), connection errors, OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{flag} {name}: does not exist (not a local folder, and the Hugging Face Hub download "
                         f"failed: {type(e).__name__}: {reason})") from e  # fmt: skip


def fetch(name: str, flag: str) -> str:
    """download then local_folder: what a one-process tool (generate, export, check_data) calls for a model flag."""
    download(name, flag)
    return local_folder(name, flag)
