#!/usr/bin/env python
"""Fine-tune a Stable Diffusion UNet on image-caption pairs.

The command line is the one of diffusers' examples/text_to_image/train_text_to_image.py: same flags, same
defaults, same checkpoint layout. The VAE and the CLIP text encoder stay frozen; only the UNet trains
(859,520,964 parameters for SD v1-4), unless --train_text_encoder trains the text encoder too (or --lora_rank
trains adapters instead). Run it with `python` or `accelerate launch`:

    accelerate launch train_text_to_image.py \
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
        --dataset_name lambdalabs/pokemon-blip-captions --use_ema --output_dir sd-pokemon-model

`bash train.sh` runs the seed's full recipe; `make demo` runs the same script offline on a tiny model.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import accelerate
import datasets
import diffusers
import numpy as np
import pyarrow
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    DynamoBackend,
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)
from datasets import load_dataset
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_dream_and_update_latents, compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.import_utils import is_xformers_available
from huggingface_hub import create_repo, upload_folder
from PIL import ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import ContextManagers

from sdtoolkit.atomic_files import written_atomically
from sdtoolkit.buckets import BucketBatchSampler, assign_buckets, make_buckets
from sdtoolkit.caption_folders import has_captioned_images, read_caption_folder
from sdtoolkit.checkpoints import (
    checkpoint_dirs,
    checkpoint_step,
    find_resume_checkpoint,
    nonfinite_loss_message,
    read_training_state,
    recount_lr_schedule,
    remove_partial_saves,
    save_checkpoint,
    save_pipeline,
)
from sdtoolkit.clip_windows import (
    emphasize,
    encode_prompts,
    encode_text,
    encode_windows,
    token_mask,
    unsupported_syntax,
)
from sdtoolkit.config_file import config_argv, write_config
from sdtoolkit.data import (
    TrainingExamples,
    affix_caption,
    all_captions,
    as_image_column,
    available_memory,
    balance_regularization,
    caption_lines,
    check_caption_syntax,
    check_captions,
    collate,
    count_long_captions,
    fingerprint,
    has_metadata_file,
    has_wildcards,
    large_row_groups,
    load_parquet,
    load_saved_dataset,
    parquet_files,
    parquet_splits,
    read_large_photos,
    saved_with_save_to_disk,
    scan_images,
    unlisted_images,
    webdataset_columns,
    webdataset_shards,
    with_affixes,
    with_caption_lines,
)
from sdtoolkit.dataset_config import describe_flag, read_dataset_config, read_folders
from sdtoolkit.ema import InPlaceEMAModel
from sdtoolkit.errors import ArgumentParser, TrainingStopped, UserError, first_line, run_main
from sdtoolkit.export import check_sd1, export_single_file, ldm_config_path, single_file_name, training_metadata
from sdtoolkit.held_out import TIMESTEPS as HELD_OUT_TIMESTEPS
from sdtoolkit.held_out import HeldOutLoss, compare, split_held_out
from sdtoolkit.inference import (
    check_file_exists,
    default_guidance_rescale,
    is_single_file,
    load_single_file,
    load_vae,
    looks_like_local_path,
    quiet_diffusers_noise,
    safetensors_metadata,
    sample_as_trained,
    supports_zero_terminal_snr,
)
from sdtoolkit.kohya_metadata import read_kohya_metadata
from sdtoolkit.latent_cache import (
    DEFAULT_DISK_FOLDER,
    DiskArrays,
    MemoryArrays,
    cache_bytes,
    cache_crop,
    cache_key,
    encode_cache,
)
from sdtoolkit.lora import DEFAULT_TARGETS as LORA_TARGETS
from sdtoolkit.lora import (
    EMA_NAME as LORA_EMA_NAME,
)
from sdtoolkit.lora import (
    KOHYA_WEIGHTS_NAME,
    TEXT_ENCODER_TARGETS,
    WEIGHTS_NAME,
    adapted_layer_names,
    adapter_ranks,
    add_lora,
    add_lora_from_file,
    check_lora_path,
    has_lora_weights,
    has_text_encoder_lora,
    kohya_metadata,
    kohya_state_dict,
    load_lora,
    load_lora_ema,
    lora_location,
    max_norm_regularize,
    read_lora,
    save_lora,
    save_lora_ema,
    store_in_float8,
    tag_frequency,
)
from sdtoolkit.losses import (
    HUBER_SCHEDULES,
    LOSS_TYPES,
    THRESHOLD_LOSSES,
    debiased_weights,
    huber_thresholds,
    loss_per_element,
    snr_scale,
)
from sdtoolkit.lycoris import (
    add_lycoris,
    add_lycoris_from_file,
    load_lycoris_weights,
    lycoris_kind,
    lycoris_layers,
    lycoris_ranks,
    read_lycoris,
    read_lycoris_file,
    save_lycoris,
)
from sdtoolkit.output_dir import (
    check_fresh_run,
    check_output_dir,
    flag_changes,
    identity_changes,
    lock_output_dir,
    optimizer_flags,
    run_identity,
    training_data,
    training_flags,
    unlock_output_dir,
)
from sdtoolkit.sample_prompts import SAMPLERS, read_sample_prompts, sampler_scheduler

logger = get_logger(__name__, log_level="INFO")

INTERPOLATION_MODES = [mode.name.lower() for mode in transforms.InterpolationMode]

# --lora_type's adapters, as their authors name them.
ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def adapter_name(args):
    """The run's adapter as the model card and the log name it: a DoRA (--use_dora), or --lora_type's."""
    return "DoRA" if args.use_dora else ADAPTER_NAMES[args.lora_type]


# Flags of kohya-ss's sd-scripts and of diffusers' other training scripts, and what does their work here: an
# error that names one of them says so.
KNOWN_ELSEWHERE = {
    "--shuffle_caption": "--shuffle_tags here",
    "--keep_tokens": "--keep_tags here",
    "--keep_tokens_separator": "--keep_tags_separator here",
    "--min_snr_gamma": "--snr_gamma here",
    "--ip_noise_gamma": "--input_perturbation here",
    "--network_dim": "--lora_rank here",
    "--rank": "--lora_rank here",
    "--network_alpha": "--lora_alpha here",
    "--network_dropout": "--lora_dropout here",
    "--network_weights": "--init_lora here",
    "--network_module": "--lora_rank N here, with --lora_type loha or lokr for LyCORIS's LoHa and LoKr",
    "--fp8_base_unet": "--fp8_base here, which leaves the text encoder as it is unless --train_text_encoder trains it",
    "--network_train_unet_only": "what --lora_rank does here without --train_text_encoder",
    "--unet_lr": "--learning_rate here (--text_encoder_lr for the text encoder)",
    "--optimizer_type": "--optimizer here (AdamW, Adafactor, prodigy; --use_8bit_adam for AdamW8bit)",
    "--enable_bucket": "--aspect_buckets here",
    "--min_bucket_reso": "--min_bucket_side here",
    "--max_bucket_reso": "--max_bucket_side here",
    "--bucket_reso_steps": "--bucket_step here",
    "--xformers": "--enable_xformers_memory_efficient_attention here",
    "--max_train_epochs": "--num_train_epochs here",
    "--save_every_n_steps": "--checkpointing_steps here",
    "--sample_every_n_steps": "--validation_steps here",
    "--sample_every_n_epochs": "--validation_epochs here",
    "--max_data_loader_n_workers": "--dataloader_num_workers here",
    "--cache_latents_to_disk": "--latent_cache_dir DIR here",
    "--alpha_mask": "part of --masked_loss here, which reads the images' alpha channel",
    "--v_parameterization": "--prediction_type v_prediction here",
    "--vae": "--pretrained_vae_model_name_or_path here",
    "--lr_scheduler_num_cycles": "--lr_num_cycles here",
    "--lr_scheduler_power": "--lr_power here",
    "--save_model_as": "--export_single_file here, for one .safetensors file beside the diffusers folder",
    "--save_precision": "--export_single_file here, which writes float16 (python -m sdtoolkit.export can write float32)",
    "--output_name": "the name of the --output_dir folder here, which names the exported file and the LoRA",
    "--flip_aug": "--random_flip here",
    "--random_crop": "what training does without --center_crop here",
    "--save_state": "what every --checkpointing_steps checkpoint holds here (resume it with --resume_from_checkpoint)",
    "--save_last_n_steps": "--checkpoints_total_limit N here, which keeps the last N checkpoints",
    "--sdpa": "the default here (PyTorch's SDPA attention); --enable_xformers_memory_efficient_attention for xformers",
    "--mem_eff_attn": "PyTorch's SDPA attention here, the default; --enable_xformers_memory_efficient_attention for xformers",
    "--full_fp16": "not here: --mixed_precision fp16 keeps float32 weights (--use_8bit_adam, --offload_ema save memory)",
    "--full_bf16": "not here: --mixed_precision bf16 keeps float32 weights (--use_8bit_adam, --offload_ema save memory)",
    "--cache_text_encoder_outputs": "what --cache_latents does here: captions are encoded once with the images",
    "--caption_extention": "--caption_extension here",
    "--log_with": "--report_to here",
    "--log_tracker_name": "--tracker_project_name here",
    "--learning_rate_te": "--text_encoder_lr here",
    "--optimizer_args": (
        "not here: each is a flag of its own (--adam_weight_decay, --adam_beta1, --adam_beta2, --adam_epsilon,"
        " --prodigy_decouple, ...)"
    ),
    "--validate_every_n_steps": "not here: the held-out loss of --validation_split is measured at every checkpoint",
    "--validation_seed": "not needed here: --validation_split holds out images chosen by their contents",
    "--persistent_data_loader_workers": (
        "not here: the --dataloader_num_workers start anew each epoch, which the examples' draws for it rely on"
    ),
    "--network_args": (
        "not read here: --lora_type loha or lokr picks LyCORIS's algo, --lora_target_modules the layers, --lora_rank"
        " and --lora_alpha their size, --lora_conv_rank and --lora_conv_alpha the convolutions' (conv_dim, conv_alpha),"
        " --use_dora LyCORIS's dora_wd"
    ),
    "--resume": "--resume_from_checkpoint here (a checkpoint folder, or latest)",
    "--save_last_n_epochs": "--checkpoints_total_limit N here, which keeps the last N checkpoints",
    "--huggingface_repo_id": "--hub_model_id here, with --push_to_hub",
    "--huggingface_token": (
        "not here: log in with `hf auth login` (or set HF_TOKEN) for --push_to_hub; --hub_token works too, and is never"
        " written to the run's files"
    ),
    "--wandb_api_key": "not here: log in with `wandb login` (or set WANDB_API_KEY) for --report_to wandb",
    "--resize_interpolation": "--image_interpolation_mode here",
    "--dim_from_weights": "what --init_lora does here: the file's ranks and alphas become the run's",
    "--network_train_text_encoder_only": (
        "not here: a LoRA trains the UNet's adapter, and the text encoder's too with --train_text_encoder"
    ),
    "--no_half_vae": (
        "not here: the VAE runs in --mixed_precision's dtype, as in upstream's script (SD 1.x's VAE works in"
        " float16; SDXL's is the one that needs float32)"
    ),
    "--v2": "not needed here: a diffusers model's config says which it is (SD 2's 768 px model with --resolution 768)",
    "--caption_separator": (
        "not here: --in_json joins a caption and its tags with a comma, and --shuffle_tags splits the tags at commas"
    ),
    "--torch_compile": "accelerate's here: `accelerate launch --dynamo_backend inductor` (train.sh's LAUNCH_ARGS)",
    "--dynamo_backend": "accelerate's here: `accelerate launch --dynamo_backend inductor` (train.sh's LAUNCH_ARGS)",
    "--deepspeed": (
        "accelerate's here: `accelerate launch --config_file configs/accelerate/deepspeed_zero2_offload.yaml`"
        " (train.sh's LAUNCH_ARGS; docs/scaling-out.md)"
    ),
    "--zero_stage": "the zero_stage of an accelerate DeepSpeed config here, given to `accelerate launch --config_file`",
    "--validate_every_n_epochs": "not here: the held-out loss of --validation_split is measured at every checkpoint",
    "--max_validation_steps": "not here: the held-out loss of --validation_split is measured on every held-out image",
    "--lr_scheduler_type": "--lr_scheduler here, one of diffusers' schedules (with --lr_warmup_steps, --lr_num_cycles)",
    "--lr_scheduler_args": "not here: --lr_scheduler's schedules take --lr_warmup_steps, --lr_num_cycles and --lr_power",
    "--log_config": "what --report_to does here: the run's flags are logged to its trackers (not --hub_token)",
    "--wandb_run_name": "not here: --tracker_project_name names the project in wandb (--report_to wandb)",
    "--text_encoder_batch_size": "--vae_batch_size here, which sets the captions' batch too when they are cached",
    "--cache_text_encoder_outputs_to_disk": "--latent_cache_dir DIR here, which keeps the encoded captions too",
    "--use_lion_optimizer": "not here: --optimizer offers AdamW, Adafactor and prodigy",
}


def square_side(text):
    """--resolution: one side in pixels, or kohya-ss's "W,H" when it is square."""
    sides = [side.strip() for side in text.split(",")]
    if len(sides) == 2 and sides[0] == sides[1]:
        sides = sides[:1]
    if len(sides) != 1 or not sides[0].lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(
            f"give one side in pixels, not {text!r}: training is at one square resolution (other aspect ratios go in"
            " buckets: --aspect_buckets)"
        )
    return int(sides[0])


