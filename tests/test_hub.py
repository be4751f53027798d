"""Models by name, as LLaVA's scripts give them (--model_name_or_path lmsys/vicuna-7b-v1.5, --vision_tower
openai/clip-vit-large-patch14-336): read from a hub cache laid out on disk exactly as huggingface_hub lays it out
(models--org--name/refs/main -> snapshots/<commit>/ files symlinked into blobs/). Nothing is downloaded: the one
download test replaces huggingface_hub's snapshot_download with a copy from the assets."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from conftest import flags, write_llava_dataset
from dist import run_distributed
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

import train
from minillava import check_data, export, formats, generate
from minillava import distributed as D
from minillava.config import CONFIG_NAME, parse_args
from minillava.data import load_image_processor

LLM, CLIP = "lmsys/vicuna-tiny", "openai/clip-tiny"  # hub ids of the assets' tiny folders
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: str, repo_id: str, src: str, commit: str = COMMIT) -> str:
    """Put folder `src` into hub cache `cache` as huggingface_hub does; returns the snapshot folder."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for root, _, files in os.walk(src):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                blob = os.path.join(repo, "blobs", hashlib.sha256(f.read()).hexdigest())
            shutil.copyfile(os.path.join(root, name), blob)
            link = os.path.join(snapshot, os.path.relpath(os.path.join(root, name), src))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def use_cache(mp: pytest.MonkeyPatch, cache: str, offline: bool = True) -> None:
    """What HF_HUB_CACHE=cache (and HF_HUB_OFFLINE) in the environment at start-up gives: huggingface_hub reads them
    into its constants when imported, so the constants are patched (the environment too, for completeness)."""
    mp.setenv("HF_HUB_CACHE", cache)
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture(scope="module")
def hub(assets, tmp_path_factory):
    """A hub cache holding the assets' LLM and CLIP folders as LLM and CLIP."""
    cache = str(tmp_path_factory.mktemp("hf") / "hub")
    llm, clip = cache_repo(cache, LLM, assets["llm"]), cache_repo(cache, CLIP, assets["clip"])
    return {"cache": cache, "llm": llm, "clip": clip}


@pytest.fixture
def cache(hub, monkeypatch):
    use_cache(monkeypatch, hub["cache"])
    return hub["cache"]


@pytest.fixture(scope="module")
def hub_stage2(hub, assets, tmp_path_factory):
    """A stage-2 run with hub ids for both model flags: its output folder."""
    out = str(tmp_path_factory.mktemp("hub_run") / "stage2")
    with pytest.MonkeyPatch.context() as mp:
        use_cache(mp, hub["cache"])
        train.main(flags(assets, out, stage=2, model_name_or_path=LLM, vision_tower=CLIP))
    return out


def test_local_folder_resolves_a_hub_id_to_its_cached_snapshot(hub, cache, assets, tmp_path):
    """refs/main names the snapshot (an older one is ignored); a local folder is itself; a valid id not in the cache
    and a path that is neither are one line naming the flag, offline saying that downloads are off."""
    assert formats.local_folder(LLM, "--model_name_or_path") == hub["llm"]
    assert formats.local_folder(assets["llm"], "--model_name_or_path") == assets["llm"]
    newer = cache_repo(cache, "org/two-commits", assets["clip"], commit="1" * 40)
    cache_repo(cache, "org/two-commits", assets["llm"], commit="2" * 40)
    with open(os.path.join(cache, "models--org--two-commits", "refs", "main"), "w") as f:
        f.write("1" * 40)
    assert formats.local_folder("org/two-commits", "--vision_tower") == newer
    with pytest.raises(ValueError) as e:
        formats.local_folder("org/not-cached", "--vision_tower")
    want = "--vision_tower org/not-cached: does not exist (not a local folder, and not a model in the hub cache at "
    assert str(e.value).startswith(f"{want}{cache}; downloads are off (HF_HUB_OFFLINE=1)") and "\n" not in str(e.value)
    for path in ("/no/such/vicuna", "./checkpoints/vicuna-7b-v1.5", "a/b/c"):  # not repo ids: no hub message
        with pytest.raises(ValueError, match=rf"^--model_name_or_path {path}: does not exist \(a local folder is "):
            formats.local_folder(path, "--model_name_or_path")
    file = str(tmp_path / "config.json")
    open(file, "w").close()
    with pytest.raises(ValueError, match="is not a folder"):
        formats.local_folder(file, "--model_name_or_path")


