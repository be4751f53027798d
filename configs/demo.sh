#!/bin/bash
# The CPU demo, nothing downloaded: make a tiny random Vicuna-like LLM, CLIP tower, tokenizer and a coloured-shapes
# dataset, run stage 1 then stage 2 on 2 processes, and check the model answers "What is the colour of the shape?"
# on held-out images well above chance (1/6). A few minutes on 2 CPU cores.
#   bash configs/demo.sh            (OUT=dir to write elsewhere; default demo_out)
# Flags are LLaVA's v1.5 recipe (--stage presets) sized for a CPU: fp32, batch 8 x 2 ranks, and lr 1e-3 with 3
# epochs in stage 2 because the LLM starts from random weights. minillava/demo.py STAGE{1,2}_FLAGS list the same.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh  # a .venv with CPU torch and minillava, unless `python` already runs minillava
OUT=${OUT:-demo_out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: 2 ranks on 2 cores

python -m minillava.demo --out "$OUT"

torchrun --nproc_per_node 2 train.py \
    --stage 1 \
    --model_name_or_path "$OUT/llm" \
    --version plain \
    --data_path "$OUT/data/pretrain.json" \
    --image_folder "$OUT/data" \
    --vision_tower "$OUT/clip" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 False \
    --output_dir "$OUT/stage1" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 1 \
    --save_steps 0 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 10 \
    --model_max_length 512 \
    --gradient_checkpointing False \
    --dataloader_num_workers 0 \
    --report_to none

torchrun --nproc_per_node 2 train.py \
    --stage 2 \
    --model_name_or_path "$OUT/llm" \
    --version v1 \
    --data_path "$OUT/data/finetune.json" \
    --image_folder "$OUT/data" \
    --vision_tower "$OUT/clip" \
    --pretrain_mm_mlp_adapter "$OUT/stage1/mm_projector.bin" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 False \
    --output_dir "$OUT/stage2" \
    --num_train_epochs 3 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 1 \
    --save_steps 0 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 10 \
    --model_max_length 512 \
    --gradient_checkpointing False \
    --dataloader_num_workers 0 \
    --report_to none

python -m minillava.demo --evaluate --checkpoint "$OUT/stage2" --out "$OUT" --min_accuracy 0.5
echo "demo done: assets in $OUT, projector in $OUT/stage1, model in $OUT/stage2"