def warmup_steps(text):
    """--lr_warmup_steps: a whole number of steps, or a fraction from 0 to 1 of the training steps (kohya-ss's)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of steps, or a fraction below 1 of them, not {text!r}")
    return fraction


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Fine-tune a Stable Diffusion UNet on image-caption pairs.", known_elsewhere=KNOWN_ELSEWHERE
    )
    parser.add_argument(
        "--input_perturbation", type=float, default=0, help="The scale of input perturbation. Recommended 0.1."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        required=True,
        help=(
            "Path to pretrained model or model identifier from huggingface.co/models. Also one SD 1.x .safetensors"
            " file in the original layout (as AUTOMATIC1111 and ComfyUI load, or --export_single_file writes)."
        ),
    )
    parser.add_argument(
        "--model_config",
        type=str,
        default=None,
        help=(
            "For a --pretrained_model_name_or_path that is one file: a diffusers SD 1.x pipeline (folder or hub"
            " id) whose configs match it, e.g. CompVis/stable-diffusion-v1-4. Found by itself when the file sits"
            " in a pipeline folder or names a local one in its metadata; else diffusers takes SD 1.5's from the hub."
        ),
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help=(
            "A VAE to train and save with instead of the base model's (kohya-ss's --vae; diffusers' SDXL script's"
            " flag): a diffusers VAE folder or hub id, e.g. stabilityai/sd-vae-ft-mse, or one .safetensors VAE file"
            " as AUTOMATIC1111 loads, e.g. vae-ft-mse-840000-ema-pruned.safetensors."
        ),
    )
    parser.add_argument(
        "--revision",
        type=str,
        default=None,
        required=False,
        help="Revision of pretrained model identifier from huggingface.co/models.",
    )
    parser.add_argument(
        "--variant",
        type=str,
        default=None,
        help="Variant of the model files of the pretrained model identifier from huggingface.co/models, 'e.g.' fp16",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "The name of the Dataset (from the HuggingFace hub) to train on (could be your own, possibly private,"
            " dataset). It can also be a path pointing to a local copy of a dataset in your filesystem,"
            " or to a folder containing files that 🤗 Datasets can understand."
        ),
    )
    parser.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The config of the Dataset, leave as None if there's only one config.",
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help=(
            "A folder containing the training data. Folder contents must follow the structure described in"
            " https://huggingface.co/docs/datasets/image_dataset#imagefolder. In particular, a `metadata.jsonl` file"
            " must exist to provide the captions for the images. Ignored if `dataset_name` is specified."
        ),
    )
    parser.add_argument(
        "--image_column", type=str, default="image", help="The column of the dataset containing an image."
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="The column of the dataset containing a caption or a list of captions.",
    )
    # LoRA (not upstream): see sdtoolkit/lora.py.
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help=(
            "Train LoRA adapters of this rank on the frozen UNet instead of all its weights; the output is"
            " pytorch_lora_weights.safetensors (StableDiffusionPipeline.load_lora_weights reads it) and the same"
            " adapter in kohya-ss keys for AUTOMATIC1111 and ComfyUI (pytorch_lora_weights_kohya.safetensors)."
        ),
    )
    parser.add_argument(
        "--lora_alpha", type=float, default=None, help="LoRA's alpha: updates scale by alpha/rank. Default: the rank."
    )
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA path.")
    parser.add_argument(
        "--lora_conv_rank",
        type=int,
        default=None,
        help=(
            "With --lora_rank, the rank of the adapters on the targeted 3x3 convolutions (kohya-ss's LoCon conv_dim;"
            " add conv1 conv2 to --lora_target_modules). Default: --lora_rank."
        ),
    )
    parser.add_argument(
        "--lora_conv_alpha",
        type=float,
        default=None,
        help="With --lora_conv_rank, their alpha (kohya-ss's conv_alpha). Default: --lora_conv_rank.",
    )
    parser.add_argument(
        "--lora_type",
        choices=["lora", "loha", "lokr"],
        default="lora",
        help=(
            "With --lora_rank: the adapter's kind. lora: B @ A. loha and lokr: LyCORIS's LoHa (the elementwise product"
            " of two low-rank products) and LoKr (a Kronecker product of two small factors), saved in LyCORIS's"
            " keys, which AUTOMATIC1111, ComfyUI, gradio_app.py and metrics.py load (diffusers' load_lora_weights"
            " does not)."
        ),
    )
    parser.add_argument(
        "--use_dora",
        action="store_true",
        help=(
            "With --lora_rank: train DoRA adapters (arXiv 2402.09353, as diffusers' DreamBooth LoRA scripts do): each"
            " adapted weight's magnitude per output trains apart from its direction, which the LoRA changes. Saved"
            " in diffusers' keys only (pytorch_lora_weights.safetensors); no kohya-ss file, since AUTOMATIC1111"
            " reads DoRA magnitudes per input (--export_single_file merges it into a model it loads)."
        ),
    )
    parser.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=LORA_TARGETS,
        help="The UNet layers that get adapters (names or suffixes): its attention projections by default.",
    )
    parser.add_argument(
        "--init_lora",
        default=None,
        help=(
            "Go on training an existing LoRA instead of a new one (kohya-ss's --network_weights): a LoRA run's"
            " folder or checkpoint, or one .safetensors file in diffusers' or kohya-ss keys (as AUTOMATIC1111 loads),"
            " a LoHa or LoKr file too. Its kind, rank, alpha and layers are kept, so it implies --lora_type and"
            " --lora_rank; a text encoder adapter in it needs --train_text_encoder."
        ),
    )
    parser.add_argument(
        "--train_text_encoder",
        action="store_true",
        help=(
            "Train the text encoder too. With --lora_rank, a LoRA of the same rank and alpha on its attention"
            " projections (q_proj, k_proj, v_proj, out_proj), as kohya-ss does by default, saved in the same files;"
            " without, all of its weights, as kohya-ss's fine_tune.py does (saved in the pipeline's text_encoder/,"
            " averaged too with --use_ema). Captions are then encoded at every step, not cached."
        ),
    )
    parser.add_argument(
        "--stop_text_encoder_training",
        type=int,
        default=None,
        help=(
            "With --train_text_encoder, train the text encoder (or its LoRA) for this many optimizer steps only; the"
            " UNet goes on (kohya-ss's train_db.py flag). Default: to the end."
        ),
    )
    parser.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="The learning rate of the text encoder (--train_text_encoder). Default: --learning_rate.",
    )
    parser.add_argument(
        "--fp8_base",
        action="store_true",
        help=(
            "With --lora_rank (kohya-ss's flag): keep the frozen UNet's weights, and with --train_text_encoder the"
            " text encoder's, in float8, each layer cast up to the training precision while it runs: half the"
            " UNet's memory under fp16 or bf16, a quarter under float32. It pays off with --gradient_checkpointing."
            " The adapter learns on the rounded weights."
        ),
    )
    parser.add_argument(
        "--scale_weight_norms",
        type=float,
        default=None,
        help=(
            "With --lora_rank (kohya-ss's flag): after each step, scale down any adapter whose update's norm is above"
            " this (1 is kohya-ss's suggestion), against updates that grow without bound. Logged as lora_keys_scaled."
        ),
    )
    # Export (not upstream): see sdtoolkit/export.py.
    parser.add_argument(
        "--export_single_file",
        action="store_true",
        help=(
            "At the end, also write the pipeline as one .safetensors file in the original SD 1.x layout (float16,"
            " the EMA weights with --use_ema), OUTPUT_DIR/<its name>.safetensors, as AUTOMATIC1111 and ComfyUI load"
            " it; with --lora_rank, the LoRA merged into the base model. Any pipeline folder, checkpoint or LoRA:"
            " python -m sdtoolkit.export FOLDER OUT.safetensors."
        ),
    )
    # Speed and memory options of this toolkit (not upstream). See BENCHMARKS.md for what each one buys.
    parser.add_argument(
        "--cache_latents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Encode every caption with the text encoder once, and, with --center_crop, every image (and its mirror"
            " image with --random_flip) with the VAE once, then free the encoders. Each step still draws its own"
            " latent sample. Random crops can't be cached: their images are encoded at every step."
        ),
    )
    parser.add_argument(
        "--vae_batch_size",
        type=int,
        default=8,
        help=(
            "kohya-ss's flag: how many images the VAE encodes at once for --cache_latents (and captions the text"
            " encoder). kohya-ss's default is 1; 8 caches faster. Lower it if caching runs out of GPU memory."
        ),
    )
    parser.add_argument(
        "--latent_cache_dir",
        type=str,
        default=None,
        help=(
            "Keep the --cache_latents cache on disk in this folder, mapped into memory, under a key of the model,"
            " data, resolution, buckets and precision, so that a later run with the same ones reads it instead of"
            " encoding again. Without it the cache is kept in memory, or, when it would take more than half of"
            " the free memory, on disk in ~/.cache/sdtoolkit/latents."
        ),
    )
    parser.add_argument(
        "--fused_adam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Use torch's fused AdamW kernel (one kernel for all weights; CPU and CUDA) instead of the per-tensor loop.",
    )
    parser.add_argument(
        "--inplace_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Update the EMA weights with one in-place multi-tensor lerp (no temporary copy) instead of diffusers' loop.",
    )
    parser.add_argument(
        "--channels_last", action="store_true", help="Keep the UNet's weights and activations in channels-last layout."
    )
    parser.add_argument(
        "--skip_invalid_images",
        action="store_true",
        help=(
            "Drop (and count) the images that can't be decoded instead of stopping before training. Not upstream:"
            " without it, unreadable files are listed by name and training does not start."
        ),
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help=(
            "For debugging purposes or quicker training, truncate the number of training examples to this "
            "value if set."
        ),
    )
    parser.add_argument(
        "--validation_prompts",
        type=str,
        default=None,
        nargs="+",
        help=(
            "A set of prompts evaluated every `--validation_epochs` and logged to `--report_to`. Read as gradio_app.py"
            " reads prompts: AUTOMATIC1111's emphasis ((word:1.2)) and BREAK, and whole past 77 tokens."
        ),
    )
    parser.add_argument(
        "--sample_prompts",
        type=str,
        default=None,
        help=(
            "The validation prompts from kohya-ss's prompt file instead: a .txt file, one a line, each with its own"
            " settings after it (--n negative prompt, --w width, --h height, --d seed, --l guidance scale, --s"
            " steps, --ss sampler), or a .toml or .json file that names them (see sdtoolkit/sample_prompts.py)."
        ),
    )
    parser.add_argument(
        "--sample_sampler",
        type=str.lower,
        default=None,
        choices=list(SAMPLERS),
        help=(
            "kohya-ss's: the sampler of the validation images, by sd-scripts' name (a --sample_prompts line's --ss"
            " wins). Default: the model's own scheduler, as upstream."
        ),
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sd-model-finetuned",
        help="The output directory where the model predictions and checkpoints will be written.",
    )
    # Other optimizers (not upstream's text_to_image script; the flags of diffusers' DreamBooth scripts).
    parser.add_argument(
        "--optimizer",
        type=str.lower,
        default="adamw",
        choices=["adamw", "adafactor", "prodigy"],
        help=(
            'The optimizer, in any case. "AdamW" (default; 8-bit with --use_8bit_adam). "Adafactor": torch\'s'
            " (arXiv 1804.04235), which keeps no first moment and the second one factored into a row and a column"
            " per weight matrix, so almost no state where AdamW keeps 8 bytes per trained weight; it takes"
            ' --learning_rate and --adam_weight_decay. "prodigy": prodigyopt\'s Prodigy (arXiv 2306.06101), which'
            " estimates the step size itself: give it --learning_rate 1.0 (a multiplier of its estimate); it keeps"
            " 16 bytes per trained weight, and takes --adam_beta1/2, --adam_epsilon and --adam_weight_decay."
        ),
    )
    parser.add_argument(
        "--prodigy_beta3",
        type=float,
        default=None,
        help="Prodigy's beta3, the decay of its step-size estimate's running averages (default: the square root of beta2).",
    )
    parser.add_argument(
        "--prodigy_decouple",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: apply the weight decay to the weights directly, as AdamW does (default), not through the gradient.",
    )
    parser.add_argument(
        "--prodigy_use_bias_correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: Adam's bias correction of the moments (default on, as in diffusers' DreamBooth scripts).",
    )
    parser.add_argument(
        "--prodigy_safeguard_warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prodigy: leave the learning rate out of its step-size estimate's denominator, for a stable warm-up.",
    )

    # A held-out loss (not upstream): see sdtoolkit/held_out.py.
    parser.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help=(
            "Hold out this share of the images (e.g. 0.1) from training, and measure the loss on them at fixed"
            " timesteps and noise at the start, at every checkpoint and at the end (logged as validation_loss)."
        ),
    )
    # Your data as it is (not upstream): caption-file folders, repeats, caption dropout, tag shuffling.
    parser.add_argument(
        "--caption_extension",
        type=str,
        default=".txt",
        help=(
            "In a folder of images with their captions in same-named text files (read when the folder has no"
            " metadata file), the captions' extension: .txt, or .caption as some tools write."
        ),
    )
    parser.add_argument(
        "--caption_from_filename",
        action="store_true",
        help=(
            "In a caption-file folder, caption each image that has no caption file by its file name: its stem, with"
            " underscores as spaces (a_red_dragon.png: 'a red dragon'), as SimpleTuner's caption_strategy filename."
            " A caption file still wins."
        ),
    )
    parser.add_argument(
        "--allow_missing_captions",
        action="store_true",
        help=(
            "In a caption-file folder (or --in_json), train images without a caption file (or with an empty one) on"
            " an empty caption."
        ),
    )
    parser.add_argument(
        "--in_json",
        type=str,
        default=None,
        help=(
            "kohya-ss's fine-tuning metadata file (.json, or .jsonl), as its fine_tune.py reads it: each image's key"
            " (a path, absolute or in --train_data_dir, with or without its extension) to its caption and tags."
        ),
    )
    parser.add_argument(
        "--reg_data_dir",
        type=str,
        default=None,
        help=(
            "A caption-file folder of regularization images (kohya-ss's reg_data_dir, DreamBooth's class images):"
            " each epoch also trains on as many examples of them as of the training images, their loss weighed by"
            " --prior_loss_weight, so the model keeps drawing what their captions name."
        ),
    )
    parser.add_argument(
        "--dataset_config",
        type=str,
        default=None,
        help=(
            "A kohya-ss sd-scripts dataset config (.toml or .json) instead of --train_data_dir and --reg_data_dir:"
            " its [[datasets.subsets]] image folders with their num_repeats, class_tokens, caption_extension and"
            " is_reg, and its data options as this script's flags (resolution, batch_size, enable_bucket,"
            " shuffle_caption, keep_tokens, flip_aug, ...), which must then hold for every subset."
        ),
    )
    parser.add_argument(
        "--prior_loss_weight",
        type=float,
        default=1.0,
        help="The weight of the regularization images' loss (--reg_data_dir), against 1 for the training images.",
    )
    parser.add_argument(
        "--dataset_repeats",
        type=int,
        default=1,
        help=(
            "Show every image this many times per epoch. In a caption-file folder, a sub-folder named N_name also"
            " repeats its images N times (kohya-ss's convention); the two multiply."
        ),
    )
    parser.add_argument(
        "--caption_prefix",
        type=str,
        default=None,
        help=(
            "Words put before every caption (training and regularization images'), kohya-ss's flag: e.g. 'sks,'"
            " to make the trigger word the first tag. Added as read, before tags are shuffled or dropped."
        ),
    )
    parser.add_argument(
        "--caption_suffix", type=str, default=None, help="Words put after every caption, as --caption_prefix."
    )
    parser.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="Train this share of examples with an empty caption (what classifier-free guidance needs), e.g. 0.1.",
    )
    parser.add_argument(
        "--shuffle_tags",
        action="store_true",
        help="Shuffle the comma-separated tags of each caption at every step, keeping the first --keep_tags in place.",
    )
    parser.add_argument(
        "--caption_tag_dropout_rate",
        type=float,
        default=0.0,
        help="Leave out each comma-separated tag after the first --keep_tags at this rate, drawn at every step, e.g. 0.1.",
    )
    parser.add_argument(
        "--keep_tags",
        type=int,
        default=0,
        help="With --shuffle_tags or --caption_tag_dropout_rate, the number of leading tags kept as they are.",
    )
    parser.add_argument(
        "--keep_tags_separator",
        type=str,
        default=None,
        help=(
            'With --shuffle_tags or --caption_tag_dropout_rate (kohya-ss\'s keep_tokens_separator, e.g. "|||"): in a'
            " caption that holds it, the tags before it are kept as they are instead of the first --keep_tags, and"
            " those after a second one stay at the end. The separators are not trained on."
        ),
    )
    parser.add_argument(
        "--enable_wildcard",
        action="store_true",
        help=(
            "kohya-ss's flag: a caption of several lines (a caption file's, or any caption's) is that many captions,"
            " one drawn per example, and in a caption {red|blue|green} is one of them, drawn per example ({{ and }}"
            " are braces). Without it a caption's lines are read as one caption, and braces as text."
        ),
    )
    # Aspect-ratio buckets (not upstream): see sdtoolkit/buckets.py.
    parser.add_argument(
        "--aspect_buckets",
        action="store_true",
        help=(
            "Train each image at the bucket shape nearest its aspect ratio (about --resolution² pixels, sides"
            " multiples of --bucket_step) instead of a square crop; every batch holds one bucket."
        ),
    )
    parser.add_argument(
        "--bucket_step", type=int, default=64, help="Buckets' sides are multiples of this (64 for SD)."
    )
    parser.add_argument(
        "--min_bucket_side", type=int, default=None, help="Shortest bucket side (default: --resolution / 2)."
    )
    parser.add_argument(
        "--max_bucket_side", type=int, default=None, help="Longest bucket side (default: 2 x --resolution)."
    )
    parser.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="Never enlarge an image: only buckets that fit inside it; images smaller than every bucket are left out.",
    )
    # One run per output folder (not upstream): see sdtoolkit/output_dir.py.
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help=(
            "Start a new run in an --output_dir that holds an earlier run's checkpoints or model, deleting what that"
            " run wrote there. Without it such a folder is refused: resume it, or choose another --output_dir."
        ),
    )
    parser.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="The directory where the downloaded models and datasets will be stored.",
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--resolution",
        type=square_side,
        default=512,
        help=(
            "The resolution for input images, all the images in the train/validation dataset will be resized to this"
            " resolution"
        ),
    )
    parser.add_argument(
        "--center_crop",
        default=False,
        action="store_true",
        help=(
            "Whether to center crop the input images to the resolution. If not set, the images will be randomly"
            " cropped. The images will be resized to the resolution first before cropping."
        ),
    )
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="whether to randomly flip images horizontally",
    )
    parser.add_argument(
        "--clip_skip",
        type=int,
        default=1,
        help=(
            "Read the captions from the text encoder's N-th layer from the end (through its final layer norm), as"
            " kohya-ss's --clip_skip and AUTOMATIC1111's \"Clip skip\" do: 2 for a base model made for it (NovelAI's"
            " and most anime models). Serve and score the result the same way (gradio_app.py --clip_skip)."
        ),
    )
    parser.add_argument(
        "--max_token_length",
        type=int,
        default=75,
        choices=[75, 150, 225],
        help=(
            "Read captions up to this many tokens (not upstream; kohya-ss's flag). Above 75, CLIP's limit, a caption"
            " is read in windows of 75 tokens, each encoded on its own, as AUTOMATIC1111 and gradio_app.py read long"
            " prompts (see sdtoolkit/clip_windows.py); a caption's empty windows are masked out of the UNet's"
            " cross-attention, so a short caption conditions the UNet as at 75."
        ),
    )
    parser.add_argument(
        "--weighted_captions",
        action="store_true",
        help=(
            "Read captions as prompts are read (not upstream; kohya-ss's flag): AUTOMATIC1111's emphasis, e.g."
            ' "a (red:1.3) dragon" or "((red)) dragon", weighs those words\' embeddings, and BREAK starts a new'
            " window (see sdtoolkit/clip_windows.py). Without it, brackets and weights are read as words. With"
            " --shuffle_tags or --caption_tag_dropout_rate, which split captions at commas, a comma inside brackets"
            " is refused."
        ),
    )
    parser.add_argument(
        "--masked_loss",
        action="store_true",
        help=(
            "Learn only where the images are opaque (not upstream; kohya-ss's --masked_loss with --alpha_mask): the"
            " loss at each latent pixel is weighed by the image's opacity there, so transparent backgrounds are not"
            " learned. Images without an alpha channel are learned whole."
        ),
    )
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="The image interpolation method to use for resizing images.",
    )
    parser.add_argument(
        "--train_batch_size", type=int, default=16, help="Batch size (per device) for the training dataloader."
    )
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform.  If provided, overrides num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of updates steps to accumulate before performing a backward/update pass.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="Initial learning rate (after the potential warmup period) to use.",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help=(
            'The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial",'
            ' "constant", "constant_with_warmup"]'
        ),
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=warmup_steps,
        default=500,
        help=(
            "Number of steps for the warmup in the lr scheduler; a fraction below 1 is that share of the training"
            " steps (as kohya-ss reads it, e.g. 0.05)."
        ),
    )
    # The two schedules' shapes (not upstream here; the flags of diffusers' DreamBooth and LoRA scripts).
    parser.add_argument(
        "--lr_num_cycles",
        type=int,
        default=1,
        help="With --lr_scheduler cosine_with_restarts: how many cosine cycles, each starting again from the top.",
    )
    parser.add_argument(
        "--lr_power",
        type=float,
        default=1.0,
        help="With --lr_scheduler polynomial: the power of the decay (1 is linear).",
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="SNR weighting gamma to be used if rebalancing the loss. Recommended value is 5.0. "
        "More details here: https://arxiv.org/abs/2303.09556.",
    )
    parser.add_argument(
        "--dream_training",
        action="store_true",
        help=(
            "Use the DREAM training method, which makes training more efficient and accurate at the "
            "expense of doing an extra forward pass. See: https://arxiv.org/abs/2312.00210"
        ),
    )
    parser.add_argument(
        "--dream_detail_preservation",
        type=float,
        default=1.0,
        help="Dream detail preservation factor p (should be greater than 0; default=1.0, as suggested in the paper)",
    )
    # The loss (not upstream; kohya-ss's flags): robust losses, debiased estimation, a range of timesteps.
    parser.add_argument(
        "--loss_type",
        default="l2",
        choices=LOSS_TYPES,
        help=(
            "The loss between the UNet's prediction and its target: l2 (squared error, upstream's), l1, or huber and"
            " smooth_l1, squared for small errors and linear past a threshold, so that a few broken or badly"
            " captioned images pull less on the weights (see sdtoolkit/losses.py)."
        ),
    )
    parser.add_argument(
        "--huber_schedule",
        default=None,
        choices=HUBER_SCHEDULES,
        help=(
            "With --loss_type huber or smooth_l1, the threshold at each timestep: snr (the default; about 1 at low"
            " noise, --huber_c at high noise), exponential (from 1 down to --huber_c), or constant (--huber_c)."
        ),
    )
    parser.add_argument(
        "--huber_c",
        type=float,
        default=None,
        help="With --loss_type huber or smooth_l1, the threshold the schedule goes down to, above 0 (default 0.1).",
    )
    parser.add_argument(
        "--huber_scale",
        type=float,
        default=None,
        help="With --huber_schedule constant or exponential, multiply the threshold by this (default 1), as kohya-ss.",
    )
    parser.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="Weigh each example by 1/sqrt(SNR) of its timestep (arXiv 2310.08442), as kohya-ss's flag does.",
    )
    parser.add_argument(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help=(
            "With v-prediction, weigh each example's loss by SNR/(SNR+1), which makes it the loss of the noise the"
            " prediction implies: the timesteps weigh as a noise-predicting model's do (kohya-ss's flag)."
        ),
    )
    parser.add_argument(
        "--v_pred_like_loss",
        type=float,
        default=None,
        help=(
            "With noise prediction, add this share of the loss in v that the prediction implies, which weighs the"
            " noisy timesteps more (kohya-ss's flag, e.g. 0.1)."
        ),
    )
    parser.add_argument(
        "--min_timestep",
        type=int,
        default=None,
        help="Train on timesteps from this one on (default 0, the least noise).",
    )
    parser.add_argument(
        "--max_timestep",
        type=int,
        default=None,
        help="Train on timesteps below this one (default: the schedule's count, 1000 for SD).",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="Whether or not to use 8-bit Adam from bitsandbytes."
    )
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help=(
            "Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training. For more information, see"
            " https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices"
        ),
    )
    parser.add_argument("--use_ema", action="store_true", help="Whether to use EMA model.")
    parser.add_argument("--offload_ema", action="store_true", help="Offload EMA model to CPU during training step.")
    parser.add_argument("--foreach_ema", action="store_true", help="Use faster foreach implementation of EMAModel.")
    parser.add_argument(
        "--non_ema_revision",
        type=str,
        default=None,
        required=False,
        help=(
            "Revision of pretrained non-ema model identifier. Must be a branch, tag or git identifier of the local or"
            " remote repository specified with --pretrained_model_name_or_path."
        ),
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Number of subprocesses to use for data loading. 0 means that the data will be loaded in the main process.",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer")
    parser.add_argument(
        "--max_grad_norm", default=1.0, type=float, help="Max gradient norm; 0 for no clipping (as kohya-ss reads it)."
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help=(
            "The prediction_type that shall be used for training. Choose between 'epsilon' or 'v_prediction' or leave"
            " `None`. If left to `None` the default prediction type of the scheduler:"
            " `noise_scheduler.config.prediction_type` is chosen."
        ),
    )
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The name of the repository to keep in sync with the local `output_dir`.",
    )
    parser.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help=(
            "[TensorBoard](https://www.tensorflow.org/tensorboard) log directory. Will default to"
            " *output_dir/runs/**CURRENT_DATETIME_HOSTNAME***."
        ),
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help=(
            "Whether to use mixed precision. Choose between fp16 and bf16 (bfloat16). Bf16 requires PyTorch >="
            " 1.10.and an Nvidia Ampere GPU.  Default to the value of accelerate config of the current system or the"
            " flag passed with the `accelerate.launch` command. Use this argument to override the accelerate config."
        ),
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help=(
            'The integration to report the results and logs to. Supported platforms are `"tensorboard"`'
            ' (default), `"wandb"` and `"comet_ml"`. Use `"all"` to report to all integrations.'
        ),
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help=(
            "Save a checkpoint of the training state every X updates. These checkpoints are only suitable for resuming"
            " training using `--resume_from_checkpoint`."
        ),
    )
    parser.add_argument(
        "--save_every_n_epochs",
        type=int,
        default=None,
        help=(
            "Also save a checkpoint at the end of every N-th epoch (not upstream; kohya-ss's flag). The last epoch's"
            " is the final save."
        ),
    )
    parser.add_argument(
        "--save_state_on_train_end",
        action="store_true",
        help=(
            "Also save a checkpoint at the last step when it is not a --checkpointing_steps one, to go on from with a"
            " longer --max_train_steps (not upstream; kohya-ss's flag)."
        ),
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Max number of checkpoints to store.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help=(
            "Whether training should be resumed from a previous checkpoint. Use a path saved by"
            ' `--checkpointing_steps`, or `"latest"` to automatically select the last available checkpoint.'
        ),
    )
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers."
    )
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    # Zero terminal SNR (not upstream; kohya-ss's flag).
    parser.add_argument(
        "--zero_terminal_snr",
        action="store_true",
        help=(
            "Rescale the noise schedule so that its last timestep is pure noise (zero SNR), as Lin et al. 2023"
            " (arXiv 2305.08891) do, so the model learns to make images from noise alone, as it must when sampling"
            " (SD's schedule leaves some of the image in, and the model never learns very dark or bright images)."
            " Needs --prediction_type v_prediction. The saved pipeline samples with DDIM from the last timestep."
        ),
    )
    # A random strength per example (not upstream; kohya-ss's flags).
    parser.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="Give each example a noise offset of a random strength from 0 to --noise_offset.",
    )
    parser.add_argument(
        "--adaptive_noise_scale",
        type=float,
        default=None,
        help=(
            "Add this times the absolute mean of each latent channel to its --noise_offset (kohya-ss's flag): more"
            " offset for images far from mid-grey in a channel. Needs --noise_offset."
        ),
    )
    parser.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="Give each example an input perturbation of a random strength from 0 to --input_perturbation.",
    )
    # Multi-resolution noise (not upstream; kohya-ss's flags, see multires_noise in sdtoolkit/data.py).
    parser.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=0,
        help=(
            "Add to the noise noise drawn at this many sizes, from the full size down, each 2 to 4 times smaller than"
            " the last (kohya-ss suggests 6 to 10); 0: white noise alone."
        ),
    )
    parser.add_argument(
        "--multires_noise_discount",
        type=float,
        default=None,
        help="With --multires_noise_iterations, how much each coarser size weighs relative to the last (default 0.3).",
    )
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=5,
        help="Run validation every X epochs.",
    )
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help=(
            "Draw the validation images every N optimizer steps instead of every --validation_epochs (not upstream;"
            " kohya-ss's --sample_every_n_steps): for data sets whose epochs are long."
        ),
    )
    parser.add_argument(
        "--sample_at_first",
        action="store_true",
        help=(
            "Also draw the validation images before the first step, from the base model, to compare the later ones"
            " with (not upstream; kohya-ss's flag)."
        ),
    )
    # kohya-ss's config files (not upstream): see sdtoolkit/config_file.py.
    parser.add_argument(
        "--config_file",
        type=str,
        default=None,
        help=(
            "A TOML file of this script's flags, `flag = value` a line (kohya-ss's flag); the command line's flags"
            " win over it. With --output_config, the file to write."
        ),
    )
    parser.add_argument(
        "--output_config",
        action="store_true",
        help="Write the flags given (those not at their defaults) to --config_file, and stop (kohya-ss's flag).",
    )
    parser.add_argument(
        "--tracker_project_name",
        type=str,
        default="text2image-fine-tune",
        help=(
            "The `project_name` argument passed to Accelerator.init_trackers for"
            " more information see https://huggingface.co/docs/accelerate/v0.17.0/en/package_reference/accelerator#accelerate.Accelerator"
        ),
    )

    # kohya-ss's --config_file: the file's flags go before the command line's, which win (see
    # sdtoolkit/config_file.py). With --output_config, the command line's flags are written to it instead.
    argv = sys.argv[1:] if argv is None else list(argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config_file")
    peek.add_argument("--output_config", action="store_true")
    given, _ = peek.parse_known_args(argv)
    if given.config_file is not None and not given.output_config:
        argv = config_argv(given.config_file, parser, KNOWN_ELSEWHERE) + argv
    args = parser.parse_args(argv)
    if args.output_config:
        if args.config_file is None:
            raise UserError("--output_config writes the flags to --config_file FILE, which is not given")
        print(f"Wrote the flags to {write_config(args.config_file, parser, args)}")
        raise SystemExit(0)
    # A kohya-ss dataset config names the data and sets data flags, over the command line's as in sd-scripts
    # (see sdtoolkit/dataset_config.py; the log lists them).
    if args.dataset_config is not None:
        for flag in ("dataset_name", "train_data_dir", "reg_data_dir"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} and --dataset_config both name training data: give it in one of them")
        config_flags, _ = read_dataset_config(args.dataset_config, caption_extension=args.caption_extension)
        vars(args).update(config_flags)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank

    # Sanity checks: one line each, before anything is loaded.
    if args.dataset_name is None and args.train_data_dir is None and args.dataset_config is None and not args.in_json:
        raise UserError(
            "need either --dataset_name (a hub dataset), --train_data_dir (a local folder) or --dataset_config (a"
            " kohya-ss dataset config)"
        )
    if args.in_json is not None and (args.dataset_name is not None or args.dataset_config is not None):
        raise UserError(
            "--in_json lists the training images, in --train_data_dir or by their whole paths: drop"
            f" {'--dataset_name' if args.dataset_name is not None else '--dataset_config'}"
        )
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise UserError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}"
        )
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_epochs",
                 "vae_batch_size"):  # fmt: skip
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("checkpoints_total_limit", "max_train_steps", "max_train_samples", "validation_steps",
                 "save_every_n_epochs"):  # fmt: skip
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.lr_num_cycles < 1:
        raise UserError(f"--lr_num_cycles must be at least 1, got {args.lr_num_cycles}")
    if not (math.isfinite(args.lr_power) and args.lr_power > 0):
        raise UserError(f"--lr_power must be a positive number, got {args.lr_power}")
    for flag, default, schedule in (("lr_num_cycles", 1, "cosine_with_restarts"), ("lr_power", 1.0, "polynomial")):
        if getattr(args, flag) != default and args.lr_scheduler != schedule:
            raise UserError(f"--{flag} shapes --lr_scheduler {schedule}, not {args.lr_scheduler}")
    if args.num_train_epochs < 1:
        raise UserError(f"--num_train_epochs must be at least 1, got {args.num_train_epochs}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    for flag in ("noise_offset", "input_perturbation", "max_grad_norm"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise UserError(f"--{flag} must be a number >= 0, got {getattr(args, flag)}")
    if args.aspect_buckets:
        if args.bucket_step < 8 or args.bucket_step % 8:
            raise UserError(f"--bucket_step must be a multiple of 8 (the VAE's block), got {args.bucket_step}")
        if args.min_bucket_side is None:
            args.min_bucket_side = max(args.bucket_step, args.resolution // 2 // args.bucket_step * args.bucket_step)
        if args.max_bucket_side is None:
            args.max_bucket_side = max(args.bucket_step, args.resolution * 2 // args.bucket_step * args.bucket_step)
        if not 0 < args.min_bucket_side <= args.max_bucket_side:
            raise UserError(
                f"--min_bucket_side ({args.min_bucket_side}) must be positive and at most --max_bucket_side"
                f" ({args.max_bucket_side})"
            )
    if not 0 <= args.validation_split < 1:
        raise UserError(f"--validation_split must be at least 0 and less than 1, got {args.validation_split}")
    if args.dataset_repeats < 1:
        raise UserError(f"--dataset_repeats must be at least 1, got {args.dataset_repeats}")
    if args.reg_data_dir is not None and not os.path.isdir(args.reg_data_dir):
        raise UserError(f"--reg_data_dir {args.reg_data_dir} is not a folder")
    if not (math.isfinite(args.prior_loss_weight) and args.prior_loss_weight >= 0):
        raise UserError(f"--prior_loss_weight must be a number >= 0, got {args.prior_loss_weight}")
    if not (math.isfinite(args.caption_dropout_rate) and 0 <= args.caption_dropout_rate <= 1):
        raise UserError(f"--caption_dropout_rate must be between 0 and 1, got {args.caption_dropout_rate}")
    if not (math.isfinite(args.caption_tag_dropout_rate) and 0 <= args.caption_tag_dropout_rate <= 1):
        raise UserError(f"--caption_tag_dropout_rate must be between 0 and 1, got {args.caption_tag_dropout_rate}")
    if args.keep_tags < 0:
        raise UserError(f"--keep_tags must be 0 or more, got {args.keep_tags}")
    if args.keep_tags_separator is not None and not (args.shuffle_tags or args.caption_tag_dropout_rate):
        raise UserError(
            "--keep_tags_separator marks the tags that --shuffle_tags and --caption_tag_dropout_rate leave in place;"
            " without either, it would be trained on as text: give one, or take the separators out of the captions"
        )
    if args.keep_tags_separator is not None and (
        not args.keep_tags_separator.strip() or "," in args.keep_tags_separator
    ):
        raise UserError(f"--keep_tags_separator must be text without a comma, got {args.keep_tags_separator!r}")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        raise UserError(f"--snr_gamma must be a positive number, got {args.snr_gamma}")
    for flag, scale in (("noise_offset", "noise_offset"), ("ip_noise_gamma", "input_perturbation")):
        if getattr(args, f"{flag}_random_strength") and not getattr(args, scale):
            raise UserError(f"--{flag}_random_strength draws a strength up to --{scale}, which is not given")
    if args.multires_noise_iterations < 0:
        raise UserError(f"--multires_noise_iterations must be 0 or more, got {args.multires_noise_iterations}")
    if args.multires_noise_discount is not None and not args.multires_noise_iterations:
        raise UserError("--multires_noise_discount is for --multires_noise_iterations N, which is not given")
    if args.multires_noise_iterations:
        args.multires_noise_discount = 0.3 if args.multires_noise_discount is None else args.multires_noise_discount
        if not (math.isfinite(args.multires_noise_discount) and 0 < args.multires_noise_discount <= 1):
            raise UserError(
                f"--multires_noise_discount must be above 0 and at most 1, got {args.multires_noise_discount}"
            )
    huber = args.loss_type in THRESHOLD_LOSSES
    for flag in ("huber_schedule", "huber_c"):
        if getattr(args, flag) is not None and not huber:
            raise UserError(f"--{flag} is for --loss_type huber or smooth_l1, not {args.loss_type}")
    if args.huber_scale is not None and not huber:
        raise UserError(f"--huber_scale is for --loss_type huber or smooth_l1, not {args.loss_type}")
    if huber:
        args.huber_schedule = args.huber_schedule or "snr"
        args.huber_c = 0.1 if args.huber_c is None else args.huber_c
        if not (math.isfinite(args.huber_c) and args.huber_c > 0):
            raise UserError(f"--huber_c must be a number above 0, got {args.huber_c}")
        if args.huber_scale is not None and args.huber_schedule == "snr":
            raise UserError(
                "--huber_scale scales the constant and exponential schedules' threshold (as in kohya-ss), not the snr"
                " schedule's: give --huber_schedule constant or exponential, or leave it out"
            )
        args.huber_scale = 1.0 if args.huber_scale is None else args.huber_scale
        if not (math.isfinite(args.huber_scale) and args.huber_scale > 0):
            raise UserError(f"--huber_scale must be a number above 0, got {args.huber_scale}")
    if args.adaptive_noise_scale is not None and not args.noise_offset:
        raise UserError("--adaptive_noise_scale adds to --noise_offset, which is not given")
    if args.adaptive_noise_scale is not None and not math.isfinite(args.adaptive_noise_scale):
        raise UserError(f"--adaptive_noise_scale must be a number, got {args.adaptive_noise_scale}")
    if args.v_pred_like_loss is not None and not (math.isfinite(args.v_pred_like_loss) and args.v_pred_like_loss > 0):
        raise UserError(f"--v_pred_like_loss must be a number above 0, got {args.v_pred_like_loss}")
    low, high = args.min_timestep or 0, args.max_timestep
    if low < 0 or (high is not None and high <= low):
        raise UserError(f"--min_timestep and --max_timestep must make a range: 0 <= min < max, got {low} and {high}")
    if args.clip_skip < 1:
        raise UserError(
            f"--clip_skip must be 1 (the text encoder's last layer, the default) or more, got {args.clip_skip}"
        )
    if args.dream_training and args.max_token_length > 75:
        raise UserError(
            "--dream_training can't pass the windows' mask of --max_token_length above 75 to the UNet; use one of them"
        )
    # kohya-ss's prompt file: the validation prompts, each with its settings (see sdtoolkit/sample_prompts.py).
    args.validation_settings = None
    if args.sample_prompts is not None:
        if args.validation_prompts is not None:
            raise UserError("--sample_prompts and --validation_prompts both give the validation prompts: give one")
        prompts = read_sample_prompts(args.sample_prompts)
        args.validation_prompts = [prompt for prompt, _ in prompts]
        args.validation_settings = [settings for _, settings in prompts]
    for flag in ("validation_steps", "sample_at_first"):
        if getattr(args, flag) not in (None, False) and args.validation_prompts is None:
            raise UserError(f"--{flag} draws the --validation_prompts, which this run does not give")
    for prompt in args.validation_prompts or []:  # read as gradio_app.py reads prompts, so refused as it refuses
        problem = unsupported_syntax(prompt)
        if problem:
            raise UserError(f"--validation_prompts: {problem}")
    if args.offload_ema and not args.use_ema:
        raise UserError("--offload_ema moves the EMA weights to the CPU, so it needs --use_ema")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise UserError(f"--lora_rank must be at least 1, got {args.lora_rank}")
    if args.init_lora is not None:
        check_init_lora(args)
    if args.stop_text_encoder_training is not None and not args.train_text_encoder:
        raise UserError(
            "--stop_text_encoder_training stops --train_text_encoder's training of the text encoder, which this run"
            " does not use (kohya-ss's -1, no text encoder training, is the default here)"
        )
    if args.stop_text_encoder_training is not None and args.stop_text_encoder_training < 1:
        raise UserError(
            f"--stop_text_encoder_training must be at least 1 step, got {args.stop_text_encoder_training} (to train"
            " no text encoder, leave out --train_text_encoder)"
        )
    if args.fp8_base and not args.lora_rank:
        raise UserError(
            "--fp8_base keeps the frozen base model's weights in float8, so it needs --lora_rank (a full fine-tune"
            " trains those weights)"
        )
    if args.scale_weight_norms is not None and not args.lora_rank:
        raise UserError("--scale_weight_norms bounds the norms of LoRA adapters, so it needs --lora_rank")
    if args.lora_conv_alpha is not None and args.lora_conv_rank is None:
        raise UserError("--lora_conv_alpha is the alpha of --lora_conv_rank's adapters, which is not given")
    if args.lora_conv_rank is not None and (not args.lora_rank or args.lora_conv_rank < 1):
        raise UserError(f"--lora_conv_rank must be at least 1, with --lora_rank; got {args.lora_conv_rank}")
    if args.use_dora and not args.lora_rank:
        raise UserError("--use_dora trains DoRA adapters of --lora_rank N in place of LoRA ones: give their rank")
    if args.use_dora and args.lora_type != "lora":
        raise UserError(f"--use_dora makes LoRA adapters DoRA ones, not --lora_type {args.lora_type}'s: drop one")
    if args.use_dora and args.scale_weight_norms is not None:
        raise UserError(
            "--scale_weight_norms bounds a LoRA's update B @ A, which DoRA rescales to its trained magnitudes: drop one"
        )
    if args.lora_type != "lora":  # LyCORIS's LoHa and LoKr (see sdtoolkit/lycoris.py)
        kind = ADAPTER_NAMES[args.lora_type]
        if not args.lora_rank:
            raise UserError(f"--lora_type {args.lora_type} trains a {kind} adapter of --lora_rank N: give its rank")
        refused = [flag for flag, given in (("--lora_dropout", args.lora_dropout),
                                            ("--scale_weight_norms", args.scale_weight_norms)) if given]  # fmt: skip
        if refused:
            raise UserError(
                f"--lora_type {args.lora_type}: {', '.join(refused)} works on LoRA adapters only, not {kind}"
            )
    if args.scale_weight_norms is not None and not (
        math.isfinite(args.scale_weight_norms) and args.scale_weight_norms > 0
    ):
        raise UserError(f"--scale_weight_norms must be a number above 0, got {args.scale_weight_norms}")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise UserError("--text_encoder_lr is the learning rate of --train_text_encoder, which this run does not use")
    if args.text_encoder_lr is not None and not (math.isfinite(args.text_encoder_lr) and args.text_encoder_lr > 0):
        raise UserError(f"--text_encoder_lr must be a positive number, got {args.text_encoder_lr}")
    if args.use_8bit_adam and args.optimizer != "adamw":
        raise UserError(
            f"--use_8bit_adam is 8-bit AdamW, and this run asks for --optimizer {args.optimizer}: drop one"
        )
    if args.optimizer == "prodigy" and args.text_encoder_lr not in (None, args.learning_rate):
        raise UserError(
            "--optimizer prodigy takes one learning rate for all the weights it trains (it sets each step size"
            " itself): drop --text_encoder_lr"
        )
    if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise UserError("--optimizer prodigy needs prodigyopt: pip install prodigyopt")
    if args.use_8bit_adam and not torch.cuda.is_available() and importlib.util.find_spec("torchao") is None:
        raise UserError(
            "--use_8bit_adam without a CUDA GPU needs torchao's 8-bit AdamW (pip install torchao); on a GPU it uses"
            " bitsandbytes"
        )
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise UserError(
            "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers, CUDA only);"
            " without it PyTorch's own scaled-dot-product attention is used, which is as memory-efficient"
        )
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use --mixed_precision no (or bf16) on a CPU")
    # accelerate only warns about a tracker that is not installed, and the run then logs nowhere.
    tracker_available = getattr(accelerate.utils, f"is_{args.report_to}_available", None)
    if tracker_available is not None and not tracker_available():
        raise UserError(
            f"--report_to {args.report_to} needs {args.report_to} installed (pip install {args.report_to});"
            " or use --report_to tensorboard (installed with the toolkit)"
        )
    check_file_exists(args.pretrained_model_name_or_path)
    if is_single_file(args.pretrained_model_name_or_path):
        safetensors_metadata(args.pretrained_model_name_or_path)  # refuses pickles and unreadable files
        for flag in ("revision", "variant", "non_ema_revision"):
            if getattr(args, flag) is not None:
                raise UserError(
                    f"--{flag} is for a hub model or folder; {args.pretrained_model_name_or_path} is one file"
                )
    elif args.model_config is not None:
        raise UserError(
            f"--model_config is for a --pretrained_model_name_or_path that is one file; {args.pretrained_model_name_or_path}"
            " has its own configs"
        )
    if args.report_to == "wandb" and args.hub_token is not None:
        raise UserError(
            "--report_to wandb and --hub_token together would expose your token in the run's config;"
            " log in with `hf auth login` instead of passing --hub_token"
        )

    # default to using the same revision for the non-ema model if not specified
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision

    return args


def load_models(args, unet_dtype=None):
    """Load the noise scheduler, tokenizer, text encoder, VAE and UNet, or fail with one clear line."""

    def deepspeed_zero_init_disabled_context_manager():
        """Under DeepSpeed ZeRO-3, keep the frozen models whole instead of partitioning them at load time."""
        deepspeed_plugin = AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
        if deepspeed_plugin is None:
            return []
        return [deepspeed_plugin.zero3_init_context_manager(enable=False)]

    name = args.pretrained_model_name_or_path
    if is_single_file(name):
        # One file in the original layout: every part comes from it, its configs from --model_config (see
        # sdtoolkit/inference.py). The scheduler's config is the base's, as from a folder.
        pipeline = base_pipeline(args)
        noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        unet = pipeline.unet.to(unet_dtype) if unet_dtype is not None else pipeline.unet
        return noise_scheduler, pipeline.tokenizer, pipeline.text_encoder, pipeline.vae, unet
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        # Only the UNet is sharded by ZeRO-3: accelerate prepares one model per optimizer, so the frozen VAE and
        # text encoder are loaded outside zero.Init.
        with ContextManagers(deepspeed_zero_init_disabled_context_manager()):
            text_encoder = CLIPTextModel.from_pretrained(
                name, subfolder="text_encoder", variant=args.variant, **common
            )
            if args.pretrained_vae_model_name_or_path:  # a VAE of its own (see sdtoolkit/inference.py)
                vae = load_vae_for_training(args)
            else:
                vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(
            name, subfolder="unet", revision=args.non_ema_revision, cache_dir=args.cache_dir, torch_dtype=unet_dtype
        )
    except (OSError, ValueError) as err:
        hint = (
            "pass a local pipeline folder (`python -m sdtoolkit.fixtures --preset tiny --out DIR` builds one offline)"
        )
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = "HF_HUB_OFFLINE=1 is set, so only local folders and the local cache work; " + hint
        raise UserError(
            f"could not load the model '{name}': {first_line(err)} -- check the name, log in with"
            f" `hf auth login` and accept the model's license if it is gated, or {hint}"
        ) from err
    return noise_scheduler, tokenizer, text_encoder, vae, unet


def has_images(folder):
    """Whether a --train_data_dir holds any file other than metadata files."""
    for _, _, files in os.walk(folder):
        if any(not name.startswith("metadata.") for name in files):
            return True
    return False


# The caption files' extensions other tools write: .txt, and sd-scripts' default .caption.
CAPTION_EXTENSIONS = (".txt", ".caption")
# A --dataset_name that is one local file is read by the `datasets` builder for its type.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


def load_training_dataset(args):
    """Load the hub dataset or local imagefolder and check every row, or fail with one clear line.

    Returns the train split (after --max_train_samples and, with --skip_invalid_images, without the images
    that can't be decoded; with --reg_data_dir, the regularization images after them), how many examples each of
    its rows makes per epoch (repeats), the image and caption column names, the number of rows skipped, the
    data's fingerprint (see sdtoolkit/data.py), each row's image size, each row's crop for the latent cache
    (None when not kept, see cache_crop_maker), each row's loss weight (None without --reg_data_dir), and the
    rows held out by --validation_split with their image sizes (or None).
    """
    source = training_data(args)
    # A kohya-ss dataset config's folders (see sdtoolkit/dataset_config.py): read like caption-file folders.
    config_folders = None
    if args.dataset_config is not None:
        config_flags, config_folders = read_dataset_config(
            args.dataset_config, caption_extension=args.caption_extension
        )
        logger.info(
            f"Read --dataset_config {args.dataset_config}: {len(config_folders)} image folders; it sets "
            + (", ".join(describe_flag(flag, value) for flag, value in config_flags.items()) or "no flags")
            + " (over the command line's, as in sd-scripts)"
        )
    # kohya-ss's fine-tuning metadata, a dataset config's folders and caption-file folders all give the columns
    # image and text.
    caption_folder = (
        args.in_json is not None
        or config_folders is not None
        or (
            os.path.isdir(source)
            and not has_metadata_file(source)
            and has_captioned_images(source, args.caption_extension, from_filename=args.caption_from_filename)
            and (args.dataset_name is None or args.train_data_dir is None)
        )
    )
    # A folder of WebDataset shards (.tar), as img2dataset writes them (see sdtoolkit/data.py).
    shards = webdataset_shards(source) if not caption_folder else []
    # A local parquet dataset (a file, or a folder of them such as a hub dataset's snapshot) is read here a row
    # group at a time, so converting it takes the same memory whatever its size (see sdtoolkit/data.py).
    parquet = parquet_files(source) if args.dataset_name is not None and not caption_folder else []
    for path, rows, size in large_row_groups(parquet):
        logger.warning(
            f"{path} holds {size / 1024**2:.0f} MB of data in one row group of {rows} rows; a row group is read"
            " whole, so loading it needs several times that in memory. Write the file with smaller row groups"
            " (datasets' Dataset.to_parquet keeps them under 100 MB; pyarrow: row_group_size=100)"
        )
    # Images captioned by files of another extension than this run reads (sd-scripts' default is .caption).
    if os.path.isdir(source) and not (caption_folder or shards or parquet or has_metadata_file(source)):
        for extension in [ext for ext in CAPTION_EXTENSIONS if ext != args.caption_extension]:
            if has_captioned_images(source, extension):
                raise UserError(
                    f"{source} has images with {extension} caption files beside them, and this run reads"
                    f" {args.caption_extension} ones: pass --caption_extension {extension}"
                )
    # A dataset written with datasets' save_to_disk is mapped where it is (load_dataset would refuse or copy it).
    saved = saved_with_save_to_disk(source)
    try:
        if args.in_json is not None:
            # Images captioned by kohya-ss's fine-tuning metadata file (see sdtoolkit/kohya_metadata.py).
            train, notes = read_kohya_metadata(
                args.in_json, args.train_data_dir, allow_missing_captions=args.allow_missing_captions,
                wildcard=args.enable_wildcard,
            )  # fmt: skip
            logger.info(notes[0])
            for note in notes[1:]:
                logger.warning(note)
            dataset = {"train": train}
        elif config_folders is not None:
            dataset = {"train": read_config_folders(args, [f for f in config_folders if not f.is_reg])}
        elif caption_folder:
            # Images with their captions in same-named text files (see sdtoolkit/caption_folders.py).
            train, notes = read_caption_folder(
                source, caption_extension=args.caption_extension, allow_missing_captions=args.allow_missing_captions,
                from_filename=args.caption_from_filename,
            )  # fmt: skip
            logger.info(notes[0])
            for note in notes[1:]:
                logger.warning(note)
            dataset = {"train": train}
        elif shards:
            dataset = load_dataset("webdataset", data_files={"train": shards}, cache_dir=args.cache_dir)
        elif saved:
            dataset = load_saved_dataset(source)
        elif parquet and args.dataset_config_name is None and args.train_data_dir is None:
            splits = parquet_splits(source)
            dataset = {name: load_parquet(files, args.cache_dir) for name, files in splits.items() if name == "train"}
            dataset = dataset or splits  # no train split: said below
        elif args.dataset_name is not None and os.path.isfile(args.dataset_name):
            # One local file, e.g. a parquet copy of a hub dataset.
            builder = DATA_FILE_BUILDERS.get(os.path.splitext(args.dataset_name)[1].lower())
            if builder is None:
                raise UserError(
                    f"--dataset_name {args.dataset_name} is a file of a type this script can't read; give a"
                    f" {' or '.join(DATA_FILE_BUILDERS)} file, or the folder that holds the dataset"
                )
            dataset = load_dataset(builder, data_files={"train": args.dataset_name}, cache_dir=args.cache_dir)
        elif args.dataset_name is not None:
            # Downloading and loading a dataset from the hub (or a local copy of one). A local folder goes by its
            # absolute path: datasets reads a bare name such as "text", "csv" or "eval" as its own builder of that
            # name, not as the folder.
            local = os.path.isdir(args.dataset_name)
            dataset = load_dataset(
                os.path.abspath(args.dataset_name) if local else args.dataset_name,
                args.dataset_config_name,
                cache_dir=args.cache_dir,
                data_dir=args.train_data_dir,
            )
        else:
            if not os.path.isdir(args.train_data_dir):
                raise UserError(f"--train_data_dir {args.train_data_dir} is not a folder")
            # A folder of images with a metadata.jsonl holding the captions, see
            # https://huggingface.co/docs/datasets/image_dataset#imagefolder
            data_files = {"train": os.path.join(args.train_data_dir, "**")}
            dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=args.cache_dir)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types (connection, not found, gated, bad files)
        if "corresponds to no data" in str(err) or (args.dataset_name is None and not has_images(source)):
            raise UserError(f"the training dataset is empty: '{source}' holds no training rows") from err
        raise UserError(
            f"could not load the dataset '{source}': {first_line(err)} -- lambdalabs/pokemon-blip-captions was"
            " taken down from the hub in 2024; try --dataset_name lambdalabs/naruto-blip-captions (same columns),"
            " or --train_data_dir with your own folder of images and a metadata.jsonl (file_name, text)"
        ) from err
    # Give back the memory pyarrow's allocator kept from the conversion; it would stay resident all run.
    pyarrow.default_memory_pool().release_unused()
    if "train" not in dataset:
        raise UserError(f"the dataset has no 'train' split (it has: {', '.join(dataset)})")
    train = dataset["train"]
    folder = source if os.path.isdir(source) else None

    column_names = train.column_names
    # A caption-file folder's columns are its own: image and text.
    image_column, caption_column = ("image", "text") if caption_folder else (args.image_column, args.caption_column)
    if shards:  # a WebDataset's columns are its files' extensions: jpg, txt, json
        image_column, caption_column = webdataset_columns(column_names, image_column, caption_column)
        logger.info(
            f"Read {source} as a WebDataset of {len(shards)} .tar shards: images from its .{image_column} files,"
            f" captions from its .{caption_column} files, {len(train)} rows"
        )
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in column_names:
            raise UserError(f"{flag} '{column}' is not a column of the dataset; it has: {', '.join(column_names)}")
    if len(train) == 0:
        raise UserError("the training dataset is empty")
    if not caption_folder and not shards and folder is not None:
        kind = "a dataset saved with save_to_disk" if saved else "a dataset folder"
        logger.info(f"Read {folder} as {kind} ({', '.join(column_names)}): {len(train)} rows")

    # An imagefolder leaves out the images its metadata does not name: say so instead.
    unlisted = unlisted_images(folder) if folder is not None and not caption_folder else []
    if unlisted:
        names = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        logger.warning(f"{len(unlisted)} images in {folder} have no line in its metadata and are not used: {names}")

    if args.max_train_samples is not None:
        # The shuffle's indices stay in memory: datasets would write them to a file beside the data, which for a
        # saved dataset is the user's folder (a read-only one would fail).
        train = train.shuffle(seed=args.seed, keep_in_memory=True).select(
            range(min(args.max_train_samples, len(train)))
        )

    # Decode every image once now, as training will, so a broken file stops the run here and not hours in.
    # With cached latents, the crops that caching encodes are made now too and kept while they fit in a share
    # of the free memory, so that caching does not decode every image a second time.
    train = as_image_column(train, image_column)
    keep_bytes = min(2 * 1024**3, available_memory() // 4)
    bad, digests, sizes, crops, transparent = scan_images(
        train, image_column, prepare=cache_crop_maker(args), keep_bytes=keep_bytes
    )
    if args.masked_loss and not transparent:
        logger.warning("--masked_loss: no image has an alpha channel, so every image is learned whole")
    elif args.masked_loss:
        others = "; the others are learned whole" if transparent < len(train) else ""
        logger.info(f"--masked_loss: {transparent} of {len(train)} images have an alpha channel{others}")
    if args.cache_latents and args.center_crop and crops is None:
        logger.info(
            f"The crops to cache take more than {keep_bytes / 1024**3:.1f} GB; caching decodes the images again"
        )
    if bad and not args.skip_invalid_images:
        listed = "; ".join(f"{name} ({reason})" for _, name, reason in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(
            f"{len(bad)} of {len(train)} images can't be read: {listed}{more} -- fix or remove them, or pass"
            " --skip_invalid_images to train without them"
        )
    if bad:
        names = ", ".join(name for _, name, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        logger.warning(f"--skip_invalid_images: dropped {len(bad)} of {len(train)} images that can't be read: {names}")
        bad_rows = {row for row, _, _ in bad}
        kept = [i for i in range(len(train)) if i not in bad_rows]
        train, digests, sizes = train.select(kept), [digests[i] for i in kept], [sizes[i] for i in kept]
        crops = [crops[i] for i in kept] if crops is not None else None
        if len(train) == 0:
            raise UserError("none of the dataset's images can be read")
    num_empty = check_captions(train, caption_column)
    if num_empty and not caption_folder:  # a caption folder has said so already
        logger.warning(f"{num_empty} of {len(train)} captions are empty; those images train without a caption")
    if config_folders is None:  # a dataset config's folders have theirs (see read_config_folders)
        if args.enable_wildcard:  # before the affixes, which each line then gets
            train = with_caption_lines(train, caption_column)
        train = with_affixes(train, caption_column, args.caption_prefix, args.caption_suffix)
    # kohya-ss's captions of several lines and {a|b} wildcards: read with --enable_wildcard, named without it.
    captions = all_captions(train, caption_column)
    num_wildcards = sum(map(has_wildcards, captions))
    num_lines = sum(len(caption_lines(caption)) > 1 for caption in captions)
    if args.enable_wildcard:
        logger.info(
            f"--enable_wildcard: {sum(len(row) > 1 for row in train[caption_column])} images have several captions"
            f" (a caption's lines), one drawn per example; {num_wildcards} captions hold {{a|b}} wildcards, one"
            " option drawn per example"
        )
    elif num_wildcards or num_lines:
        logger.warning(
            f"{num_lines} captions have several lines, read as one caption each, and {num_wildcards} hold {{a|b}}"
            " wildcards, read as text; --enable_wildcard draws one line and one option per example, as kohya-ss"
            " does with it"
        )

    # Hold out a share of the images for the held-out loss (see sdtoolkit/held_out.py); they never train.
    held_out = None
    if args.validation_split:
        training, held = split_held_out(digests, args.validation_split)
        held_out = train.select(held), [sizes[i] for i in held]
        train, digests, sizes = train.select(training), [digests[i] for i in training], [sizes[i] for i in training]
        crops = [crops[i] for i in training] if crops is not None else None
        logger.info(
            f"--validation_split: {len(held)} of {len(held) + len(training)} images held out from training; each"
            f" measurement of the held-out loss is {len(held) * len(HELD_OUT_TIMESTEPS)} UNet passes"
        )

    # Repeats: how many examples each image makes per epoch. Every repeat is an example of its own (its own
    # crop, flip and noise) and counts in the epoch length and step counts, but the image is stored, checked and
    # cached once (see TrainingExamples). The fingerprint covers the images as the examples list them.
    repeats = [n * args.dataset_repeats for n in (train["repeats"] if "repeats" in column_names else [1] * len(train))]
    if any(n > 1 for n in repeats):
        logger.info(f"Repeats: {len(train)} images make {sum(repeats)} examples per epoch")

    # Regularization images come after the training images, weighed by --prior_loss_weight in the loss.
    loss_weights = None
    reg_folders = [f for f in config_folders if f.is_reg] if config_folders is not None else []
    if args.reg_data_dir is not None or reg_folders:
        reg, reg_repeats, reg_digests, reg_sizes, reg_crops = read_regularization_images(
            args, reg_folders, train.features, image_column, caption_column, sum(repeats),
            keep_crops=crops is not None, keep_bytes=keep_bytes,
        )  # fmt: skip
        loss_weights = [1.0] * len(train) + [args.prior_loss_weight] * len(reg)
        train = datasets.concatenate_datasets([train.select_columns([image_column, caption_column]), reg])
        repeats, digests, sizes = repeats + reg_repeats, digests + reg_digests, sizes + reg_sizes
        crops = crops + reg_crops if crops is not None and reg_crops is not None else None

    listed = [i for i, n in enumerate(repeats) for _ in range(n)]
    captions = train[caption_column]
    data_fingerprint = fingerprint([digests[i] for i in listed], [captions[i] for i in listed])
    return (train, repeats, image_column, caption_column, len(bad), data_fingerprint, sizes, crops, loss_weights,
            held_out)  # fmt: skip


def read_config_folders(args, folders):
    """A --dataset_config's folders as one caption-file dataset (see sdtoolkit/dataset_config.read_folders), with
    what each folder's reading has to tell the user logged."""
    dataset, notes = read_folders(
        folders, allow_missing_captions=args.allow_missing_captions, wildcard=args.enable_wildcard,
        caption_prefix=args.caption_prefix, caption_suffix=args.caption_suffix,
        from_filename=args.caption_from_filename,
    )  # fmt: skip
    for folder_notes in notes:
        logger.info(folder_notes[0])
        for note in folder_notes[1:]:
            logger.warning(note)
    return dataset


def read_regularization_images(args, config_folders, features, image_column, caption_column, num_examples, *,
                               keep_crops, keep_bytes):  # fmt: skip
    """The regularization images (the caption-file folder --reg_data_dir, or a --dataset_config's is_reg
    folders) as rows like the training rows (same columns and types), checked like them, with how many examples
    each makes per epoch: about num_examples in all, as kohya-ss balances them (see balance_regularization).
    Returns (rows, repeats, digests, sizes, crops), for the images used."""
    folder = args.reg_data_dir or ", ".join(f.image_dir for f in config_folders)
    if config_folders:
        reg = read_config_folders(args, config_folders)
    else:
        if not has_captioned_images(folder, args.caption_extension, from_filename=args.caption_from_filename):
            raise UserError(
                f"--reg_data_dir {folder} holds no captioned images: give images with {args.caption_extension}"
                " caption files, or in N_name folders, which caption them by their name"
            )
        reg, notes = read_caption_folder(
            folder, caption_extension=args.caption_extension, allow_missing_captions=args.allow_missing_captions,
            from_filename=args.caption_from_filename,
        )  # fmt: skip
        for note in notes[1:]:
            logger.warning(f"--reg_data_dir: {note}")
    repeats = balance_regularization([n * args.dataset_repeats for n in reg["repeats"]], num_examples)
    used = [row for row, count in enumerate(repeats) if count > 0]
    logger.info(
        f"{'--reg_data_dir' if args.reg_data_dir else 'is_reg subsets'}: {len(used)} of the {len(reg)}"
        f" regularization images in {folder} make {sum(repeats)}"
        f" examples per epoch, beside the {num_examples} training examples; their loss weighs"
        f" {args.prior_loss_weight:g}"
    )
    # The training rows' columns and types (a list of captions stays a list).
    reg = reg.select(used)
    texts = reg["text"]
    if args.enable_wildcard and not config_folders:
        texts = [caption_lines(text) for text in texts]
    if not config_folders:
        texts = [affix_caption(text, args.caption_prefix, args.caption_suffix) for text in texts]
    if not isinstance(features[caption_column], datasets.Value):
        texts = [text if isinstance(text, list) else [text] for text in texts]
    paths = reg.cast_column("image", datasets.Image(decode=False))["image"]
    rows = datasets.Dataset.from_dict({image_column: [p["path"] for p in paths], caption_column: texts})
    rows = rows.cast(
        datasets.Features({image_column: features[image_column], caption_column: features[caption_column]})
    )
    bad, digests, sizes, crops, _ = scan_images(
        rows, image_column, prepare=cache_crop_maker(args) if keep_crops else None, keep_bytes=keep_bytes
    )
    if bad and not args.skip_invalid_images:
        listed = "; ".join(f"{name} ({reason})" for _, name, reason in bad[:5])
        raise UserError(
            f"{len(bad)} of the regularization images can't be read: {listed} -- fix or remove them, or pass"
            " --skip_invalid_images to train without them"
        )
    unreadable = {row for row, _, _ in bad}
    kept = [row for row in range(len(rows)) if row not in unreadable]
    if bad:
        logger.warning(f"--skip_invalid_images: dropped {len(bad)} regularization images that can't be read")
        rows = rows.select(kept)
    repeats = [repeats[used[row]] for row in kept]
    crops = [crops[row] for row in kept] if crops is not None else None
    return rows, repeats, [digests[row] for row in kept], [sizes[row] for row in kept], crops


def bucket_shapes(args):
    """The aspect-ratio buckets the flags ask for, as (width, height) pairs (see sdtoolkit/buckets.py)."""
    return make_buckets(
        resolution=args.resolution, step=args.bucket_step, min_side=args.min_bucket_side, max_side=args.max_bucket_side
    )


def cache_crop_maker(args):
    """What the pre-training check keeps of each image for --cache_latents: its center crop at the size it
    trains at (the resolution² square, or its aspect-ratio bucket). None when latents are not cached."""
    if not (args.cache_latents and args.center_crop):
        return None
    interpolation = getattr(transforms.InterpolationMode, args.image_interpolation_mode.upper())
    if not args.aspect_buckets:
        return lambda image: cache_crop(image, args.resolution, interpolation, args.masked_loss)
    buckets = bucket_shapes(args)

    def crop_to_bucket(image):
        bucket = assign_buckets([image.size], buckets, no_upscale=args.bucket_no_upscale)[0][0] if buckets else None
        return cache_crop(image, buckets[bucket], interpolation, args.masked_loss) if bucket is not None else None

    return crop_to_bucket


def group_into_buckets(train_rows, sizes, args):
    """Assign every image to its aspect-ratio bucket and log the table. Returns (rows, bucket size per row,
    rows of each bucket, the indices of the rows kept): with --bucket_no_upscale the images smaller than every
    bucket are left out."""
    buckets = bucket_shapes(args)
    if not buckets:
        raise UserError(
            f"no bucket of about {args.resolution}x{args.resolution} pixels has both sides in"
            f" [{args.min_bucket_side}, {args.max_bucket_side}]; widen --min_bucket_side/--max_bucket_side"
        )
    assigned, too_small = assign_buckets(sizes, buckets, no_upscale=args.bucket_no_upscale)
    if too_small:
        shown = ", ".join(f"row {row} ({sizes[row][0]}x{sizes[row][1]})" for row in too_small[:5])
        what = "left out (--bucket_no_upscale)" if args.bucket_no_upscale else "enlarged to fit"
        logger.warning(f"{len(too_small)} images are smaller than every bucket and are {what}: {shown}")
    kept = [row for row, bucket in enumerate(assigned) if bucket is not None]
    if not kept:
        raise UserError("every image is smaller than the smallest bucket; lower --min_bucket_side")
    if len(kept) < len(assigned):
        train_rows, assigned = train_rows.select(kept), [assigned[row] for row in kept]
    rows_of_bucket = [[row for row, b in enumerate(assigned) if b == i] for i in range(len(buckets))]
    table = ", ".join(f"{w}x{h}: {len(rows)}" for (w, h), rows in zip(buckets, rows_of_bucket) if rows)
    logger.info(f"Aspect-ratio buckets (width x height: images): {table}")
    return train_rows, [buckets[b] for b in assigned], rows_of_bucket, kept


def check_same_architecture(unet, resume_path, resumed_state):
    """A checkpoint resumes only into the UNet architecture it was saved from; say so instead of 100 lines of
    size mismatches."""
    saved = UNet2DConditionModel.load_config(os.path.join(resume_path, "unet"))
    different = [
        key for key in saved if not key.startswith("_") and key in unet.config and saved[key] != unet.config[key]
    ]
    if different:
        shown = "; ".join(f"{key} {saved[key]} vs {unet.config[key]}" for key in different[:3])
        trained_from = resumed_state.get("model", "the model it was trained from")
        raise UserError(
            f"{resume_path} holds a UNet of another architecture than --pretrained_model_name_or_path ({shown}):"
            f" resume it with {trained_from}, or start a new run"
        )


def generate_validation_images(pipeline, args, accelerator):
    """One image per validation prompt, 20 inference steps as upstream, seeded by --seed; with --sample_prompts, each
    with the negative prompt, size, seed, guidance scale and steps its line sets."""
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    # Autocast on CUDA, as upstream. On a CPU only under --mixed_precision bf16, whose frozen models are in
    # bfloat16 and need it; a float32 run would only be slowed down by it.
    autocast_ctx = nullcontext()
    if accelerator.device.type == "cuda":
        autocast_ctx = torch.autocast("cuda")
    elif accelerator.mixed_precision == "bf16":
        autocast_ctx = torch.autocast(accelerator.device.type, dtype=torch.bfloat16)

    # The models in eval mode while they draw (--lora_dropout would otherwise drop parts of the adapters), then
    # back to how training had them.
    models = [pipeline.unet, pipeline.text_encoder]
    training = [model.training for model in models]
    for model in models:
        model.eval()
    images = []
    own = pipeline.scheduler  # the model's, sampling as it was trained
    for i, prompt in enumerate(args.validation_prompts):
        settings = args.validation_settings[i] if args.validation_settings else {}
        sampler = settings.get("sampler", args.sample_sampler)  # kohya-ss's, made from the model's config
        pipeline.scheduler = sampler_scheduler(sampler, own.config) if sampler else own
        seeded = generator
        if "seed" in settings:
            seeded = torch.Generator(device=accelerator.device).manual_seed(settings["seed"])
        with autocast_ctx:
            # Read as gradio_app.py reads a prompt (sdtoolkit/clip_windows.py): a plain one as the pipeline reads
            # it, emphasis such as (word:1.2) and BREAK as AUTOMATIC1111 reads them, a long one whole, in windows.
            embeddings, negative = encode_prompts(
                pipeline, prompt, settings.get("negative_prompt"), guidance=True, clip_skip=args.clip_skip
            )
            image = pipeline(
                prompt_embeds=embeddings,
                negative_prompt_embeds=negative,
                num_inference_steps=settings.get("num_inference_steps", 20),
                guidance_scale=settings.get("guidance_scale", 7.5),
                # A --zero_terminal_snr run's images with its guidance rescaled, as Lin et al. sample.
                guidance_rescale=default_guidance_rescale(pipeline.scheduler),
                height=settings.get("height", args.resolution),
                width=settings.get("width", args.resolution),
                generator=seeded,
            ).images[0]
        images.append(image)
    pipeline.scheduler = own
    for model, was_training in zip(models, training):
        model.train(was_training)
    return images


def save_validation_images(images, args, folder_name):
    """Write the images as output_dir/validation/<folder_name>/<i>.png and return the folder."""
    folder = os.path.join(args.output_dir, "validation", folder_name)
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def base_pipeline(args, dtype=None, **components):
    """The base model's pipeline with `components` (the trained UNet, ...) in place of its own, sampling with the
    --prediction_type the UNet is trained for (upstream's script saves the base's scheduler as it is, so a
    v-prediction fine-tune of an epsilon model would be sampled as epsilon)."""
    if args.pretrained_vae_model_name_or_path and "vae" not in components:  # the VAE trained with, freed after caching
        components["vae"] = load_vae_for_training(args, dtype)
    if is_single_file(args.pretrained_model_name_or_path):
        pipeline = load_single_file(
            args.pretrained_model_name_or_path, dtype or torch.float32, args.model_config, **components
        )
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            **components,
            revision=args.revision,
            variant=args.variant,
            dtype=dtype,
            cache_dir=args.cache_dir,
        )
    return sample_as_trained(
        pipeline, "the trained UNet", prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr
    )


