#!/usr/bin/env bash
# The seed's recipe: fine-tune Stable Diffusion v1-4 on pokemon-blip-captions on one 24 GB GPU
# (fp16 mixed precision, gradient checkpointing, EMA; 512 px, batch 1 x 4 accumulation steps, lr 1e-5).
#
#   bash train.sh                                   # the recipe as is (needs a GPU, the hub and a login)
#   MODEL_NAME=... DATASET_NAME=... OUTPUT_DIR=... bash train.sh
#   bash train.sh --max_train_steps=1000 --seed=0   # extra arguments win over the ones below
#
# Run it from any folder: relative paths in MODEL_NAME, DATASET_NAME and OUTPUT_DIR mean that folder.
# LAUNCH_ARGS go to `accelerate launch` (e.g. "--num_processes=2" or "--config_file=..."); without them the
# accelerate config of this machine applies (`accelerate config`). The launch goes through sdtoolkit/launch.py,
# which is `accelerate launch` with the script's own `error:` line last and its exit code (2 for bad input).
# PYTHON is the interpreter to launch with (default: python).
# DATASET_NAME may also be a local folder of images with a metadata.jsonl (file_name, text), or a .parquet file,
# or a kohya-ss dataset config (.toml or .json, or --dataset_config FILE), whose values win over the recipe's.
# kohya-ss's fine-tuning metadata goes in the arguments instead: bash train.sh --in_json meta_cap.json
# --train_data_dir my-images.
# A kohya-ss style --config_file run.toml (this script's flags, one `flag = value` a line) replaces the recipe:
# bash train.sh --config_file run.toml runs the file's flags alone (flags after it still win).
# lambdalabs/pokemon-blip-captions was taken down from the hub in 2024; lambdalabs/naruto-blip-captions has
# the same columns.
set -euo pipefail

MODEL_NAME="${MODEL_NAME:-CompVis/stable-diffusion-v1-4}"
DATASET_NAME="${DATASET_NAME:-lambdalabs/pokemon-blip-captions}"
OUTPUT_DIR="${OUTPUT_DIR:-sd-pokemon-model}"

# A kohya-ss dataset config names the data instead of --dataset_name.
DATA_ARGS=(--dataset_name="$DATASET_NAME")
case "$DATASET_NAME" in *.toml | *.json) DATA_ARGS=(--dataset_config="$DATASET_NAME") ;; esac
for arg in "$@"; do
  case "$arg" in --dataset_config | --dataset_config=* | --in_json | --in_json=*) DATA_ARGS=() ;; esac
done

# The toolkit's folder, for its script and its package; the current folder stays the user's.
TOOLKIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# A --config_file holds the whole run's flags: it takes the place of the recipe below (and of MODEL_NAME,
# DATASET_NAME and OUTPUT_DIR), which as command-line flags would win over it.
for arg in "$@"; do
  case "$arg" in
    --config_file | --config_file=*)
      # shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
      exec env PYTHONPATH="$TOOLKIT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m sdtoolkit.launch \
        ${LAUNCH_ARGS:-} "$TOOLKIT/train_text_to_image.py" "$@"
      ;;
  esac
done

# shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
PYTHONPATH="$TOOLKIT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m sdtoolkit.launch ${LAUNCH_ARGS:-} \
  "$TOOLKIT/train_text_to_image.py" \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  "${DATA_ARGS[@]}" \
  --use_ema \
  --resolution=512 --center_crop --random_flip \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --gradient_checkpointing \
  --mixed_precision=fp16 \
  --max_train_steps=15000 \
  --learning_rate=1e-05 \
  --max_grad_norm=1 \
  --lr_scheduler=constant --lr_warmup_steps=0 \
  --output_dir="$OUTPUT_DIR" \
  "$@"