def test_the_cache_comes_from_hf_home_in_the_environment(hub, tmp_path):
    """A real user's setting: HF_HOME exported before Python starts (no HF_HUB_CACHE) -> HF_HOME/hub."""
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(hub["cache"], home / "hub")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    code = f"from minillava.formats import local_folder; print(local_folder({LLM!r}, '--model_name_or_path'))"
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == os.path.join(str(home), "hub", os.path.relpath(hub["llm"], hub["cache"]))


def test_training_with_hub_ids_records_the_names_given(hub_stage2, cache):
    """The run reads the snapshots; its LLaVA config.json says mm_vision_tower openai/clip-..., as LLaVA's does, and
    minillava_config.json keeps the flags as given."""
    with open(os.path.join(hub_stage2, "config.json")) as f:
        assert json.load(f)["mm_vision_tower"] == CLIP
    with open(os.path.join(hub_stage2, CONFIG_NAME)) as f:
        model = json.load(f)["model"]
    assert (model["model_name_or_path"], model["vision_tower"]) == (LLM, CLIP)
    assert os.path.isfile(os.path.join(hub_stage2, "tokenizer.model"))  # the LLM's, as LLaVA loads use_fast=False


def test_a_llava_folder_whose_vision_tower_is_a_hub_id(hub_stage2, hub, cache, assets, tmp_path):
    """mm_vision_tower openai/clip-... is found in the cache: configs, the CLIP weights when the folder has no copy of
    them (as LLaVA's FSDP saves), generate's processor, export, and stage 2 started from the folder."""
    _, vision_config = formats.llava_checkpoint_configs(hub_stage2)
    assert vision_config.hidden_size == 32
    stripped = str(tmp_path / "no_tower_copy")
    shutil.copytree(hub_stage2, stripped)
    for name in (n for n in os.listdir(stripped) if n.endswith(".safetensors")):
        state = load_file(os.path.join(stripped, name))
        save_file({k: v for k, v in state.items() if "vision_tower" not in k}, os.path.join(stripped, name))
    got, want = formats.load_llava_checkpoint_state(stripped)[2], formats.load_llava_checkpoint_state(hub_stage2)[2]
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert formats.fetch_checkpoint(stripped, None) == (stripped, hub["clip"])
    _, settings = generate.load_model(stripped)
    processor = generate.load_image_processor_for(stripped, settings, None)
    assert processor.to_dict() == load_image_processor(assets["clip"]).to_dict() | {"do_pad": False}
    export.export_llava_hf(str(tmp_path / "hf"), checkpoint=stripped)
    assert os.path.isfile(os.path.join(tmp_path, "hf", "processor_config.json"))
    out = str(tmp_path / "again")
    argv = flags(assets, out, stage=2, max_steps=1, model_name_or_path=stripped, vision_tower=CLIP)
    train.main([a for a in argv if a not in ("--init_projector", "random")])  # the projector comes with it
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["mm_vision_tower"] == CLIP


@pytest.mark.parametrize("flag", ["model_name_or_path", "vision_tower"])
def test_a_hub_id_not_in_the_cache_is_one_line_before_anything_is_written(cache, assets, tmp_path, capsys, flag):
    out = str(tmp_path / "o")
    code = train.cli(flags(assets, out, **{flag: "lmsys/no-such-model"}))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: --{flag} lmsys/no-such-model: does not exist (not a local folder, and not a model "
                          f"in the hub cache at {cache}; downloads are off (HF_HUB_OFFLINE=1)")  # fmt: skip
    assert not os.path.exists(out)