def load_vae_for_training(args, dtype=None):
    """--pretrained_vae_model_name_or_path's VAE (see sdtoolkit/inference.py)."""
    return load_vae(
        args.pretrained_vae_model_name_or_path, dtype or torch.float32, base=args.pretrained_model_name_or_path,
        config=args.model_config,
    )  # fmt: skip


def log_validation(vae, text_encoder, tokenizer, unet, args, accelerator, weight_dtype, global_step):
    logger.info("Running validation... ")

    # Encoders freed after caching (--cache_latents) are loaded again from the base model.
    frozen = {name: model for name, model in (("vae", vae), ("text_encoder", text_encoder)) if model is not None}
    pipeline = base_pipeline(
        args,
        dtype=weight_dtype,
        **frozen,
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet, keep_torch_compile=False),
        safety_checker=None,
    )
    images = generate_validation_images(pipeline, args, accelerator)
    folder = save_validation_images(images, args, f"step-{global_step}")
    logger.info(f"Saved validation images to {folder}")

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and len({image.size for image in images}) > 1:
            for i, image in enumerate(images):  # sizes of their own (--sample_prompts): one at a time
                tracker.writer.add_image(f"validation/{i}", np.asarray(image), global_step, dataformats="HWC")
        elif tracker.name == "tensorboard":
            np_images = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images("validation", np_images, global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(image, caption=f"{i}: {args.validation_prompts[i]}")
                        for i, image in enumerate(images)
                    ]
                }
            )
        else:
            logger.warning(f"image logging not implemented for {tracker.name}")

    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return images


