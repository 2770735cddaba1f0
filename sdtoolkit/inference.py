"""Loading a Stable Diffusion pipeline for inference, the same way in metrics.py and gradio_app.py.

`pick_device_and_dtype("auto", "auto")` is CUDA + float16 when a GPU exists, else CPU + float32.
`load_pipeline(path, device, dtype)` loads from a local folder or a hub id, safetensors only, and turns
every way that can fail into one line saying what to do.
"""

import json
import os

import torch
from diffusers import StableDiffusionPipeline

from sdtoolkit.errors import UserError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def load_pipeline(model_path, device, dtype):
    """A StableDiffusionPipeline from a folder or hub id, on `device` in `dtype`, progress bars off."""
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
        pipeline = StableDiffusionPipeline.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as err:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 is set: only local folders and the local cache work)"
        raise UserError(
            f"could not load the pipeline '{model_path}'{hint}: {first_line(err)} -- if it is meant to be a local"
            " folder, it does not exist (`make demo` writes demo/sd-demo-model, `bash train.sh` sd-pokemon-model)"
        ) from err
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