def test_the_first_rank_of_a_node_downloads_and_the_others_read_the_cache(assets, tmp_path, monkeypatch, capsys):
    """Online: only LOCAL_RANK 0 calls snapshot_download (the others wait at the barrier, then read the cache), for
    what the readers use (no TF/Flax weights, no .bin copy beside safetensors); an id already cached is not fetched
    again; a failed download is one line naming the flag, before --output_dir is made."""
    cache = str(tmp_path / "hub")
    use_cache(monkeypatch, cache, offline=False)
    calls = []

    def snapshot_download(repo_id, ignore_patterns=None):
        calls.append((repo_id, ignore_patterns))
        if repo_id == "org/missing":
            raise LocalEntryNotFoundError("An error happened\nwhile trying to locate the files")
        return cache_repo(cache, repo_id, assets["llm"] if repo_id == LLM else assets["clip"])

    monkeypatch.setattr(formats.hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(formats.hub, "list_repo_files", lambda repo_id: ["model.safetensors", "tf_model.h5", "x.bin"])
    cfg = parse_args(flags(assets, str(tmp_path / "o"), model_name_or_path=LLM, vision_tower=CLIP))
    formats.check_paths(cfg)  # online: a hub id not cached yet passes, to be downloaded
    with pytest.raises(ValueError, match=f"^--model_name_or_path {LLM}: does not exist .*`hf download {LLM}`"):
        formats.run.fetch_models(cfg, local_rank=1)  # a rank that waits: reads the cache only
    assert calls == []
    formats.run.fetch_models(cfg, local_rank=0)
    assert [repo for repo, _ in calls] == [LLM, CLIP] and {"*.h5", "*.msgpack", "pytorch_model*"} <= set(calls[0][1])
    formats.run.fetch_models(cfg, local_rank=0)  # cached now, with all its weights: no call
    assert len(calls) == 2 and formats.local_folder(LLM, "--model_name_or_path").startswith(cache)
    out = str(tmp_path / "o2")
    assert train.cli(flags(assets, out, vision_tower="org/missing")) == 1
    err = capsys.readouterr().err
    assert err == ("error: --vision_tower org/missing: does not exist (not a local folder, and the Hugging Face Hub "
                   "download failed: LocalEntryNotFoundError: An error happened)\n")  # fmt: skip
    assert not os.path.exists(out)


def _fetch_on_rank(rank: int, world_size: int, caches: list[str], assets: dict, log: str) -> None:
    """One rank of test_one_download_per_node: hub ids, downloads on (a slow fake snapshot_download into this
    node's cache), then formats.run.fetch_models; logs who downloaded and what every rank resolved."""
    import time

    node, local_rank = rank // int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cache = caches[node]
    mp = pytest.MonkeyPatch()
    use_cache(mp, cache, offline=False)

    def snapshot_download(repo_id, ignore_patterns=None):
        time.sleep(1)  # the node's other ranks reach the barrier first and must wait
        open(os.path.join(log, f"download-{rank}-{repo_id.replace('/', '--')}"), "w").close()
        return cache_repo(cache, repo_id, assets["llm"] if repo_id == LLM else assets["clip"])

    mp.setattr(formats.hub, "snapshot_download", snapshot_download)
    mp.setattr(formats.hub, "list_repo_files", lambda repo_id: ["model.safetensors"])
    cfg = parse_args(flags(assets, os.path.join(log, "o"), model_name_or_path=LLM, vision_tower=CLIP))
    formats.check_paths(cfg)
    formats.run.fetch_models(cfg, local_rank, D.barrier)
    with open(os.path.join(log, f"resolved-{rank}"), "w") as f:
        f.write(formats.local_folder(CLIP, "--vision_tower"))


@pytest.mark.dist
@pytest.mark.parametrize("local_world_size", [2, 1])
def test_one_download_per_node(assets, tmp_path, local_world_size):
    """2 ranks on one node: rank 0 downloads, rank 1 waits at the barrier and then reads the cache; as 2 nodes of
    1 rank, each with its own cache, each node's rank downloads."""
    nodes = 2 // local_world_size
    caches, log = [str(tmp_path / f"node{i}" / "hub") for i in range(nodes)], str(tmp_path / "log")
    os.makedirs(log)
    run_distributed(_fetch_on_rank, tmp_path, caches, assets, log, local_world_size=local_world_size)
    downloaded = sorted(name for name in os.listdir(log) if name.startswith("download-"))
    first = range(0, 2, local_world_size)
    assert downloaded == [f"download-{r}-{repo.replace('/', '--')}" for r in first for repo in (LLM, CLIP)]
    for rank in range(2):
        with open(os.path.join(log, f"resolved-{rank}")) as f:
            assert f.read().startswith(caches[rank // local_world_size])


def test_check_data_takes_hub_ids(cache, tmp_path, capsys):
    data, images = write_llava_dataset(str(tmp_path / "data"), n_image=2, n_text=1)
    argv = ["--data_path", data, "--image_folder", images, "--num_workers", "1", "--model_max_length", "64"]
    assert check_data.main([*argv, "--model_name_or_path", LLM, "--vision_tower", CLIP]) == 0
    assert "checked structure, decoded images, tokenization, pixels" in capsys.readouterr().out
    assert check_data.main([*argv, "--vision_tower", "org/not-cached"]) == 2
    assert capsys.readouterr().err.startswith("error: --vision_tower org/not-cached: does not exist (not a local")