def held_out_summary(losses, change):
    """The held-out losses ([step, loss] each) in a line: first, last and lowest, and the change from first to last
    image by image (see sdtoolkit/held_out.py's compare)."""
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    best_step, best = min(losses, key=lambda pair: pair[1])
    mean, low, high, verdict = change
    return (
        f"{first:.5f} at step {first_step}, {last:.5f} at step {last_step} (lowest {best:.5f} at step {best_step});"
        f" change per image {mean:+.5f}, 95% interval {low:+.5f} to {high:+.5f}: {verdict}"
    )


def save_model_card(args, repo_id, images, buckets_used=None, held_out_report=None, text_encoder_targets=None,
                    example_caption=None):  # fmt: skip
    """Write output_dir/README.md: base model, data, hyperparameters and the final validation images. Its usage
    example prompts the first validation prompt, or else `example_caption` (one the model trained on).

    Hub ids go into the card's metadata; local paths don't (they mean nothing elsewhere): the text names
    their folder instead.
    """
    img_str = ""
    if images:
        # Images of other sizes (--sample_prompts) side by side, each in a cell the size of the largest.
        cell = (max(image.width for image in images), max(image.height for image in images))
        image_grid = make_image_grid([ImageOps.pad(image, cell, color="white") for image in images], 1, len(images))
        image_grid.save(os.path.join(args.output_dir, "val_imgs_grid.png"))
        img_str = "![val_imgs_grid](./val_imgs_grid.png)\n"
    model, dataset = args.pretrained_model_name_or_path, training_data(args)
    prompt = args.validation_prompts[0] if args.validation_prompts else example_caption or "a photo"
    # Pushed to the hub, the card loads the repository; kept locally, the folder it is in.
    load_from = repo_id if args.push_to_hub else args.output_dir

    def shown(name):
        if not looks_like_local_path(name):
            return f"**{name}**"
        return f"a local {'file' if os.path.isfile(name) else 'folder'} `{Path(name).name}`"

    metadata = []
    if not looks_like_local_path(model):
        metadata.append(f"base_model: {model}")
    if not looks_like_local_path(dataset):
        metadata.append(f"datasets:\n- {dataset}")
    # The hub's example prompts for the model; gradio_app.py offers them on its page. A JSON string is valid YAML.
    if args.validation_prompts:
        metadata.append("widget:" + "".join(f"\n- text: {json.dumps(p)}" for p in args.validation_prompts))
    # How the model is to be prompted, which metrics.py and gradio_app.py follow (see recorded_clip_skip).
    if args.clip_skip > 1:
        metadata.append(f"clip_skip: {args.clip_skip}")
    if args.weighted_captions:  # metrics.py reads caption accuracy's captions the same way
        metadata.append("weighted_captions: true")
    yaml = "---\nlicense: creativeml-openrail-m\n" + "".join(line + "\n" for line in metadata)
    tags = (
        ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers"]
        + ["lora"] * bool(args.lora_rank)
        + ["lycoris"] * (bool(args.lora_rank) and args.lora_type != "lora")
    )
    yaml += "tags:\n" + "".join(f"- {tag}\n" for tag in tags) + "inference: true\n---\n"
    # A LoRA run saved only its adapter: load the base model, then the adapter on top.
    usage_source, lora_line, loader = f'"{load_from}"', "", "from_pretrained"
    if args.lora_rank:
        base = model if not looks_like_local_path(model) else f"path/to/{Path(model).name}"
        usage_source, lora_line = f'"{base}"', f'\npipeline.load_lora_weights("{load_from}")'
        loader = "from_single_file" if is_single_file(model) else loader
    kind = adapter_name(args)
    usage = f"""```python
import torch
from diffusers import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.{loader}({usage_source}, torch_dtype=torch.float16).to("cuda"){lora_line}
image = pipeline({json.dumps(prompt, ensure_ascii=False)}).images[0]
image.save("my_image.png")
```"""
    if args.lora_rank and args.lora_type != "lora":
        # diffusers' load_lora_weights reads no LyCORIS adapter (see sdtoolkit/lycoris.py). A local run's folder
        # names its base model; from the hub, the file is fetched and given on top of the base.
        serve = f"python gradio_app.py --model_path {load_from}"
        if args.push_to_hub:
            local = Path(args.output_dir).name
            serve = (
                f"hf download {load_from} {KOHYA_WEIGHTS_NAME} --local-dir {local}\n"
                f"python gradio_app.py --model_path {base} --lora {local}/{KOHYA_WEIGHTS_NAME}"
            )
        usage = f"""A {kind} adapter is LyCORIS's, which diffusers' `load_lora_weights` does not read. This toolkit's
`gradio_app.py` and `metrics.py` load it on its base model, and AUTOMATIC1111 and ComfyUI load
`{KOHYA_WEIGHTS_NAME}` from their `models/Lora` and `models/loras` folders:

```bash
{serve}
```"""
    lora = "no (all UNet weights trained)"
    # A text encoder that trained: at its own learning rate, for the first N steps only (--stop_text_encoder_training).
    text_lr = f" at learning rate {args.text_encoder_lr:g}" if args.text_encoder_lr else ""
    text_steps = f" for the first {args.stop_text_encoder_training} steps" if args.stop_text_encoder_training else ""
    if args.train_text_encoder and not args.lora_rank:
        lora = f"no (all UNet weights trained, and all the text encoder's{text_lr}{text_steps})"
    if args.lora_rank:
        lora = f"rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank}, on {' '.join(args.lora_target_modules)}"
        if args.lora_conv_rank:
            lora += f", its 3x3 convolutions at rank {args.lora_conv_rank}, alpha {args.lora_conv_alpha or args.lora_conv_rank}"
        if args.lora_type != "lora":
            lora = f"{kind} (LyCORIS), {lora}"
        if args.use_dora:
            lora = f"DoRA (--use_dora), {lora}"
        if text_encoder_targets:
            lora += f" and the text encoder's {' '.join(text_encoder_targets)}{text_lr}{text_steps}"
        if args.init_lora:
            lora += f", trained on from {shown(args.init_lora)}"
        if args.fp8_base:
            lora += ", on the base's weights rounded to float8 (--fp8_base)"
        if args.scale_weight_norms:
            lora += f", each update's norm held to at most {args.scale_weight_norms:g} (--scale_weight_norms)"
    # The held-out loss (--validation_split) of the base model and of the result.
    held_out_line = (
        f"\n* Held-out loss ({args.validation_split:g} of the images): {held_out_report}" if held_out_report else ""
    )
    # Captions read from another layer than the last: the model is to be prompted the same way.
    clip_skip_line = (
        f"\n* Clip skip: {args.clip_skip} (captions read from the text encoder's layer {args.clip_skip} from the end;"
        f" generate with the same, e.g. `gradio_app.py --clip_skip {args.clip_skip}` or AUTOMATIC1111's Clip skip)"
        if args.clip_skip > 1
        else ""
    )
    # Captions read for emphasis: so are prompts, wherever the model is served.
    weighted_line = (
        "\n* Captions: read for AUTOMATIC1111's emphasis and BREAK (--weighted_captions)"
        if args.weighted_captions
        else ""
    )
    # The loss, when not upstream's (squared error over every timestep).
    loss = [args.loss_type]
    if args.loss_type in THRESHOLD_LOSSES:
        scale = f", scale {args.huber_scale:g}" if args.huber_scale != 1 else ""
        loss[0] += f" ({args.huber_schedule} schedule, c {args.huber_c:g}{scale})"
    if args.snr_gamma is not None:
        loss.append(f"Min-SNR weighting (gamma {args.snr_gamma:g})")
    if args.debiased_estimation_loss:
        loss.append("debiased estimation")
    if args.scale_v_pred_loss_like_noise_pred:
        loss.append("v-prediction loss weighed as noise prediction's")
    if args.v_pred_like_loss:
        loss.append(f"plus {args.v_pred_like_loss:g} of the v loss")
    if args.adaptive_noise_scale is not None:
        loss.append(f"noise offset {args.noise_offset:g} plus {args.adaptive_noise_scale:g} of the latents' mean")
    if args.min_timestep or args.max_timestep:
        below = f" below {args.max_timestep}" if args.max_timestep else ""
        loss.append(f"timesteps from {args.min_timestep or 0}{below}")
    if args.multires_noise_iterations:
        loss.append(
            f"multi-resolution noise ({args.multires_noise_iterations} sizes, discount {args.multires_noise_discount:g})"
        )
    if args.zero_terminal_snr:
        loss.append("zero terminal SNR (sampled with DDIM from the last timestep)")
    loss_line = f"\n* Loss and noise: {', '.join(loss)}" if loss != ["l2"] else ""
    samples = ""
    if images:
        listed = "; ".join(f'"{p}"' for p in args.validation_prompts)
        samples = f"Images generated by the fine-tuned pipeline for the prompts {listed}:\n\n{img_str}"
    warmup = f"{args.lr_warmup_steps} warmup steps"
    if isinstance(args.lr_warmup_steps, float):
        warmup = f"{args.lr_warmup_steps:.0%} of the steps as warmup"
    card = f"""
# Text-to-image fine-tuning - {repo_id}

{f"This {kind} adapter" if args.lora_rank else "This pipeline"} was fine-tuned from {shown(model)} on {shown(dataset)}.
{samples}
## Usage

{usage}

## Training

* Steps: {args.max_train_steps}
* Epochs: {args.num_train_epochs}
* Learning rate: {args.learning_rate} ({args.lr_scheduler} schedule, {warmup})
* Batch size per device: {args.train_batch_size}
* Gradient accumulation steps: {args.gradient_accumulation_steps}
* Image resolution: {args.resolution} (center crop: {args.center_crop}, random flip: {args.random_flip})
* Mixed precision: {args.mixed_precision}
* EMA: {args.use_ema}
* Seed: {args.seed}
* Aspect-ratio buckets: {buckets_used or f"none (square {args.resolution}x{args.resolution} crops)"}
* LoRA: {lora}{clip_skip_line}{weighted_line}{loss_line}{held_out_line}
"""
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(yaml + card)


