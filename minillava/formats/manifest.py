"""manifest.json, saved with every checkpoint and final output: what a run's result depends on beyond its flags
(minillava's revision, library versions, hashes of the data file and the tokenizer). Resume compares the checkpoint's
with the run's (manifest_changes)."""

import hashlib
import json
import os
import platform
import subprocess

import torch

from minillava.formats.records import data_sha256

MANIFEST_NAME = "manifest.json"  # saved with every checkpoint and final output


def _git_revision() -> str | None:
    """The minillava checkout's commit (+ "-dirty" with uncommitted changes), None outside a git checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # minillava/formats/..
    try:
        run = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what the tokenizer maps (vocabulary, added and special tokens), not of its files' bytes."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special, type(tokenizer).__name__], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_manifest(cfg, tokenizer) -> dict:
    """Rank 0 at start-up: the resolved config, minillava's revision, the library versions and hashes of the
    data file and the tokenizer. Resume compares it with the checkpoint's (manifest_changes)."""
    import transformers

    import minillava

    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    return {
        "config": cfg.to_dict(),
        "minillava": {"version": minillava.__version__, "git": _git_revision()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        },
        "data_sha256": data_sha256(cfg.data.data_path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }


def manifest_changes(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's manifest and this run's, beyond the config (reported on its own)."""
    changes = []
    for section, label in (("minillava", "minillava "), ("versions", "")):
        for key, value in new[section].items():
            if (was := old.get(section, {}).get(key)) != value:
                changes.append(f"{label}{key} {was} -> {value}")
    for key, what in (("data_sha256", "--data_path content"), ("tokenizer_sha256", "tokenizer vocabulary")):
        if old.get(key) != new[key]:
            changes.append(f"{what} (sha256 {str(old.get(key))[:12]} -> {new[key][:12]})")
    return changes
