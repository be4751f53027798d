"""Every on-disk format minillava reads or writes, one module per format family, each holding both directions (read
and write) and its key mapping:

- folders.py: Hugging Face model folders in general (config.json, what kind a folder is, pretrained LLM and tower
  weights, the sharded safetensors layout).
- hub.py: Hugging Face Hub ids given for a model flag (the hub cache, downloads).
- llava.py: a LLaVA stage-2 folder (LLaVA's key names, config.json with the mm_* fields).
- llava_hf.py: a llava-hf folder (transformers' LlavaForConditionalGeneration).
- projector.py: mm_projector.bin, the stage-1 output.
- lora_outputs.py: a LoRA run's output_dir (peft's adapter files, non_lora_trainables.bin).
- run.py: a run's start from its flags (disk checks, model configs, rank 0's initial weights).
- manifest.py: manifest.json (what a result depends on beyond its flags).
- records.py: the records cache of a data file.

No torch.distributed: tensors come back as stored; callers cast, shard and gather (outputs.py writes). The names
below are the package's public face (`from minillava.formats import read_settings`); the trainer imports each from
its module.
"""

from minillava.formats.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    SHARD_NAME,
    checkpoint_kind,
    clip_vision_state,
    folder_tower_config,
    pretrained_state_dict,
    read_weights,
    safetensors_header,
    shard_name,
    shard_plan,
)
from minillava.formats.hub import download, fetch, local_folder
from minillava.formats.llava import (
    clip_folder,
    fetch_checkpoint,
    llava_checkpoint_configs,
    llava_config,
    load_llava_checkpoint_state,
    read_settings,
    recorded_name,
    run_settings,
    to_llava_key,
)
from minillava.formats.llava_hf import EMBEDDINGS, build_hf_model, hf_config
from minillava.formats.lora_outputs import NON_LORA, lora_config, lora_content, merged_lora_state, read_lora_output
from minillava.formats.manifest import MANIFEST_NAME, manifest_changes, run_manifest
from minillava.formats.projector import load_mm_projector, mm_projector_content, projector_state, read_mm_projector
from minillava.formats.records import data_sha256, read_records_cache, records_cache_dir, write_records_cache
from minillava.formats.run import check_model_files, check_paths, initial_state, model_names, run_configs