class StopRequest:
    """Remembers a SIGTERM, a Ctrl-C or a hangup (SIGHUP: the terminal or ssh session the run was started from has
    closed), so training can stop after the current step with a checkpoint.

    A second Ctrl-C while the checkpoint is being written is left to Python (KeyboardInterrupt). A hangup that is
    ignored when training starts (`nohup`) stays ignored. After a hangup, what the script writes to a terminal
    goes nowhere instead: the terminal is gone, and writing to it would fail.
    """

    def __init__(self):
        self.signal = None
        self.signals = []

    def install(self):
        hangup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else []
        self.signals = [signal.SIGTERM, signal.SIGINT, *hangup]
        for signum in self.signals:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGHUP:
            for stream in (sys.stdout, sys.stderr):
                if stream.isatty():
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, stream.fileno())
                    os.close(devnull)

    def uninstall(self):
        for signum in self.signals:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def out_of_memory_message(args, err):
    """What to say when the GPU runs out of memory: the checkpoints kept, and the flags that lower the memory a
    run needs that this one does not use yet (docs/speed-and-memory.md measures each)."""
    options = []
    if not args.gradient_checkpointing:
        options.append("--gradient_checkpointing")
    if (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")) == "no":
        options.append("--mixed_precision fp16 (or bf16)")
    if not args.lora_rank and args.optimizer == "adamw" and not args.use_8bit_adam:
        options.append("--use_8bit_adam (or --optimizer Adafactor)")
    elif not args.lora_rank and args.optimizer == "prodigy":
        options.append("--optimizer Adafactor (Prodigy keeps 16 bytes per trained weight, Adafactor about 2)")
    if args.use_ema and not args.offload_ema:
        options.append("--offload_ema")
    if args.train_batch_size > 1:
        batch = args.train_batch_size * args.gradient_accumulation_steps
        options.append(f"--train_batch_size 1 --gradient_accumulation_steps {batch} (the same batch)")
    if not args.lora_rank:
        options.append("--lora_rank 4 (a LoRA instead of the whole UNet)")
    elif not args.fp8_base:
        options.append("--fp8_base (the frozen UNet in float8)")
    if not options:
        options.append("a lower --resolution")
    peak = ""
    if torch.cuda.is_available():
        used, total = torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(None).total_memory
        peak = f"; {used / 1024**3:.1f} GB of the GPU's {total / 1024**3:.1f} GB were in use at the peak"
    checkpoints = checkpoint_dirs(args.output_dir)
    kept = "no checkpoint was saved"
    if checkpoints:
        kept = f"the last checkpoint, {os.path.join(args.output_dir, checkpoints[-1])}, is kept"
    return f"out of GPU memory ({first_line(err)}){peak}; {kept}. To fit, try {', '.join(options)}"


def check_init_lora(args):
    """--init_lora: the file must hold a UNet adapter that the other flags agree with: a LoRA (or DoRA), or LyCORIS's
    LoHa or LoKr. Its kind becomes the run's --lora_type (and --use_dora), and its rank the run's --lora_rank (the
    rank of most of its layers, when they differ)."""
    check_lora_path(args.init_lora, "--init_lora")
    folder, name = lora_location(args.init_lora)
    dora = False  # a DoRA's file holds the magnitudes of its layers too
    try:
        with safe_open(os.path.join(folder, name), "pt") as f:
            kind = lycoris_kind(f.keys())
        if kind:  # LyCORIS's LoHa or LoKr, in kohya-ss keys (see sdtoolkit/lycoris.py)
            _, layers = read_lycoris_file(os.path.join(folder, name))
            ranks = {part: lycoris_ranks({m: t for m, t in layers.items() if m.startswith(prefix)})
                     for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_"))}  # fmt: skip
        else:
            state, _, _ = read_lora(args.init_lora)
            ranks = {part: adapter_ranks(state, part) for part in ("unet", "text_encoder")}
            dora = any("lora_magnitude_vector" in key for key in state)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"--init_lora {args.init_lora} is not a LoRA diffusers can read: {first_line(err)}") from err
    if args.use_dora and (kind or not dora):
        raise UserError(f"--init_lora {args.init_lora} is a {kind or 'LoRA'}, not a DoRA: leave --use_dora out")
    described, wanted = kind or ("DoRA" if dora else "LoRA"), (kind or "LoRA").lower()
    if not ranks["unet"]:
        raise UserError(f"--init_lora {args.init_lora} holds no adapter for the UNet")
    if args.lora_type not in ("lora", wanted):
        raise UserError(f"--init_lora {args.init_lora} is a {described}; leave --lora_type out or give {wanted}")
    rank = Counter(ranks["unet"]).most_common(1)[0][0]
    if args.lora_rank not in (None, rank):
        raise UserError(
            f"--init_lora {args.init_lora} is a {described} of rank {rank}; leave --lora_rank out or give {rank}"
        )
    if args.lora_alpha is not None or args.lora_target_modules != LORA_TARGETS or args.lora_conv_rank is not None:
        raise UserError(
            "--init_lora keeps the adapter's own alphas, ranks and layers; leave --lora_alpha, --lora_target_modules"
            " and --lora_conv_rank out"
        )
    if ranks["text_encoder"] and not args.train_text_encoder:
        raise UserError(
            f"--init_lora {args.init_lora} holds a {described} on the text encoder too; add --train_text_encoder to"
            " go on training both"
        )
    args.lora_type, args.lora_rank, args.use_dora = wanted, rank, not kind and dora


def main(argv=None):
    args = parse_args(argv)
    try:
        fine_tune(args)
    except torch.OutOfMemoryError as err:
        # run_main prints the line alone; the cause stays attached for callers that tell the stops apart.
        raise TrainingStopped(out_of_memory_message(args, err), 1) from err
    finally:
        # The run lets go of its folder as it ends, with an error too, not when its process exits: inside another
        # program (a notebook, a test), that program's later runs and other processes may use the folder at once.
        unlock_output_dir(args.output_dir)


def fine_tune(args):
    """The whole run, as parse_args read its flags."""
    # `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP for the processes it starts.
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    if args.use_ema and fsdp:
        raise UserError(
            "--use_ema is not supported with FSDP (the EMA copy would need the same sharding); use DDP or"
            " DeepSpeed ZeRO-2/3 (configs/accelerate/) for EMA, or drop --use_ema"
        )
    # The same for DeepSpeed, which accelerate launch announces the same way.
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if args.lora_rank and (fsdp or deepspeed):
        raise UserError(
            "--lora_rank is not supported with DeepSpeed or FSDP yet (a LoRA is small enough for DDP); use a DDP"
            " config (configs/accelerate/multi_gpu_ddp.yaml) or one GPU"
        )
    if args.train_text_encoder and (fsdp or deepspeed):
        raise UserError(
            "--train_text_encoder is not supported with DeepSpeed or FSDP yet (accelerate's DeepSpeed takes one trained"
            " model); use a DDP config (configs/accelerate/multi_gpu_ddp.yaml) or one GPU"
        )
    # DeepSpeed's offload brings an AdamW of its own, and FSDP flattens the weights that Adafactor factors: neither is
    # tried with the other optimizers.
    if args.optimizer != "adamw" and (fsdp or deepspeed):
        raise UserError(
            f"--optimizer {args.optimizer} is not supported with DeepSpeed or FSDP; use --optimizer AdamW there, or a"
            " DDP config (configs/accelerate/multi_gpu_ddp.yaml) or one GPU"
        )

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    try:
        # torch.compile comes from accelerate's launcher (--dynamo_backend and its options). Its regional
        # compilation (--dynamo_use_regional_compilation) would also compile each of the UNet's modules outside its
        # repeated blocks on its own, conv_norm_out included, and SD's UNet asks `if self.conv_norm_out:`, which a
        # compiled module answers with a TypeError. So for that flag the script compiles the regions itself, as
        # diffusers does: the UNet's transformer blocks, in place, with accelerate's backend and options, and
        # accelerate compiles nothing.
        dynamo = TorchDynamoPlugin()
        compile_blocks = dynamo.backend != DynamoBackend.NO and dynamo.use_regional_compilation
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_config=accelerator_project_config,
            # The data order of an epoch depends on the seed and the epoch only, so a resumed run can skip
            # exactly the batches already seen.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            dynamo_plugin=TorchDynamoPlugin(backend="no") if compile_blocks else None,
        )
    except (ValueError, RuntimeError) as err:  # e.g. fp16 or FSDP from an accelerate config on a machine without a GPU
        needs = " (FSDP runs on GPUs only)" if fsdp and not torch.cuda.is_available() else ""
        raise UserError(f"accelerate could not start{needs}: {first_line(err)}") from err

    def unwrap(model):
        """The model itself, without accelerate's wrappers (DDP, mixed precision) and torch.compile's: its weights
        keep their own names (a compiled model's start with _orig_mod.), as files for other tools need them."""
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    # Disable AMP for MPS.
    if torch.backends.mps.is_available():
        accelerator.native_amp = False

    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    quiet_diffusers_noise()  # diffusers' warnings at each cast of the frozen VAE and each load of an EMA UNet
    read_large_photos()  # 200-megapixel phone photos, past Pillow's guard against images from strangers

    if args.non_ema_revision != args.revision:
        logger.warning("Loading 'non_ema' weights from a revision branch is deprecated; prefer --variant non_ema.")

    # Preflight: everything that can be checked before a model is loaded or a step is taken.
    # One run per output folder: the main process holds a lock on it until the run ends (sdtoolkit/output_dir.py).
    if accelerator.is_main_process:
        check_output_dir(args.output_dir)
        took_over = lock_output_dir(args.output_dir)
        if took_over:
            logger.warning(took_over)
        remove_partial_saves(args.output_dir)
    accelerator.wait_for_everyone()
    resume_path = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resumed_state = read_training_state(resume_path) if resume_path else {}
    # A new run, or a resume of another folder's checkpoint, must not mix with an earlier run in this folder.
    resuming_here = resume_path is not None and os.path.samefile(os.path.dirname(resume_path), args.output_dir)
    if accelerator.is_main_process and not resuming_here:
        deleted = check_fresh_run(args.output_dir, overwrite=args.overwrite_output_dir, logging_dir=args.logging_dir)
        if deleted:
            logger.warning(f"--overwrite_output_dir: deleted the earlier run's {', '.join(deleted)}")
    accelerator.wait_for_everyone()
    if resume_path is not None:
        has_ema = os.path.isdir(os.path.join(resume_path, "unet_ema")) or os.path.isfile(
            os.path.join(resume_path, LORA_EMA_NAME)
        )
        if args.use_ema and not has_ema:
            raise UserError(
                f"--use_ema, but {resume_path} was saved without EMA (no unet_ema/): resume it without --use_ema,"
                " as it was trained"
            )
        if has_ema and not args.use_ema:
            logger.warning(
                f"{resume_path} holds EMA weights (unet_ema/), but --use_ema is not set: they are not loaded, and"
                " this run's checkpoints and model have no EMA; add --use_ema to keep them"
            )

    # The seed decides the data order, augmentations and noise. Without --seed one is drawn (the same on every
    # process) and stored in each checkpoint, so a resumed run continues with it.
    if args.seed is None:
        seed = resumed_state.get("seed", random.SystemRandom().randrange(2**32))
        args.seed = broadcast_object_list([seed])[0]
        logger.info(f"No --seed given: using {args.seed}")
    set_seed(args.seed)
    accelerator.dataloader_config.data_seed = args.seed

    # Handle the hub repository.
    repo_id = Path(args.output_dir).name
    if accelerator.is_main_process and args.push_to_hub:
        name = args.hub_model_id or Path(args.output_dir).name
        try:
            repo_id = create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
        except Exception as err:  # the hub's errors: offline, not logged in, no rights, the network
            raise UserError(
                f"--push_to_hub: could not create the hub repository '{name}': {first_line(err)} -- log in with"
                " `hf auth login`, or train without --push_to_hub and upload later with `hf upload`"
            ) from err

    # Load and check the data before minutes of model loading.
    with accelerator.main_process_first():
        (train_rows, repeats, image_column, caption_column, num_skipped, data_fingerprint, image_sizes, cache_crops,
         loss_weights, held_out_split) = load_training_dataset(args)  # fmt: skip
    held_out_rows, held_out_sizes = held_out_split or (None, None)
    # Captions in AUTOMATIC1111's prompt syntax: read for emphasis with --weighted_captions, else as words.
    num_weighted = check_caption_syntax(
        train_rows, caption_column, weighted=args.weighted_captions,
        shuffled=args.shuffle_tags or bool(args.caption_tag_dropout_rate),
    )  # fmt: skip
    if held_out_rows is not None:  # read as they are, never shuffled
        num_weighted += check_caption_syntax(held_out_rows, caption_column, weighted=args.weighted_captions)
    if num_weighted and not args.weighted_captions:
        logger.warning(
            f"{num_weighted} captions weigh words in AUTOMATIC1111's syntax, e.g. (word:1.2); they are read as"
            " text, brackets and numbers included (--weighted_captions reads them as weights)"
        )
    # Group the images into aspect-ratio buckets (see sdtoolkit/buckets.py).
    buckets_used = None
    if args.aspect_buckets:
        train_rows, bucket_sizes, rows_of_bucket, kept = group_into_buckets(train_rows, image_sizes, args)
        repeats = [repeats[row] for row in kept]
        loss_weights = [loss_weights[row] for row in kept] if loss_weights is not None else None
        cache_crops = [cache_crops[row] for row in kept] if cache_crops is not None else None
        buckets_used = ", ".join(sorted({f"{w}x{h}" for w, h in bucket_sizes}))
        # torch.compile specializes on shapes unless told otherwise, and accelerate launch tells it so by default.
        if dynamo.backend != DynamoBackend.NO and dynamo.dynamic is False and len(set(bucket_sizes)) > 1:
            logger.warning(
                f"torch.compile with {len(set(bucket_sizes))} aspect-ratio buckets and dynamic shapes off (accelerate"
                " launch without --dynamo_use_dynamic): every bucket compiles anew, and past dynamo's limit of"
                f" {torch._dynamo.config.recompile_limit} compiles the rest train uncompiled; add --dynamo_use_dynamic"
            )
        if held_out_rows is not None:
            # The held-out images are measured at the buckets they would train at; none is left out (one smaller
            # than every bucket is enlarged, whatever --bucket_no_upscale says).
            buckets = bucket_shapes(args)
            held_out_sizes = [buckets[b] for b in assign_buckets(held_out_sizes, buckets)[0]]
            counts = Counter(held_out_sizes)
            logger.info("--validation_split: held-out images by bucket (width x height: images): "
                        + ", ".join(f"{w}x{h}: {counts[w, h]}" for w, h in buckets if (w, h) in counts))  # fmt: skip

    # Load scheduler, tokenizer and models.
    # With LoRA the UNet's own weights are frozen too, so under mixed precision they are loaded in half
    # precision, as the VAE and text encoder are cast below: half the UNet's memory, and no float32 copy on the
    # way. The adapter is made float32 for the optimizer and the fp16 GradScaler (see sdtoolkit/lora.py).
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    noise_scheduler, tokenizer, text_encoder, vae, unet = load_models(
        args, unet_dtype=half if args.lora_rank else None
    )
    if args.prediction_type is not None:
        # set prediction_type of scheduler if defined (once, here: the held-out loss measures with it too)
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    # Zero terminal SNR (Lin et al., 2023, arXiv 2305.08891): the betas rescaled so that the last timestep's input is
    # pure noise. There the noise is the input itself, so only v (or x0) prediction learns anything from it. A base
    # model saved by such a run has its scheduler rescaled already.
    if args.zero_terminal_snr:
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
    zero_terminal_snr = bool(noise_scheduler.config.get("rescale_betas_zero_snr"))
    if zero_terminal_snr and noise_scheduler.config.prediction_type != "v_prediction":
        raise UserError(
            "zero terminal SNR (--zero_terminal_snr, or a base model trained with it) needs --prediction_type"
            " v_prediction: at the last timestep the input is the noise itself, so predicting the noise learns nothing"
        )
    # Validation samples as the model trains, and some of kohya-ss's samplers cannot rescale their betas so.
    samplers = {args.sample_sampler, *(settings.get("sampler") for settings in args.validation_settings or [])}
    unable = sorted(name for name in samplers - {None} if not supports_zero_terminal_snr(SAMPLERS[name][0]))
    if zero_terminal_snr and unable:
        able = [name for name, (kind, _) in SAMPLERS.items() if supports_zero_terminal_snr(kind)]
        raise UserError(
            f"the sampler {', '.join(unable)} (--sample_sampler, or a prompt's --ss) cannot sample with zero terminal"
            f" SNR, as this model trains; choose one of {', '.join(able)}"
        )
    # kohya-ss's loss weights between the two objectives, each for the one it is not (see sdtoolkit/losses.py).
    prediction_type = noise_scheduler.config.prediction_type
    if args.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        raise UserError(
            f"--scale_v_pred_loss_like_noise_pred weighs a v-prediction loss, and this run predicts {prediction_type}"
        )
    if args.v_pred_like_loss and prediction_type != "epsilon":
        raise UserError(
            f"--v_pred_like_loss adds a v loss to noise prediction, and this run predicts {prediction_type}"
        )
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if (args.max_timestep or 0) > num_timesteps or (args.min_timestep or 0) >= num_timesteps:
        raise UserError(
            f"--min_timestep and --max_timestep must lie in the noise schedule's {num_timesteps} timesteps (0 to"
            f" {num_timesteps}), got {args.min_timestep} and {args.max_timestep}"
        )
    if resume_path is not None and bool(args.lora_rank) != has_lora_weights(resume_path):
        raise UserError(
            f"{resume_path} is a {'LoRA' if has_lora_weights(resume_path) else 'full fine-tuning'} checkpoint:"
            f" resume it {'with the same --lora_rank' if has_lora_weights(resume_path) else 'without --lora_rank'}"
        )
    if resume_path is not None and args.lora_rank and resumed_state.get("lora_rank") not in (None, args.lora_rank):
        raise UserError(
            f"{resume_path} holds a LoRA of rank {resumed_state['lora_rank']}; resume it with --lora_rank {resumed_state['lora_rank']}"
        )
    resumed_conv_rank = resumed_state.get("flags", {}).get("lora_conv_rank")
    if resume_path is not None and args.lora_rank and resumed_conv_rank != args.lora_conv_rank:
        trained_with = (
            f"with --lora_conv_rank {resumed_conv_rank}" if resumed_conv_rank else "without --lora_conv_rank"
        )
        raise UserError(f"{resume_path} was trained {trained_with}; resume it so")
    if resume_path is not None and args.lora_rank:
        with safe_open(os.path.join(resume_path, WEIGHTS_NAME), "pt") as f:
            held = lycoris_kind(f.keys())  # "LoHa", "LoKr", or None for a LoRA
            dora = any("lora_magnitude_vector" in key for key in f.keys())
        if (held or "LoRA").lower() != args.lora_type:
            raise UserError(
                f"{resume_path} holds a {held or 'LoRA'} adapter; resume it with --lora_type {(held or 'LoRA').lower()}"
            )
        if dora != args.use_dora:
            raise UserError(
                f"{resume_path} holds a {'DoRA' if dora else 'LoRA'} adapter; resume it"
                f" {'with' if dora else 'without'} --use_dora"
            )
    if resume_path is not None and resumed_state.get("optimizer", optimizer_flags(args)) != optimizer_flags(args):
        # Another optimizer's state would not load (or would load into the wrong moments): say it before training.
        raise UserError(
            f"{resume_path} was trained with {resumed_state['optimizer']}, and its optimizer state needs them:"
            f" resume it with those flags (this run has {optimizer_flags(args)})"
        )
    if resume_path is not None and args.lora_rank:
        holds = has_text_encoder_lora(resume_path)
        if holds != args.train_text_encoder:
            raise UserError(
                f"{resume_path} {'holds a' if holds else 'has no'} LoRA on the text encoder; resume it"
                f" {'with' if holds else 'without'} --train_text_encoder"
            )
    if resume_path is not None and not args.lora_rank:
        check_same_architecture(unet, resume_path, resumed_state)
        holds = os.path.isdir(os.path.join(resume_path, "text_encoder"))
        if holds != args.train_text_encoder:
            raise UserError(
                f"{resume_path} {'holds a trained text encoder' if holds else 'has no text encoder trained'}; resume it"
                f" {'with' if holds else 'without'} --train_text_encoder"
            )
    if args.export_single_file:  # say it now, not after training
        check_sd1(args.pretrained_model_name_or_path, unet.config, vae.config, text_encoder.config.to_dict())

    if args.clip_skip > text_encoder.config.num_hidden_layers:
        raise UserError(
            f"--clip_skip {args.clip_skip} asks for a layer this text encoder lacks: it has"
            f" {text_encoder.config.num_hidden_layers}"
        )
    if args.clip_skip > 1 and args.train_text_encoder and accelerator.num_processes > 1:
        # The adapters of the layers past the one read get no gradient, which DDP takes for an error.
        raise UserError("--clip_skip with --train_text_encoder runs on one process; drop one of them for several")
    windows = args.max_token_length // 75
    num_long, num_captions = count_long_captions(train_rows, caption_column, tokenizer, windows,
                                                 weighted=args.weighted_captions)  # fmt: skip
    if num_long and windows > 1:
        logger.warning(
            f"{num_long} of {num_captions} captions take more than --max_token_length {args.max_token_length}"
            f" tokens ({windows} windows of 75); they are cut after {windows} windows"
        )
    elif num_long:
        logger.warning(
            f"{num_long} of {num_captions} captions are longer than CLIP's {tokenizer.model_max_length} tokens;"
            " they are truncated to their first tokens, as the text encoder requires (--max_token_length 150 or"
            " 225 reads them whole)"
        )

    # Freeze vae and text_encoder and set unet to trainable
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # With LoRA, the UNet is frozen too and only adapters on its attention layers train (see sdtoolkit/lora.py).
    # With --init_lora the adapter is the file's, with its alpha and layers (which the model card then shows).
    lycoris = args.lora_rank and args.lora_type != "lora"  # LyCORIS's LoHa or LoKr (see sdtoolkit/lycoris.py)
    init_lora = read_lora(args.init_lora) if args.init_lora and not lycoris else None
    init_lycoris = None  # a LoHa or LoKr file's (kind, its layers of each part)
    if args.init_lora and lycoris:
        try:
            init_lycoris = read_lycoris(os.path.join(*lora_location(args.init_lora)), unet, text_encoder)
        except ValueError as err:
            raise UserError(f"could not load --init_lora {args.init_lora} onto this model: {first_line(err)}") from err

    def start_from_init_lora(model, part, name):
        try:
            return add_lora_from_file(model, init_lora, part=part, dropout=args.lora_dropout)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"could not load --init_lora {args.init_lora} onto this {name}: {first_line(err)}"
            ) from err

    if init_lora:
        start_from_init_lora(unet, "unet", "UNet")
        args.lora_alpha, args.lora_target_modules = unet.peft_config["default"].lora_alpha, adapted_layer_names(unet)
        logger.info(
            f"--init_lora: training on from {args.init_lora} (rank {args.lora_rank}, alpha {args.lora_alpha}, on"
            f" {' '.join(args.lora_target_modules)})"
        )
    if init_lycoris:
        kind, parts = init_lycoris
        try:
            add_lycoris_from_file(unet, kind, parts["unet"])
        except ValueError as err:
            raise UserError(f"could not load --init_lora {args.init_lora} onto this UNet: {first_line(err)}") from err
        alphas = Counter(layer.alpha["default"] for layer in lycoris_layers(unet).values())
        args.lora_alpha, args.lora_target_modules = alphas.most_common(1)[0][0], adapted_layer_names(unet)
        logger.info(
            f"--init_lora: training on from {args.init_lora} ({kind}, rank {args.lora_rank}, alpha {args.lora_alpha},"
            f" on {' '.join(args.lora_target_modules)})"
        )
    lora_alpha = args.lora_alpha or args.lora_rank
    if lycoris and not init_lycoris:
        add_lycoris(unet, args.lora_type, rank=args.lora_rank, alpha=lora_alpha, target_modules=args.lora_target_modules,
                    conv_rank=args.lora_conv_rank, conv_alpha=args.lora_conv_alpha)  # fmt: skip
    elif args.lora_rank and not args.init_lora:
        add_lora(unet, rank=args.lora_rank, alpha=lora_alpha, dropout=args.lora_dropout,
                 target_modules=args.lora_target_modules, conv_rank=args.lora_conv_rank,
                 conv_alpha=args.lora_conv_alpha, use_dora=args.use_dora)  # fmt: skip
    unet_trained = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    logger.info(f"UNet trainable parameters: {sum(p.numel() for p in unet_trained):,}")
    # With --train_text_encoder and a LoRA the text encoder gets an adapter of its own, trained with the UNet's. Its
    # frozen weights are cast to the precision of the other frozen models first, so the float32 adapter stays
    # float32. `adapted_text_encoder` is that text encoder (None without the flag), for saving and loading the adapter.
    # In a full fine-tune the flag trains all of the text encoder's weights, in float32 like the UNet's.
    text_encoder_trained, adapted_text_encoder = [], None
    if args.train_text_encoder and not args.lora_rank:
        text_encoder.to(dtype=torch.float32).requires_grad_(True)
        text_encoder_trained = list(text_encoder.parameters())
        text_encoder.train()
        logger.info(f"Text encoder trainable parameters: {sum(p.numel() for p in text_encoder_trained):,}")
    elif args.train_text_encoder:
        text_encoder.to(dtype=half or torch.float32)
        if init_lycoris and init_lycoris[1]["text_encoder"]:
            kind, parts = init_lycoris
            try:
                text_encoder_trained = add_lycoris_from_file(text_encoder, kind, parts["text_encoder"])
            except ValueError as err:
                raise UserError(
                    f"could not load --init_lora {args.init_lora} onto this text encoder: {first_line(err)}"
                ) from err
        elif lycoris:  # a new adapter, also when the --init_lora file has none for the text encoder
            text_encoder_trained = add_lycoris(text_encoder, args.lora_type, rank=args.lora_rank, alpha=lora_alpha,
                                               target_modules=TEXT_ENCODER_TARGETS)  # fmt: skip
        elif init_lora and adapter_ranks(init_lora[0], "text_encoder"):
            text_encoder_trained = start_from_init_lora(text_encoder, "text_encoder", "text encoder")
        else:  # a new adapter, also when the --init_lora file has none for the text encoder
            text_encoder_trained = add_lora(text_encoder, rank=args.lora_rank, alpha=lora_alpha,
                                            dropout=args.lora_dropout, target_modules=TEXT_ENCODER_TARGETS,
                                            use_dora=args.use_dora)  # fmt: skip
        text_encoder.train()
        adapted_text_encoder = text_encoder
        logger.info(f"Text encoder trainable parameters: {sum(p.numel() for p in text_encoder_trained):,}")
    trained = unet_trained + text_encoder_trained  # what the optimizer and clipping see

    # Create EMA for the unet: a second copy of the weights, updated as an exponential moving average.
    ema_cls = InPlaceEMAModel if args.inplace_ema else EMAModel
    if args.use_ema and args.lora_rank:
        ema_unet = ema_cls(trained, foreach=args.foreach_ema)  # an average of the adapter's weights only
    elif args.use_ema and is_single_file(args.pretrained_model_name_or_path):
        # From one file, the UNet just loaded is the base's: the average starts from a copy of its weights.
        ema_unet = ema_cls(
            unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config, foreach=args.foreach_ema
        )
    elif args.use_ema:
        ema_unet = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="unet",
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
        ema_unet = ema_cls(
            ema_unet.parameters(),
            model_cls=UNet2DConditionModel,
            model_config=ema_unet.config,
            foreach=args.foreach_ema,
        )

    # A fully trained text encoder has an average of its own, beside the UNet's; each EMA with the weights it averages.
    ema_text_encoder = None
    if args.use_ema and text_encoder_trained and not args.lora_rank:
        ema_text_encoder = ema_cls(text_encoder_trained, foreach=args.foreach_ema)
    averages = []
    if args.use_ema:
        averages = [(ema_unet, trained if args.lora_rank else unet_trained)]
        averages += [(ema_text_encoder, text_encoder_trained)] if ema_text_encoder is not None else []

    @contextlib.contextmanager
    def ema_weights():
        """Inside the block the trained weights are their averages (with --use_ema), as the final save holds them."""
        for ema, weights in averages:
            ema.store(weights)
            ema.copy_to(weights)
        try:
            yield
        finally:
            for ema, weights in averages:
                ema.restore(weights)

    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    def unet_for_saving(model):
        """The whole UNet on the main process (None elsewhere). Under DeepSpeed and FSDP its weights are spread
        over the processes and are gathered first: every process must call this."""
        unwrapped = unwrap(model)
        if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return unwrapped if accelerator.is_main_process else None
        state_dict = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return None
        whole = UNet2DConditionModel.from_config(unwrapped.config)
        whole.load_state_dict(state_dict)
        return whole

    # Save and load checkpoints in diffusers format: checkpoint-N/unet (and checkpoint-N/unet_ema) are folders
    # that UNet2DConditionModel.from_pretrained reads, next to accelerate's optimizer, scheduler and RNG state.
    # Every process calls the save hook; only the main process writes. DeepSpeed and FSDP also save their own
    # (sharded) model files, which accelerate's load_state reads back.
    def save_model_hook(models, weights, output_dir):
        if lycoris and accelerator.is_main_process:
            save_lycoris(os.path.join(output_dir, WEIGHTS_NAME), unwrap(unet), adapted_text_encoder)
        elif args.lora_rank and accelerator.is_main_process:
            # The adapters only (a LoRA trains under DDP or on one process, so the main process has them whole).
            save_lora(unwrap(unet), output_dir, adapted_text_encoder)
        elif not args.lora_rank:
            for model in models:
                if isinstance(unwrap(model), CLIPTextModel):  # --train_text_encoder (DDP or one process: whole)
                    if accelerator.is_main_process:
                        unwrap(model).save_pretrained(os.path.join(output_dir, "text_encoder"))
                    continue
                unet_to_save = unet_for_saving(model)
                if accelerator.is_main_process:
                    unet_to_save.save_pretrained(os.path.join(output_dir, "unet"))
        if accelerator.is_main_process and args.use_ema and args.lora_rank:
            save_lora_ema(ema_unet, output_dir)
        elif accelerator.is_main_process and args.use_ema:
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if ema_text_encoder is not None:
                # The text encoder's average as a text encoder folder; its step count is the UNet EMA's.
                ema_text_encoder.store(text_encoder_trained)
                ema_text_encoder.copy_to(text_encoder_trained)
                text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder_ema"))
                ema_text_encoder.restore(text_encoder_trained)
        weights.clear()  # so that accelerate does not save the models a second time as model.safetensors

    def load_model_hook(models, input_dir):
        if args.lora_rank:
            if args.use_ema:
                load_lora_ema(ema_unet, input_dir)
            if lycoris:
                weights = os.path.join(input_dir, WEIGHTS_NAME)
                load_lycoris_weights(weights, unwrap(unet), adapted_text_encoder)
            else:
                load_lora(unwrap(unet), input_dir, adapted_text_encoder)
            models.clear()  # so that accelerate does not load them again
            return
        if args.use_ema:
            with warnings.catch_warnings():  # diffusers' own EMAModel.from_pretrained calls what it deprecated
                warnings.filterwarnings("ignore", message="It is deprecated to pass a pretrained model name or path")
                load_model = ema_cls.from_pretrained(
                    os.path.join(input_dir, "unet_ema"), UNet2DConditionModel, foreach=args.foreach_ema
                )
            ema_unet.load_state_dict(load_model.state_dict())
            del load_model
            if ema_text_encoder is not None:
                average = CLIPTextModel.from_pretrained(os.path.join(input_dir, "text_encoder_ema"))
                for shadow, weight in zip(ema_text_encoder.shadow_params, average.parameters(), strict=True):
                    shadow.copy_(weight)
                ema_text_encoder.optimization_step = ema_unet.optimization_step
                del average
            for ema, _ in averages:
                if args.offload_ema:
                    ema.pin_memory() if accelerator.device.type == "cuda" else None
                else:
                    ema.to(accelerator.device)

        for _ in range(len(models)):
            # pop models so that they are not loaded again
            model = models.pop()
            if isinstance(unwrap(model), CLIPTextModel):
                load_model = CLIPTextModel.from_pretrained(input_dir, subfolder="text_encoder")
                unwrap(model).load_state_dict(load_model.state_dict())
                del load_model
                continue
            # load diffusers style into model
            load_model = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model = unwrap(model)
            model.register_to_config(**load_model.config)
            model.load_state_dict(load_model.state_dict())
            del load_model

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder and not args.lora_rank:
            text_encoder.gradient_checkpointing_enable()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_blocks:
        # Each block keeps its weights' names (no _orig_mod.), so checkpoints, LoRA files and the EMA are as without.
        unet.compile_repeated_blocks(**dynamo.to_kwargs())
        blocks = sum(type(module).__name__ in unet._repeated_blocks for module in unet.modules())
        logger.info(f"torch.compile ({dynamo.backend.value.lower()}) of the UNet's {blocks} transformer blocks")

    # Enable TF32 for faster training on Ampere GPUs,
    # cf https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )

    # The trained text encoder (or its adapter) is a group of its own, at its own learning rate.
    parameters = trained
    if args.train_text_encoder:
        text_encoder_lr = args.text_encoder_lr or args.learning_rate
        if args.scale_lr and args.text_encoder_lr:
            text_encoder_lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        parameters = [{"params": unet_trained}, {"params": text_encoder_trained, "lr": text_encoder_lr}]

    # Initialize the optimizer
    if args.optimizer == "adafactor":
        # Adafactor (https://arxiv.org/abs/1804.04235), torch's: no first moment, and each weight matrix's second
        # moment as a row and a column, so its state is a fraction of AdamW's. Its own epsilons and decay of beta2.
        optimizer = torch.optim.Adafactor(parameters, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    elif args.optimizer == "prodigy":
        # Prodigy (https://arxiv.org/abs/2306.06101) estimates the step size d as it goes; the learning rate
        # multiplies d, so 1.0 uses the estimate as it is.
        import prodigyopt

        if args.learning_rate <= 0.1:
            logger.warning(
                f"--optimizer prodigy with --learning_rate {args.learning_rate:g}: Prodigy estimates the step size"
                " itself and the learning rate multiplies it, so 1.0 is the usual value"
            )
        optimizer = prodigyopt.Prodigy(
            parameters,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            eps=args.adam_epsilon,
            weight_decay=args.adam_weight_decay,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    else:
        if args.use_8bit_adam:
            # bitsandbytes on a GPU, as upstream; torchao's 8-bit AdamW on a CPU, or on a GPU without bitsandbytes.
            has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
            if accelerator.device.type == "cuda" and has_bitsandbytes:
                import bitsandbytes as bnb

                optimizer_cls, extra = bnb.optim.AdamW8bit, {}
            elif importlib.util.find_spec("torchao") is not None:
                from torchao.optim import AdamW8bit

                if accelerator.device.type == "cuda":
                    # Its step is compiled on first use: on a fresh GPU machine, a test of it had not ended after 6
                    # minutes (docs/speed-and-memory.md).
                    logger.warning("--use_8bit_adam: bitsandbytes is not installed, so torchao's AdamW8bit, whose"
                                   " first steps compile (this can take minutes); pip install bitsandbytes")  # fmt: skip
                else:
                    logger.info("--use_8bit_adam: torchao's AdamW8bit")
                optimizer_cls, extra = AdamW8bit, {}
            else:
                raise UserError("--use_8bit_adam needs bitsandbytes on a GPU: pip install bitsandbytes (or torchao)")
        else:
            # The fused kernel updates all weights at once (upstream's default on a CPU is one tensor at a time).
            optimizer_cls, extra = torch.optim.AdamW, ({"fused": True} if args.fused_adam else {})
        optimizer = optimizer_cls(
            parameters,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            **extra,
        )

    # The training examples: transformed images, token ids, and every random draw of the diffusion step,
    # all from a generator seeded by (seed, epoch, row). See sdtoolkit/data.py.
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = args.resolution // vae_scale_factor
    train_dataset = TrainingExamples(
        train_rows,
        image_column,
        caption_column,
        tokenizer,
        args,
        latent_shape=(vae.config.latent_channels, latent_size, latent_size),
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        repeats=repeats,
        loss_weights=loss_weights,
    )

    # DataLoaders creation. The loader gets its own generator, so creating an iterator (at the start of an
    # epoch, or when resuming in the middle of one) never draws from the global random state.
    if args.aspect_buckets:
        train_dataset.use_buckets(bucket_sizes)
        # Batches of one bucket each, shuffled from (seed, epoch); under several processes accelerate hands each
        # process whole batches. The sampler deals in examples: every repeat of each bucket's rows.
        bucket_of_row = {row: bucket for bucket, rows in enumerate(rows_of_bucket) for row in rows}
        examples_of_bucket = [[] for _ in rows_of_bucket]
        for index, row in enumerate(train_dataset.rows):
            examples_of_bucket[bucket_of_row[row]].append(index)
        batch_sampler = BucketBatchSampler(
            examples_of_bucket, batch_size=args.train_batch_size, seed=args.seed, examples=train_dataset
        )
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=args.dataloader_num_workers
        )
    else:
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset,
            shuffle=True,
            collate_fn=collate,
            batch_size=args.train_batch_size,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed),
        )

    # Scheduler and math around the number of training steps.
    # The LR scheduler is stepped on every process, so its warmup and length are counted in process-steps.
    num_warmup_steps_for_scheduler = args.lr_warmup_steps * accelerator.num_processes
    if args.max_train_steps is None:
        len_train_dataloader_after_sharding = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(len_train_dataloader_after_sharding / args.gradient_accumulation_steps)
        num_training_steps_for_scheduler = (
            args.num_train_epochs * num_update_steps_per_epoch * accelerator.num_processes
        )
    else:
        num_training_steps_for_scheduler = args.max_train_steps * accelerator.num_processes
    if isinstance(args.lr_warmup_steps, float):  # a share of the training steps, as kohya-ss reads a fraction
        num_warmup_steps_for_scheduler = int(args.lr_warmup_steps * num_training_steps_for_scheduler)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps_for_scheduler,
        num_training_steps=num_training_steps_for_scheduler,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    # For mixed precision training we cast the frozen text_encoder and vae weights to half-precision:
    # they are only used for inference, so full precision is not required.
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
        args.mixed_precision = accelerator.mixed_precision
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
        args.mixed_precision = accelerator.mixed_precision

    # Prepare everything with our `accelerator`. A trained text encoder is prepared too (under DDP its adapter's
    # gradients are averaged over the processes), and the training step calls it as prepared; `text_encoder`
    # stays the model itself, for saving, validation and the held-out loss.
    caption_encoder = text_encoder
    if args.train_text_encoder:
        unet, caption_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler
        )
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
    trained_models = [unet] + [caption_encoder] * args.train_text_encoder
    # --fp8_base: the frozen weights go to float8 once the models are prepared, since DDP first makes every process
    # hold the main process's weights, and cannot send float8 ones.
    if args.fp8_base:
        store_in_float8(unwrap(unet), half or torch.float32)
        if not args.gradient_checkpointing:
            logger.warning(
                "--fp8_base without --gradient_checkpointing: the backward pass needs each layer's weights as they"
                " were read, in the training precision, and holds them all at its peak, so little memory is saved;"
                " add --gradient_checkpointing"
            )
        if args.train_text_encoder:
            store_in_float8(text_encoder, half or torch.float32)

    for ema, _ in averages:
        if args.offload_ema and accelerator.device.type == "cuda":
            ema.pin_memory()
        else:
            ema.to(accelerator.device)

    # Move text_encode and vae to gpu and cast to weight_dtype (a trained text encoder already is: see above)
    if not args.train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    vae_scaling_factor = vae.config.scaling_factor

    # Encode the held-out images once, while the encoders are loaded (see sdtoolkit/held_out.py).
    held_out = None
    if held_out_rows is not None:
        held_out = HeldOutLoss(
            held_out_rows, image_column=image_column, caption_column=caption_column, resolution=args.resolution,
            interpolation=getattr(transforms.InterpolationMode, args.image_interpolation_mode.upper()),
            tokenizer=tokenizer, vae=vae, text_encoder=text_encoder, batch_size=args.train_batch_size,
            device=accelerator.device, dtype=weight_dtype, sizes=held_out_sizes if args.aspect_buckets else None,
            windows=windows, masked_loss=args.masked_loss, clip_skip=args.clip_skip,
            weighted_captions=args.weighted_captions, wildcards=args.enable_wildcard,
        )  # fmt: skip
        if accelerator.num_processes > 1:
            logger.info(f"--validation_split: the {accelerator.num_processes} processes share each measurement of the"
                        f" {len(held_out)} held-out images, batch by batch")  # fmt: skip

    # Encode the dataset once and free the encoders that are no longer needed (see --cache_latents). Latents are
    # cached only for center crops, where they are exact; random crops are encoded at every step.
    # Shuffled or dropped tags and wildcards make a new caption at every step, so they are encoded at every step too.
    # A text encoder that trains encodes differently at every step, so its captions are not cached either.
    cache_images = args.cache_latents and args.center_crop
    tags_drawn = args.shuffle_tags or args.caption_tag_dropout_rate or train_dataset.wildcards
    cache_text = args.cache_latents and not tags_drawn and not args.train_text_encoder
    if args.cache_latents and not cache_images and cache_text:
        logger.info("--cache_latents: caching captions only; without --center_crop each step crops anew")
    elif args.cache_latents and not cache_images:
        logger.info("--cache_latents: caching nothing; without --center_crop each step crops anew")
    if args.cache_latents and tags_drawn:
        logger.info(
            "--cache_latents: with --shuffle_tags, --caption_tag_dropout_rate or wildcards every step encodes its own"
            " caption; captions are not cached"
        )
    elif args.cache_latents and args.train_text_encoder:
        logger.info("--cache_latents: with --train_text_encoder every step encodes its captions; they are not cached")
    if cache_images or cache_text:
        started = time.perf_counter()
        cached = " and ".join(["latents"] * cache_images + ["text embeddings"] * cache_text)
        # In memory, or on disk when asked or when it would take more than half of the free memory; the main
        # process decides for all (see sdtoolkit/latent_cache.py).
        needed = cache_bytes(
            train_dataset, text_dim=text_encoder.config.hidden_size, dtype=weight_dtype, latents=cache_images,
            text=cache_text,
        )  # fmt: skip
        free = available_memory()
        folder, why = args.latent_cache_dir, "--latent_cache_dir"
        if folder is None and needed > free // 2:
            folder = os.path.join(DEFAULT_DISK_FOLDER, "latents")
            why = f"it takes {needed / 1024**3:.2f} GB, more than half of the {free / 1024**3:.1f} GB of free memory"
        folder, why = broadcast_object_list([folder, why])
        arrays = MemoryArrays()
        if folder is not None:
            key = cache_key(
                train_dataset, vae, text_encoder, data_fingerprint=data_fingerprint, dtype=weight_dtype,
                latents=cache_images, text=cache_text,
            )  # fmt: skip
            arrays = DiskArrays(os.path.join(folder, key))
        # A disk cache is written once, by the main process; the others then read it.
        with accelerator.main_process_first() if folder is not None else nullcontext():
            reused = arrays.exists()
            if reused:
                logger.info(f"Reading the cached {cached} from {arrays.folder}, written by an earlier run with the"
                            " same model, data and settings")  # fmt: skip
            elif folder is not None:
                os.makedirs(folder, exist_ok=True)
                if shutil.disk_usage(folder).free < needed * 1.1:
                    raise UserError(
                        f"the latent cache needs {needed / 1024**3:.2f} GB but {folder} has"
                        f" {shutil.disk_usage(folder).free / 1024**3:.2f} GB free; give --latent_cache_dir on a"
                        " bigger disk"
                    )
                logger.info(f"Caching {cached} on disk in {arrays.folder} ({why})")
            else:
                logger.info(f"Caching {cached} in memory: {needed / 1024**3:.2f} GB of {free / 1024**3:.1f} GB free")
            try:
                latents_cache, text_cache = encode_cache(
                    train_dataset, vae, text_encoder, accelerator.device, weight_dtype, arrays=arrays,
                    crops=cache_crops, batch_size=args.vae_batch_size, latents=cache_images, text=cache_text,
                )  # fmt: skip
            except torch.OutOfMemoryError as err:
                # Before training: the optimizer's flags would not help, a smaller batch of images would.
                smaller = "--vae_batch_size 1" if args.vae_batch_size > 1 else "a lower --resolution"
                raise TrainingStopped(
                    f"out of GPU memory while caching the latents, before the first step ({first_line(err)}); try"
                    f" {smaller}",
                    1,
                ) from err
        del cache_crops
        train_dataset.use_cache(latents_cache, text_cache)
        freed = " and ".join(["VAE"] * cache_images + ["text encoder"] * cache_text)
        done = "Read" if reused else "Cached"
        images = f"{len(train_dataset.dataset)} images"
        if len(train_dataset) > len(train_dataset.dataset):
            images += f" ({len(train_dataset)} examples with repeats)"
        logger.info(
            f"{done} {cached} of {images} in {time.perf_counter() - started:.2f} s; freeing the {freed}",
            main_process_only=False,
        )
        if cache_text:
            text_encoder = caption_encoder = None
        if cache_images:
            vae = None
        # On a GPU, what the encoders held goes back to the card (gc first, for any reference cycle); on a CPU
        # their memory is freed as their last reference goes, and a full collection costs 0.3 s of a tiny run.
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()

    # We need to recalculate our total training steps as the size of the training dataloader may have changed.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    # Afterwards we recalculate our number of training epochs
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # We need to initialize the trackers we use, and also store our configuration.
    # The trackers initializes automatically on the main process. The hub token is never logged.
    if accelerator.is_main_process:
        tracker_config = {
            k: v for k, v in vars(args).items() if k not in ("validation_prompts", "validation_settings", "hub_token")
        }
        tracker_config = {
            k: ("" if v is None else " ".join(v) if isinstance(v, list) else v) for k, v in tracker_config.items()
        }
        accelerator.init_trackers(args.tracker_project_name, tracker_config)

    # Train!
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # What this run is (seed, batch size, model, data) and the flags that decide what it trains, written into
    # every checkpoint, so that a resume with other ones says so.
    identity = run_identity(args, total_batch_size, data_fingerprint, len(train_dataset), noise_scheduler)
    flags = training_flags(args)

    logger.info("***** Running training *****")
    logger.info(
        f"  Num examples = {len(train_dataset)}" + (f" ({num_skipped} unreadable skipped)" if num_skipped else "")
    )
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step = 0
    first_epoch = 0
    resume_batches = 0  # batches of the first epoch that were already trained on before the checkpoint

    # Potentially load in the weights and states from a previous save
    if resume_path is not None:
        logger.info(f"Resuming from checkpoint {os.path.basename(resume_path)}", main_process_only=False)
        try:
            accelerator.load_state(resume_path)
        except ValueError as err:  # the load hooks' and torch's word for a checkpoint of another shape
            raise UserError(
                f"could not resume from {resume_path}: {first_line(err)} -- resume it with the flags it was trained"
                " with (its training_state.json lists them)"
            ) from err
        global_step = checkpoint_step(resume_path)
        # The LR schedule counts process-steps; recount it for this run's number of processes.
        recount_lr_schedule(lr_scheduler.scheduler, optimizer, global_step * accelerator.num_processes)
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
        changes = identity_changes(resumed_state, identity)
        if changes:
            logger.warning(
                f"{resume_path} was written by a run with other settings ({'; '.join(changes)}): training continues"
                f" from step {global_step}, but not on the same data order as the original run would have"
            )
        changed_flags = flag_changes(resumed_state.get("flags", {}), flags)
        if changed_flags:
            logger.warning(
                f"{resume_path} was trained with other flags than this command's ({'; '.join(changed_flags)}):"
                f" training continues from step {global_step} with this command's"
            )
    initial_global_step = global_step

    # The held-out losses measured so far, [step, loss] each, and each image's loss at the first measurement (what
    # the last one is compared with, image by image); kept in every checkpoint, so a resumed run has them.
    resumed = resumed_state if resume_path is not None else {}
    held_out_losses = resumed.get("validation_losses", [])
    held_out_first = resumed.get("validation_first_per_image")
    held_out_last = None  # each image's loss at the latest measurement

    def training_state(epoch):
        state = {"global_step": global_step, "epoch": epoch, "num_processes": accelerator.num_processes, **identity,
                 "flags": flags}  # fmt: skip
        if held_out is not None:
            state.update(validation_losses=held_out_losses, validation_first_per_image=held_out_first)
        return state

    def measure_held_out():
        """The held-out loss of the weights the run would save now (the EMA weights with --use_ema), logged and
        kept. Every process measures (under DeepSpeed ZeRO-3 and FSDP the UNet's forward needs them all)."""
        nonlocal held_out_first, held_out_last
        with ema_weights():
            losses, held_out_last = held_out(
                unwrap(unet), noise_scheduler, accelerator.autocast, accelerator,
                text_encoder=text_encoder if args.train_text_encoder else None,
            )  # fmt: skip
        if held_out_first is None or len(held_out_first) != len(held_out_last):  # the first, or another split
            held_out_first = held_out_last
        if held_out_losses and held_out_losses[-1][0] == global_step:
            held_out_losses.pop()  # measured again at the same step (a run resumed at its last step)
        held_out_losses.append([global_step, losses["validation_loss"]])
        accelerator.log(losses, step=global_step)
        logger.info(f"Held-out loss at step {global_step}: {losses['validation_loss']:.5f}")

    def checkpoint(epoch):
        return save_checkpoint(
            accelerator, args.output_dir, global_step, training_state(epoch), args.checkpoints_total_limit
        )

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=initial_global_step,
        desc="Steps",
        # Only show the progress bar once on each machine.
        disable=not accelerator.is_local_main_process,
    )

    def validate():
        """The validation images, drawn on the main process with the EMA weights when there are some."""
        if not accelerator.is_main_process:
            return
        with ema_weights():
            log_validation(vae, text_encoder, tokenizer, unet, args, accelerator, weight_dtype, global_step)

    # The base model's held-out loss and, with --sample_at_first, its validation images (validation/step-0): the
    # references for every later one. A resumed run has them already.
    if held_out is not None and global_step == 0:
        measure_held_out()
    if args.sample_at_first and global_step == 0:
        validate()

    saved_at_step = None
    # Upstream's loss is the squared error's mean over the batch; these options weigh it per element or example.
    weighed = (
        args.loss_type != "l2"
        or args.snr_gamma is not None
        or args.debiased_estimation_loss
        or args.masked_loss
        or args.scale_v_pred_loss_like_noise_pred
        or args.v_pred_like_loss
    )
    on = dict(device=accelerator.device, dtype=torch.float32)
    loss_sum, micro_steps, last = torch.zeros((), **on), 0, time.perf_counter()
    text_encoder_steps = args.stop_text_encoder_training or math.inf  # the optimizer steps a trained one trains
    stop = StopRequest()
    stop.install()
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            train_dataset.epoch = epoch
            epoch_dataloader = train_dataloader
            if epoch == first_epoch and resume_batches > 0:
                # Skip the batches this epoch already trained on (their indices only: nothing is loaded).
                epoch_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            epoch_dataloader.set_epoch(epoch)

            for batch in epoch_dataloader:
                if global_step >= args.max_train_steps:
                    break  # resumed from a checkpoint at (or past) the last step: nothing left to train
                with accelerator.accumulate(*trained_models):
                    # Convert images to latent space: a sample of the VAE's latent distribution (cached or not).
                    if "latent_mean" in batch:
                        mean, std = batch["latent_mean"], batch["latent_std"]
                    else:
                        latent_dist = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
                        mean, std = latent_dist.mean, latent_dist.std
                    latents = (mean + std * batch["latent_noise"].to(weight_dtype)) * vae_scaling_factor

                    # The noise to add to the latents, and a timestep per image: drawn with the example.
                    noise = batch["noise"]
                    if args.noise_offset:
                        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
                        offset = args.noise_offset
                        if "offset_strength" in batch:  # --noise_offset_random_strength: a share of it per example
                            offset = offset * batch["offset_strength"].view(-1, 1, 1, 1)
                        if args.adaptive_noise_scale is not None:
                            # kohya-ss's: more offset for a channel whose latents' mean is far from 0, [B, C, 1, 1]
                            mean = latents.mean(dim=(2, 3), keepdim=True).abs()
                            offset = (offset + args.adaptive_noise_scale * mean).clamp(min=0)
                        noise = noise + offset * batch["offset_noise"]
                    if args.input_perturbation:
                        # https://arxiv.org/abs/2301.11706
                        new_noise = noise + args.input_perturbation * batch["perturbation"]
                    timesteps = batch["timestep"].long()

                    # Add noise to the latents according to the noise magnitude at each timestep
                    # (this is the forward diffusion process)
                    if args.input_perturbation:
                        noisy_latents = noise_scheduler.add_noise(latents, new_noise, timesteps)
                    else:
                        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

                    # Get the text embedding for conditioning. A text encoder that trains stops getting gradients
                    # at --stop_text_encoder_training, so its weights stay as they are from then on.
                    with torch.set_grad_enabled(global_step < text_encoder_steps):
                        if "encoder_hidden_states" in batch:
                            encoder_hidden_states = batch["encoder_hidden_states"]
                        elif windows > 1:
                            encoder_hidden_states = encode_windows(caption_encoder, batch["input_ids"], args.clip_skip)
                        else:
                            encoder_hidden_states = encode_text(caption_encoder, batch["input_ids"], args.clip_skip)
                    if "token_weights" in batch:  # --weighted_captions: the words' emphasis (see emphasize)
                        encoder_hidden_states = emphasize(encoder_hidden_states, batch["token_weights"])
                    # With captions in windows, the empty windows a caption is padded with are masked out.
                    encoder_attention_mask = token_mask(batch["window_mask"]) if windows > 1 else None

                    # Get the target for loss depending on the prediction type (set after loading the scheduler)
                    if noise_scheduler.config.prediction_type == "epsilon":
                        target = noise
                    elif noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        raise UserError(f"unknown prediction type {noise_scheduler.config.prediction_type}")

                    if args.dream_training:
                        # DREAM: https://arxiv.org/abs/2312.00210 -- one extra gradient-free UNet pass
                        noisy_latents, target = compute_dream_and_update_latents(
                            unet,
                            noise_scheduler,
                            timesteps,
                            noise,
                            noisy_latents,
                            target,
                            encoder_hidden_states,
                            args.dream_detail_preservation,
                        )

                    # Predict the noise residual and compute loss
                    model_pred = unet(
                        noisy_latents, timesteps, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        return_dict=False,
                    )[0]  # fmt: skip

                    if not weighed and "loss_weight" not in batch:
                        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                    else:
                        # Upstream's squared error, or --loss_type's (see sdtoolkit/losses.py).
                        thresholds = None
                        if args.loss_type in THRESHOLD_LOSSES:
                            thresholds = huber_thresholds(
                                noise_scheduler, timesteps, args.huber_schedule, args.huber_c, args.huber_scale
                            )
                        loss = loss_per_element(model_pred.float(), target.float(), args.loss_type, thresholds)
                        if args.masked_loss:
                            # Each latent pixel weighs the image's opacity there; the mean is still over all of
                            # them, as kohya-ss takes it, so an image that is half transparent counts half.
                            loss = loss * batch["loss_mask"]
                        loss = loss.mean(dim=list(range(1, len(loss.shape))))
                        if args.snr_gamma is not None:
                            # Compute loss-weights as per Section 3.4 of https://arxiv.org/abs/2303.09556.
                            # Since we predict the noise instead of x_0, the original formulation is slightly
                            # changed. This is discussed in Section 4.2 of the same paper.
                            snr = compute_snr(noise_scheduler, timesteps)
                            mse_loss_weights = torch.stack(
                                [snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1
                            ).min(dim=1)[0]
                            if noise_scheduler.config.prediction_type == "epsilon":
                                mse_loss_weights = mse_loss_weights / snr
                            elif noise_scheduler.config.prediction_type == "v_prediction":
                                mse_loss_weights = mse_loss_weights / (snr + 1)
                            loss = loss * mse_loss_weights
                        if args.scale_v_pred_loss_like_noise_pred:
                            loss = loss * snr_scale(noise_scheduler, timesteps)
                        if args.v_pred_like_loss:
                            loss = loss + args.v_pred_like_loss * loss / snr_scale(noise_scheduler, timesteps)
                        if args.debiased_estimation_loss:
                            loss = loss * debiased_weights(noise_scheduler, timesteps)
                        if "loss_weight" in batch:
                            # Regularization images (--reg_data_dir) weigh --prior_loss_weight in the mean.
                            loss = loss * batch["loss_weight"]
                        loss = loss.mean()

                    # Backpropagate
                    loss_sum += loss.detach()
                    micro_steps += 1
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # The one host-device sync of a step: the mean loss over the accumulated micro-batches and
                        # all processes (for the log), and whether any process was asked to stop.
                        stats = torch.stack([loss_sum / micro_steps, torch.tensor(stop.signal is not None, **on)])
                        stats = accelerator.gather(stats[None]).cpu()
                        train_loss, stop_now = stats[:, 0].mean().item(), bool(stats[:, 1].max() > 0)
                        loss_sum.zero_()
                        micro_steps = 0
                        # A NaN or Inf loss would poison the weights: stop before the optimizer applies it.
                        if not math.isfinite(train_loss):
                            accelerator.end_training()
                            raise TrainingStopped(
                                nonfinite_loss_message(train_loss, global_step + 1, args.output_dir), 1
                            )
                        # 0 is no clipping, as kohya-ss reads it (a bound of 0 would zero every gradient).
                        if args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()

                # Checks if the accelerator has performed an optimization step behind the scenes
                if accelerator.sync_gradients:
                    if args.scale_weight_norms:
                        # kohya-ss's max-norm regularization of the adapters' updates (see sdtoolkit/lora.py).
                        adapted = [unet] + ([adapted_text_encoder] if adapted_text_encoder is not None else [])
                        norm_stats = max_norm_regularize(adapted, args.scale_weight_norms)
                    for ema, weights in averages:
                        if args.offload_ema:
                            ema.to(device=accelerator.device, non_blocking=True)
                        ema.step(weights)
                        if args.offload_ema:
                            ema.to(device="cpu", non_blocking=True)
                    progress_bar.update(1)
                    global_step += 1
                    if global_step == text_encoder_steps:
                        logger.info(
                            f"Step {global_step}: the text encoder stops training (--stop_text_encoder_training)"
                        )
                    now = time.perf_counter()
                    logs = {"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0], "step_seconds": now - last}
                    if args.scale_weight_norms:
                        names = ("lora_keys_scaled", "lora_mean_norm", "lora_max_norm")
                        logs.update(zip(names, torch.stack(norm_stats).tolist()))
                    last = now
                    accelerator.log(logs, step=global_step)
                    progress_bar.set_postfix(step_loss=train_loss, lr=logs["lr"])

                    if global_step % args.checkpointing_steps == 0:
                        if held_out is not None:
                            measure_held_out()
                        save_path = checkpoint(epoch)
                        saved_at_step = global_step
                        logger.info(f"Saved state to {save_path}")
                    if args.validation_steps and global_step % args.validation_steps == 0:
                        validate()

                    # A SIGTERM, Ctrl-C or hangup on any process stops all of them after this same step.
                    if stop_now and global_step < args.max_train_steps:
                        if saved_at_step != global_step:
                            save_path = checkpoint(epoch)
                        accelerator.end_training()
                        signum = stop.signal or signal.SIGTERM
                        raise TrainingStopped(
                            f"{signal.Signals(signum).name} at step {global_step} of {args.max_train_steps}; the"
                            f" state is saved in {save_path}. Resume with the same command and"
                            " --resume_from_checkpoint latest",
                            exit_code=128 + signum,
                        )

                if global_step >= args.max_train_steps:
                    break

            if (
                args.validation_prompts is not None
                and not args.validation_steps
                and epoch % args.validation_epochs == 0
            ):
                validate()
            # A checkpoint at the end of every N-th epoch (kohya-ss's --save_every_n_epochs).
            if (
                args.save_every_n_epochs
                and (epoch + 1) % args.save_every_n_epochs == 0
                and global_step < args.max_train_steps  # the last epoch's is the final save
                and saved_at_step != global_step  # a step's checkpoint has just saved this one
            ):
                if held_out is not None:
                    measure_held_out()
                save_path = checkpoint(epoch)
                saved_at_step = global_step
                logger.info(f"Saved state to {save_path} at the end of epoch {epoch + 1}")
    finally:
        progress_bar.close()  # ends the bar's line, so a message after it starts on its own
        stop.uninstall()
    # kohya-ss's --save_state_on_train_end: the last step's checkpoint, unless it was just saved (or resumed from).
    if args.save_state_on_train_end and saved_at_step != global_step and global_step > initial_global_step:
        if held_out is not None:
            measure_held_out()
        save_path = checkpoint(epoch)
        logger.info(f"Saved state to {save_path} at the end of training")
    # The held-out loss at the end, and whether it changed beyond chance since the first measurement.
    held_out_change = None
    if held_out is not None:
        if held_out_last is None or held_out_losses[-1][0] != global_step:
            measure_held_out()
        held_out_change = compare(held_out_first, held_out_last)

    # Create the pipeline using the trained modules and save it.
    accelerator.wait_for_everyone()
    unet = unet_for_saving(unet)
    if accelerator.is_main_process:
        if args.use_ema:
            ema_unet.copy_to(trained if args.lora_rank else unet.parameters())
        if ema_text_encoder is not None:
            ema_text_encoder.copy_to(text_encoder_trained)

        # The VAE and the text encoder (trained, with --train_text_encoder) as the run holds them; those freed after
        # caching are loaded again. The tokenizer is the one trained with (not read again).
        frozen = {name: model for name, model in (("vae", vae), ("text_encoder", text_encoder)) if model is not None}
        pipeline = base_pipeline(args, **frozen, tokenizer=tokenizer, unet=unet)
        facts = {**identity, "global_step": global_step, "resolution": args.resolution,
                 "learning_rate": args.learning_rate}  # fmt: skip
        if args.lora_rank:
            # The adapter only, in diffusers' and in kohya-ss keys (see sdtoolkit/lora.py). Each file's header
            # names the run and its base model, for A1111 and for metrics.py and gradio_app.py. A DoRA is saved in
            # diffusers' keys only: AUTOMATIC1111 would read its magnitudes as another model's.
            if not lycoris:
                record = training_metadata(None, facts, layout="LoRA (diffusers keys)")
                save_lora(unet, args.output_dir, adapted_text_encoder, header=record)
            kohya = os.path.join(args.output_dir, KOHYA_WEIGHTS_NAME)
            header = kohya_metadata(
                facts, name=Path(args.output_dir).resolve().name, rank=args.lora_rank, alpha=lora_alpha,
                prediction_type=noise_scheduler.config.prediction_type, tags=tag_frequency(train_rows[caption_column]),
                clip_skip=args.clip_skip, algo=args.lora_type if lycoris else None, conv_rank=args.lora_conv_rank,
                conv_alpha=args.lora_conv_alpha or args.lora_conv_rank,
            )  # fmt: skip
            header.update(training_metadata(None, facts, layout="LoRA (kohya-ss keys)"))
            if lycoris:  # one format, LyCORIS's in kohya-ss keys, in both files (see sdtoolkit/lycoris.py)
                for name in (WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
                    save_lycoris(os.path.join(args.output_dir, name), unet, adapted_text_encoder, metadata=header)
            elif not args.use_dora:
                adapters = kohya_state_dict(unet, adapted_text_encoder)
                with written_atomically(kohya) as partial:
                    save_file(adapters, partial, metadata=header)
            kind = adapter_name(args)
            files = WEIGHTS_NAME if args.use_dora else f"{WEIGHTS_NAME}, and {KOHYA_WEIGHTS_NAME}"
            logger.info(f"Saved the {kind} adapter to {args.output_dir} ({files})")
        else:
            save_pipeline(pipeline, args.output_dir)
            logger.info(f"Saved the fine-tuned pipeline to {args.output_dir}")
        # The same pipeline (a LoRA merged into its base) as one file in the original SD 1.x layout, for
        # AUTOMATIC1111 and ComfyUI.
        if args.export_single_file:
            single_file = os.path.join(args.output_dir, single_file_name(args.output_dir))
            export_single_file(args.output_dir, single_file, training=facts)
            merged = f", the {kind} merged into its base model" if args.lora_rank else ""
            logger.info(f"Exported it as one file (float16, SD 1.x keys{merged}) to {single_file}")
            if os.path.isfile(ldm_config_path(single_file)):
                logger.info(f"... and {ldm_config_path(single_file)}, which tells AUTOMATIC1111 that it predicts v")

        # Run a final round of inference.
        images = []
        if args.validation_prompts is not None:
            logger.info("Running inference for collecting generated images...")
            images = generate_validation_images(pipeline, args, accelerator)
            folder = save_validation_images(images, args, "final")
            logger.info(f"Saved final validation images to {folder}")

        held_out_report = held_out_summary(held_out_losses, held_out_change) if held_out is not None else None
        text_encoder_targets = None
        if adapted_text_encoder is not None:
            text_encoder_targets = adapted_layer_names(adapted_text_encoder)
        example_caption = next((caption for caption in all_captions(train_rows, caption_column) if caption), None)
        save_model_card(args, repo_id, images, buckets_used, held_out_report, text_encoder_targets, example_caption)
        if held_out is not None:
            logger.info(f"Held-out loss ({len(held_out)} images, --validation_split): {held_out_report}")

        if args.push_to_hub:
            try:
                upload_folder(
                    repo_id=repo_id,
                    folder_path=args.output_dir,
                    commit_message="End of training",
                    ignore_patterns=["step_*", "epoch_*", ".lock*"],
                    token=args.hub_token,
                )
            except Exception as err:  # the hub's errors; the model is saved whatever happens here
                raise UserError(
                    f"the model is saved in {args.output_dir}, but uploading it to the hub repository '{repo_id}'"
                    f" failed: {first_line(err)} -- upload it later with `hf upload {repo_id} {args.output_dir}`"
                ) from err

    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
