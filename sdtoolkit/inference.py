"""Loading a Stable Diffusion pipeline for inference, the same way in metrics.py and gradio_app.py.

`pick_device_and_dtype("auto", "auto")` is CUDA + float16 when a GPU exists, else CPU + float32.
`load_pipeline(path, device, dtype)` loads from a local folder, a hub id or one SD 1.x .safetensors file
(see sdtoolkit/export.py), safetensors only, and turns every way that can fail into one line saying what
to do.
"""

import json
import os

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdtoolkit.errors import UserError, first_line
from sdtoolkit.lora import has_lora_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_lora(pipeline, path):
    """Load a LoRA onto the pipeline's UNet: a folder holding pytorch_lora_weights.safetensors, or one .safetensors
    file in diffusers' or kohya-ss keys (see sdtoolkit/lora.py)."""
    folder, weight_name = (
        (os.path.dirname(path) or ".", os.path.basename(path)) if os.path.isfile(path) else (path, None)
    )
    if weight_name is None and not has_lora_weights(folder):
        raise UserError(
            f"--lora {path}: no LoRA there (a .safetensors file, or a folder with pytorch_lora_weights.safetensors)"
        )
    try:
        pipeline.load_lora_weights(folder, weight_name=weight_name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"could not load the LoRA {path} onto this pipeline: {first_line(err)}") from err


def add_model_config_argument(parser):
    """The --model_config flag of metrics.py and gradio_app.py, for single-file models."""
    parser.add_argument(
        "--model_config",
        default=None,
        help=(
            "For a --model_path that is one .safetensors file (the original SD 1.x layout, as A1111 and ComfyUI"
            " load): a diffusers SD 1.x pipeline folder whose configs match it, e.g. its base model. Found by"
            " itself when the file sits in a pipeline folder or names a local base model in its metadata."
        ),
    )


def single_file_config(path, config):
    """The pipeline folder whose configs describe the single file at `path`: `config`, else the folder the file
    sits in (--export_single_file writes it there), else the base model its metadata names, if local."""
    if config is not None:
        if not os.path.isfile(os.path.join(config, "model_index.json")):
            raise UserError(f"--model_config {config} is not a diffusers pipeline folder (no model_index.json)")
        return config
    beside = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(beside, "model_index.json")):
        return beside
    try:
        with safe_open(path, "pt") as f:
            base = (f.metadata() or {}).get("sdtoolkit.model")
    except Exception as err:  # safetensors raises its own error types for files that aren't safetensors
        raise UserError(f"'{path}' is not a readable .safetensors file: {first_line(err)}") from err
    if base and os.path.isfile(os.path.join(base, "model_index.json")):
        return base
    raise UserError(
        f"'{path}' is one file without its configs; pass --model_config with a diffusers SD 1.x pipeline folder"
        " whose configs match it (its base model, e.g. a local copy of CompVis/stable-diffusion-v1-4)"
    )


def add_device_arguments(parser):
    """The --device and --dtype flags of metrics.py and gradio_app.py."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (float16 on CUDA, else float32), float32, float16, bfloat16"
    )


def pick_device_and_dtype(device="auto", dtype="auto"):
    """Resolve the --device and --dtype options to a torch.device and a torch.dtype."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if dtype == "auto":
        # Half precision is fast on GPUs; on a CPU it is slow or unsupported for some ops.
        dtype = "float16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype}")
    return device, DTYPES[dtype]


def looks_like_local_path(name):
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1


def missing_components(folder):
    """The components a pipeline folder's model_index.json lists (unet, vae, ...) whose sub-folder is missing."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except ValueError as err:
        raise UserError(f"{folder}/model_index.json is not valid JSON ({err}); save the pipeline again") from err
    listed = [name for name, value in index.items() if isinstance(value, list) and None not in value]
    return [name for name in listed if not os.path.isdir(os.path.join(folder, name))]


def load_pipeline(model_path, device, dtype, config=None, lora=None):
    """A StableDiffusionPipeline from a folder, a hub id, or one .safetensors file in the original SD 1.x layout
    (configs from `config`, see single_file_config), with the LoRA at `lora` loaded on top, on `device` in
    `dtype`, progress bars off."""
    if model_path.endswith(".safetensors") and os.path.isfile(model_path):
        pipeline = load_single_file(model_path, dtype, config)
    else:
        pipeline = load_folder_or_hub(model_path, dtype)
    if lora is not None:
        load_lora(pipeline, lora)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_single_file(path, dtype, config):
    folder = single_file_config(path, config)
    try:
        return StableDiffusionPipeline.from_single_file(
            path, config=folder, local_files_only=True, torch_dtype=dtype, safety_checker=None
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"could not load '{path}' with the configs of {folder}: {first_line(err)} -- is it an SD 1.x"
            " file, and --model_config a pipeline of the same architecture?"
        ) from err


def load_folder_or_hub(model_path, dtype):
    if looks_like_local_path(model_path):
        if not os.path.isdir(model_path):
            raise UserError(
                f"no model folder at '{model_path}': train one with `bash train.sh` (GPU and hub) or"
                " `make demo` (the offline demo model, in demo/sd-demo-model)"
            )
        if not os.path.isfile(os.path.join(model_path, "model_index.json")):
            raise UserError(
                f"'{model_path}' is not a complete diffusers pipeline folder (no model_index.json);"
                " point to the folder that training wrote with save_pretrained (its --output_dir)"
            )
        missing = missing_components(model_path)
        if missing:
            raise UserError(
                f"the pipeline folder '{model_path}' lacks {', '.join(f'{name}/' for name in missing)}, which its"
                " model_index.json lists; copy the whole folder that training wrote, not only some of its parts"
            )
    try:
        return StableDiffusionPipeline.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as err:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 is set: only local folders and the local cache work)"
        raise UserError(
            f"could not load the pipeline '{model_path}'{hint}: {first_line(err)} -- if it is meant to be a local"
            " folder, it does not exist (`make demo` writes demo/sd-demo-model, `bash train.sh` sd-pokemon-model)"
        ) from err
