"""Loading a Stable Diffusion pipeline for inference, the same way in metrics.py and gradio_app.py.

`pick_device_and_dtype("auto", "auto")` is CUDA + float16 when a GPU exists, else CPU + float32.
`load_pipeline(path, device, dtype)` loads from a local folder, a hub id or one SD 1.x .safetensors file
(see sdtoolkit/export.py), safetensors only, and turns every way that can fail into one line saying what
to do. It also loads what a training run wrote that is not a whole pipeline, on the base model the run
names (a folder, a hub id or one file; see trained_model):

    sd-model/checkpoint-500      a checkpoint: the base model with the checkpoint's UNet (its EMA weights when
                                 the run had EMA, as the run's final save would hold), and its text encoder
                                 when the run trained one (--train_text_encoder)
    lora-model                   a LoRA run's output: the base model with the adapter on top
    lora-model/checkpoint-500    a LoRA checkpoint: the same, with the adapter's EMA weights when it has them
    lora-model/pytorch_lora_weights_kohya.safetensors   the LoRA file alone
"""

import ast
import inspect
import json
import os
import re
import warnings

import diffusers
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.peft_utils import get_adapter_name
from huggingface_hub import metadata_load
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel
from transformers.utils import logging as transformers_logging

from sdtoolkit.embeddings import safetensors_files
from sdtoolkit.errors import UserError, first_line
from sdtoolkit.lora import (
    KOHYA_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_lora_path,
    has_lora_ema,
    has_lora_weights,
    holds_lora,
    load_lora_ema_weights,
    lora_location,
    read_lora,
)
from sdtoolkit.lycoris import load_lycoris, lycoris_kind

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# What diffusers' EMAModel.save_pretrained writes into an averaged model's config.json.
EMA_SETTINGS = {"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"}


def says_something(record):
    message = record.getMessage()
    if "should be kept in float32: []" in message:
        return False
    unexpected = re.match(r"The config attributes (\{.*\}) were passed to ", message)
    if unexpected:
        try:
            return not set(ast.literal_eval(unexpected.group(1))) <= EMA_SETTINGS
        except (ValueError, SyntaxError):  # a value that is not a literal: not EMAModel's settings
            return True
    return True


def quiet_diffusers_noise():
    """Leave out two of diffusers 0.42's warnings that say nothing: the one at every cast of a model to another
    precision when its list of modules to keep in float32 is empty, as a VAE's is ("... should be kept in float32:
    []"), and the one at every load of an EMA UNet (a checkpoint's unet_ema/), whose config.json holds EMAModel's
    settings (decay, optimization_step, ...) as diffusers saves it ("... are not expected and will be ignored.
    Please verify your config.json"). A model with modules to keep still warns, and so does any other unexpected
    config. (Each logger keeps one such filter however often this is called.)"""
    for name in ("diffusers.models.modeling_utils", "diffusers.configuration_utils"):
        diffusers.utils.logging.get_logger(name).addFilter(says_something)


def load_lora(pipeline, path, adapter_name=None, flag="--lora"):
    """Load a LoRA onto the pipeline (its UNet, and its text encoder when the LoRA has one): a folder holding
    pytorch_lora_weights.safetensors, or one .safetensors file in diffusers' or kohya-ss keys (see sdtoolkit/lora.py),
    as the adapter `adapter_name` (diffusers' next default name when None)."""
    check_lora_path(path, flag)
    try:
        # LyCORIS's LoHa and LoKr files are not LoRAs: PEFT's layers of their kinds take them (sdtoolkit/lycoris.py).
        folder, name = lora_location(path)
        with safe_open(os.path.join(folder, name), "pt") as f:
            if lycoris_kind(f.keys()):
                load_lycoris(pipeline, os.path.join(folder, name), adapter_name or get_adapter_name(pipeline.unet))
                return
        # What pipeline.load_lora_weights does, with the alphas read_lora mends for the text encoder.
        state, alphas, metadata = read_lora(path)
        if not state:
            raise ValueError("it holds no LoRA weights")
        if not all("lora" in key for key in state):
            raise ValueError(
                f"it holds weights that are not a LoRA's, such as {next(k for k in state if 'lora' not in k)}"
            )
        pipeline.load_lora_into_unet(
            state, alphas, pipeline.unet, adapter_name=adapter_name, metadata=metadata, _pipeline=pipeline
        )
        pipeline.load_lora_into_text_encoder(
            state, alphas, pipeline.text_encoder, lora_scale=pipeline.lora_scale, adapter_name=adapter_name,
            metadata=metadata, _pipeline=pipeline,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise UserError(f"could not load the LoRA {path} onto this pipeline: {first_line(err)}") from err


def merge_loras(pipeline, paths, ratios):
    """Merge the LoRAs (LoHas, LoKrs) at `paths` into the pipeline's UNet and text encoder weights, each at its ratio
    (as AUTOMATIC1111's <lora:NAME:ratio>), and take their layers away; the pipeline samples as they were trained
    (see lora_sampling), a LoRA checkpoint with its EMA weights. What sdtoolkit.export --lora and
    sdtoolkit.extract_lora do with LoRAs."""
    names = [f"merged_{i}" for i in range(len(paths))]
    for path, name in zip(paths, names):
        pipeline = sample_as_trained(pipeline, path, **lora_sampling(path))
        load_lora(pipeline, path, adapter_name=name)
        load_lora_checkpoint_ema(pipeline, path, adapter=name)  # a LoRA checkpoint's EMA weights, when it has them
    pipeline.set_adapters(names, adapter_weights=list(ratios))
    pipeline.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipeline.unload_lora_weights()  # the adapters' layers go, their updates stay in the fused weights
    return pipeline


def load_lora_dir(pipeline, folder, loaded=None):
    """Load every LoRA file in `folder` (searched recursively, as AUTOMATIC1111's models/Lora) as an adapter of
    its own, for prompts' <lora:name:weight> tags, name being the file's name without .safetensors; with `loaded`
    ({name: adapter} loaded before), only the files whose names are not in it. The LoRA the pipeline serves, if
    any, stays the one applied. Returns ({name: adapter name} of the files loaded, [(file, why skipped), ...])."""
    if not os.path.isdir(folder):
        raise UserError(f"--lora_dir {folder}: no such folder")
    served = pipeline.get_active_adapters()
    files, skipped = safetensors_files(folder)
    loras, seen = {}, set()
    adapters = {a for names in pipeline.get_list_adapters().values() for a in names}
    for path, shown, name in files:
        if name in seen:
            skipped.append((shown, f"another file is named {name} too"))
            continue
        seen.add(name)
        if name in (loaded or {}):
            continue
        # A tag applies a LoRA to the model as it samples; one trained for another objective can't share it.
        sampling, scheduler = lora_sampling(path), pipeline.scheduler.config
        if sampling["prediction_type"] not in (None, scheduler.prediction_type):
            skipped.append((shown, f"it was trained for {sampling['prediction_type']}, and this model predicts"
                                   f" {scheduler.prediction_type}; serve it with --lora, which samples as it was trained"))  # fmt: skip
            continue
        if sampling["zero_terminal_snr"] and not scheduler.get("rescale_betas_zero_snr"):
            skipped.append((shown, "it was trained with zero terminal SNR, and this model samples without it; serve it"
                                   " with --lora, which samples as it was trained"))  # fmt: skip
            continue
        adapter = next(f"lora_dir_{i}" for i in range(len(adapters) + 1) if f"lora_dir_{i}" not in adapters)
        adapters.add(adapter)
        # Said of every file but meant for one adapter alone: PEFT's warning that the model now holds several,
        # and transformers' report that the text encoder's other adapters are missing from this file.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora(pipeline, path, adapter_name=adapter, flag="--lora_dir")
        except UserError as err:
            if adapter in pipeline.get_list_adapters().get("unet", []):
                pipeline.delete_adapters(adapter)  # the UNet's part loaded, the text encoder's did not
            skipped.append((shown, str(err).split(": ", 1)[-1]))
            continue
        finally:
            transformers_logging.set_verbosity(verbosity)
        loras[name] = adapter
    # Loading an adapter makes it the one applied: apply the served LoRA again, or none.
    if served:
        pipeline.set_adapters(served)
    elif loras:
        pipeline.disable_lora()
    return loras, skipped


def add_model_config_argument(parser):
    """The --model_config flag of metrics.py and gradio_app.py, for single-file models."""
    parser.add_argument(
        "--model_config",
        default=None,
        help=(
            "For a --model_path that is one .safetensors file (the original SD 1.x layout, as A1111 and ComfyUI"
            " load): a diffusers SD 1.x pipeline (folder or hub id) whose configs match it, e.g. its base model."
            " Found by itself when the file sits in a pipeline folder or names a local one in its metadata; else"
            " diffusers takes SD 1.5's from the hub."
        ),
    )


# Files that hold a whole model in the original SD layout. Only safetensors is read: the others are pickles, which
# can run any code when loaded.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_single_file(name):
    """Whether a model name is one file (a whole model in the original layout) rather than a folder or hub id."""
    return os.path.isfile(name) and name.lower().endswith(SINGLE_FILE_SUFFIXES)


def check_file_exists(name):
    """One line for a model named like a file (model.safetensors) that is not there."""
    if name.lower().endswith(SINGLE_FILE_SUFFIXES) and not os.path.exists(name):
        raise UserError(f"no such file: '{name}' (from {os.getcwd()})")


def single_file_config(path, config):
    """The diffusers pipeline (folder or hub id) whose configs describe the single file at `path`: `config`, else
    the folder the file sits in (--export_single_file writes it there), else the base model its metadata names,
    if local, else None: diffusers then takes the configs of the model family it detects from the hub."""
    metadata = safetensors_metadata(path)
    if config is not None:
        if looks_like_local_path(config) and not os.path.isfile(os.path.join(config, "model_index.json")):
            raise UserError(f"--model_config {config} is not a diffusers pipeline folder (no model_index.json)")
        return config
    beside = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(beside, "model_index.json")):
        return beside
    # A file this toolkit exported names the configs its run used, or its base model.
    for named in (metadata.get("sdtoolkit.model_config"), metadata.get("sdtoolkit.model")):
        if named and os.path.isfile(os.path.join(named, "model_index.json")):
            return named
    return None


def safetensors_metadata(path):
    """The header metadata of a .safetensors file, or one line saying it is not one."""
    if not path.lower().endswith(".safetensors"):
        raise UserError(
            f"'{path}' is a pickle file, which can run code when loaded; this toolkit reads .safetensors only:"
            " convert it with a tool you trust, or use the model's .safetensors download"
        )
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for files that aren't safetensors
        raise UserError(f"'{path}' is not a readable .safetensors file: {first_line(err)}") from err


def add_lora_scale_argument(parser):
    """The --lora_scale flag of metrics.py and gradio_app.py."""
    parser.add_argument(
        "--lora_scale",
        type=float,
        default=1.0,
        help="How strongly the LoRA applies: 1 as trained, 0 not at all (AUTOMATIC1111's <lora:NAME:scale>).",
    )


def is_lora(model_path, lora=None):
    """Whether a pipeline loaded from (model_path, lora) carries a LoRA: a --lora, or a LoRA as the model."""
    trained = trained_model(model_path) if lora is None else None
    return lora is not None or (trained is not None and "LoRA" in trained["kind"])


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
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device} is no device torch knows; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(
            f"--device {device} was asked for, but this machine has {count} CUDA GPU{'s' * (count > 1)}"
            f" (cuda:0 to cuda:{count - 1})"
        )
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


def load_pipeline(model_path, device, dtype, config=None, lora=None, lora_scale=1.0, ema=None):
    """A StableDiffusionPipeline from a folder, a hub id, one .safetensors file in the original SD 1.x layout
    (configs from `config`, see single_file_config), or a training run's checkpoint or LoRA (see trained_model),
    with the LoRA at `lora` loaded on top, any LoRA applied at `lora_scale`, on `device` in `dtype`, progress
    bars off. ema: a full fine-tune's checkpoint's unet_ema/ (True) or unet/ (False); None, its EMA weights when
    it has them."""
    trained = trained_model(model_path)
    if ema is not None and (trained is None or trained["kind"] != "checkpoint"):
        raise UserError(
            f"--ema and --no-ema are for a full fine-tune's checkpoint-N folder, and '{model_path}' is not one (a"
            " saved pipeline already holds the EMA weights when the run had EMA)"
        )
    if trained is not None:
        if lora is not None:
            raise UserError(
                f"'{model_path}' is already a LoRA or checkpoint on its base model; --lora needs a pipeline"
            )
        pipeline = load_trained(model_path, trained, dtype, config, ema)
    elif is_single_file(model_path):
        pipeline = load_single_file(model_path, dtype, config)
    else:
        pipeline = load_folder_or_hub(model_path, dtype)
    if lora is not None:
        pipeline = sample_as_trained(pipeline, lora, **lora_sampling(lora))
        load_lora(pipeline, lora)
    adapters = pipeline.get_active_adapters()
    if adapters and lora_scale != 1:
        pipeline.set_adapters(adapters, adapter_weights=[lora_scale] * len(adapters))
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def trained_model(path):
    """What a training run wrote at `path` that is not a whole pipeline, or None:
    {"kind": "checkpoint" | "LoRA" | "LoRA checkpoint", "base": model, "revision": ...}.

    The base model comes from the run's own records: a checkpoint's training_state.json, or the header of the
    kohya-ss file a LoRA run writes (sdtoolkit.model, see sdtoolkit/lora.py).
    """
    if os.path.isfile(path) and path.endswith(".safetensors"):
        if not holds_lora(path):
            return None  # a whole pipeline in one file, or no safetensors file: load_single_file says so
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        kind, folder = "LoRA", os.path.dirname(path) or "."
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        folder, metadata = path, {}
        state = os.path.join(folder, "training_state.json")
        if has_lora_weights(folder):
            kind = "LoRA checkpoint" if os.path.isfile(state) else "LoRA"
        elif os.path.isfile(state) and os.path.isdir(os.path.join(folder, "unet")):
            kind = "checkpoint"
        else:
            return None
    else:
        return None
    # The base model: the file's own header, else the kohya file beside it, else the folder's training state.
    record = run_record(folder, metadata)
    base = record.get("model")
    if base is None:
        raise UserError(
            f"'{path}' is a LoRA that does not name its base model; pass the base model as --model_path and"
            " this as --lora"
        )
    return {"kind": kind, "base": base, "revision": record.get("revision"), "config": record.get("model_config"),
            "prediction_type": recorded_prediction_type(record), "vae": record.get("vae"),
            "zero_terminal_snr": recorded_zero_terminal_snr(record)}  # fmt: skip


def run_record(folder, metadata):
    """What the training run recorded of what it wrote in `folder`: the header `metadata` of the file given (without
    its "sdtoolkit." prefixes) if it is this toolkit's, else the header of the kohya-ss file beside it or of the
    diffusers one (a DoRA run writes no kohya-ss file), else the folder's training_state.json; the header given,
    when none of them is this toolkit's."""
    record = {key.removeprefix("sdtoolkit."): value for key, value in metadata.items()}
    for name in (KOHYA_WEIGHTS_NAME, WEIGHTS_NAME):
        if "model" not in record and os.path.isfile(os.path.join(folder, name)):
            with safe_open(os.path.join(folder, name), "pt") as f:
                record = {key.removeprefix("sdtoolkit."): value for key, value in (f.metadata() or {}).items()}
    if "model" not in record and os.path.isfile(os.path.join(folder, "training_state.json")):
        with open(os.path.join(folder, "training_state.json"), encoding="utf-8") as f:
            record = json.load(f)
    return record


def lora_sampling(path):
    """sample_as_trained's arguments for a LoRA loaded on top of a model (--lora, --lora_dir): what its run trained
    the model to predict, when the run changed it. A v-prediction or zero terminal SNR run's LoRA makes the model it
    is on one too; any other LoRA samples as the model does, whatever base it was trained on."""
    folder, name = lora_location(path)
    try:
        with safe_open(os.path.join(folder, name), "pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # load_lora says what is wrong with the file
        return {"prediction_type": None, "zero_terminal_snr": False}
    record = run_record(folder, metadata)
    prediction_type = recorded_prediction_type(record)
    return {
        "prediction_type": prediction_type if prediction_type == "v_prediction" else None,
        "zero_terminal_snr": recorded_zero_terminal_snr(record),
    }


def recorded_prediction_type(record):
    """What a run's record (training_state.json, or a .safetensors header without its "sdtoolkit." prefixes) says
    the model predicts, "epsilon" or "v_prediction", or None: this toolkit's prediction_type, else the ModelSpec
    key kohya-ss writes ("v" or "epsilon")."""
    modelspec = {"v": "v_prediction", "epsilon": "epsilon"}.get(record.get("modelspec.prediction_type"))
    return record.get("prediction_type") or modelspec


def recorded_zero_terminal_snr(record):
    """Whether a run's record (as for recorded_prediction_type; a header holds strings) says it was trained with
    --zero_terminal_snr."""
    return record.get("zero_terminal_snr") in (True, "True")


def supports_zero_terminal_snr(scheduler_class):
    """Whether a diffusers scheduler can rescale its betas to zero SNR at the last timestep (PNDM can't)."""
    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


# Lin et al. (arXiv 2305.08891, section 3.4) rescale classifier-free guidance for a model with zero terminal SNR:
# its guided prediction's spread is brought back toward the prompt-only prediction's, with phi = 0.7, so that high
# guidance does not overexpose the image. diffusers' pipeline does it with `guidance_rescale`.
ZERO_SNR_GUIDANCE_RESCALE = 0.7


def default_guidance_rescale(scheduler):
    """The guidance rescale a pipeline with this scheduler samples with unless told otherwise: 0.7 when it
    samples with zero terminal SNR (see sample_as_trained), else 0 (off)."""
    return ZERO_SNR_GUIDANCE_RESCALE if scheduler.config.get("rescale_betas_zero_snr") else 0.0


def sample_as_trained(pipeline, source, *, prediction_type=None, zero_terminal_snr=False):
    """The pipeline sampling as its UNet was trained, as the run recorded it (a checkpoint or LoRA on its base model,
    or a file it exported, which holds no scheduler; or the pipeline a run saves):

    - prediction_type: its scheduler's prediction type set to it (a --prediction_type v_prediction run of an epsilon
      base). None leaves it.
    - zero_terminal_snr: a --zero_terminal_snr run's: the scheduler's betas rescaled to zero SNR at the last
      timestep, and its steps taken from that timestep down ("trailing"), as Lin et al. sample (arXiv 2305.08891,
      sections 3.1 and 3.3). PNDM can't rescale, so DDIM takes its place, as in the paper. Its guidance is then
      rescaled too (see default_guidance_rescale), by whoever calls the pipeline."""
    scheduler, changes = pipeline.scheduler, {}
    if prediction_type is not None and prediction_type != scheduler.config.prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr"):
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if changes:
        kind = type(scheduler)
        if zero_terminal_snr and not supports_zero_terminal_snr(kind):
            kind = DDIMScheduler
        pipeline.scheduler = kind.from_config(scheduler.config, **changes)
        shown = ", ".join(f"{key}={value}" for key, value in changes.items())
        print(f"{source}: sampled as it was trained, with {kind.__name__} ({shown})")
    return pipeline


def recorded_in_folder(path, key):
    """What training recorded under `key` in the folder `path` (a run's output, checkpoint or LoRA folder): the
    values in its training_state.json and in its model card's metadata, None where absent."""
    found = []
    state, card = os.path.join(path, "training_state.json"), os.path.join(path, "README.md")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            found.append(json.load(f).get(key))
    if os.path.isfile(card):
        try:
            found.append((metadata_load(card) or {}).get(key))
        except (OSError, ValueError, yaml.YAMLError):  # metadata that is not YAML: nothing recorded there
            pass
    return found


def recorded_weighted_captions(path):
    """Whether the model or LoRA folder at `path` was trained with --weighted_captions, as training recorded it (a
    checkpoint's training_state.json, a model card's `weighted_captions`). False for a file or a hub model."""
    return os.path.isdir(path) and True in recorded_in_folder(path, "weighted_captions")


def recorded_clip_skip(path):
    """The clip skip (see sdtoolkit/clip_windows.py) the model or LoRA at `path` was trained with, as training
    recorded it, or None: a checkpoint's training_state.json, a model card's `clip_skip`, or a .safetensors
    header's sdtoolkit.clip_skip or kohya-ss's ss_clip_skip (a file, or a LoRA folder's files). Hub models are not
    looked up."""
    found = []
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        headers = [path]
    elif os.path.isdir(path):
        found = recorded_in_folder(path, "clip_skip")
        headers = [os.path.join(path, name) for name in (KOHYA_WEIGHTS_NAME, WEIGHTS_NAME)]
    else:
        return None
    for file in headers:
        try:
            with safe_open(file, "pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # missing or not safetensors: nothing recorded there
            continue
        found += [metadata.get("sdtoolkit.clip_skip"), metadata.get("ss_clip_skip")]
    for value in found:
        # kohya-ss writes "None" when its run had no --clip_skip.
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
    return None


def pick_clip_skip(clip_skip, model_path, lora=None, layers=None):
    """(clip skip, where it came from): --clip_skip when given, else the LoRA's recorded one, else the model's (see
    recorded_clip_skip), else 1 (the text encoder's last layer). With `layers`, the text encoder's layer count, a
    clip skip it can't read is one line."""
    picked = (clip_skip, "--clip_skip") if clip_skip is not None else (1, "the default")
    for path in (lora, model_path) if clip_skip is None else ():
        recorded = recorded_clip_skip(path) if path else None
        if recorded is not None:
            picked = (recorded, f"as {path} was trained")
            break
    if layers is not None and not 1 <= picked[0] <= layers:
        got = picked[0] if clip_skip is not None else f"{picked[0]} ({picked[1]})"
        raise UserError(f"--clip_skip must be from 1 (the last layer, the default) to {layers}, got {got}")
    return picked


def checkpoint_unet(path, ema=None):
    """A full checkpoint's UNet folder: unet_ema/ (ema=True) or unet/ (ema=False); by default unet_ema/ when the
    run had EMA, which is what its final save would hold."""
    if ema is None:
        ema = os.path.isdir(os.path.join(path, "unet_ema"))
    return os.path.join(path, "unet_ema" if ema else "unet")


def checkpoint_text_encoder(path, ema=None):
    """A full checkpoint's text encoder folder when the run trained it (--train_text_encoder), else None: its
    text_encoder_ema/ or text_encoder/, as checkpoint_unet chooses the UNet's."""
    if not os.path.isdir(os.path.join(path, "text_encoder")):
        return None
    averaged = os.path.basename(checkpoint_unet(path, ema)) == "unet_ema"
    return os.path.join(path, "text_encoder_ema" if averaged else "text_encoder")


def load_trained(path, trained, dtype, config=None, ema=None):
    """The base model with the checkpoint's UNet, or with the LoRA on top (see trained_model). config: for a base
    model that is one file, the pipeline whose configs describe it, if not the one the run used. ema: a full
    checkpoint's weights to load (see checkpoint_unet)."""
    base, kind = trained["base"], trained["kind"]
    config = config or trained["config"]
    if looks_like_local_path(base) and not os.path.exists(base):
        fix = "pass the base model as --model_path and this as --lora" if "LoRA" in kind else "put it back there"
        raise UserError(f"'{path}' is a {kind} of the base model {base}, which is no longer there; {fix}")
    # A run with its own VAE (--pretrained_vae_model_name_or_path) is sampled with it.
    if trained["vae"] is not None:
        print(f"{path}: with the VAE it was trained with, {trained['vae']}")
    vae = {"vae": load_vae(trained["vae"], dtype, base=base, config=config)} if trained["vae"] is not None else {}
    if kind == "checkpoint":
        folder = checkpoint_unet(path, ema)
        if not os.path.isdir(folder):
            raise UserError(f"{path} has no {os.path.basename(folder)}/ (the run had no --use_ema): drop --ema")
        try:
            unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the checkpoint's UNet {folder}: {first_line(err)}") from err
        components, parts = {"unet": unet, **vae}, f"{os.path.basename(folder)}/"
        text_folder = checkpoint_text_encoder(path, ema)
        if text_folder is not None:  # the run trained the text encoder too
            try:
                components["text_encoder"] = CLIPTextModel.from_pretrained(
                    text_folder, dtype=dtype, use_safetensors=True
                )
            except (OSError, ValueError) as err:
                raise UserError(f"could not load the checkpoint's {text_folder}: {first_line(err)}") from err
            parts += f" and {os.path.basename(text_folder)}/"
        print(f"{path}: a checkpoint, its {parts} on its base model {base}")
        pipeline = load_base_model(base, dtype, trained["revision"], config, **components)
        return sample_as_trained(pipeline, path, **trained_sampling(trained))
    pipeline = load_base_model(base, dtype, trained["revision"], config, **vae)
    pipeline = sample_as_trained(pipeline, path, **trained_sampling(trained))
    load_lora(pipeline, path)
    weights = "adapter's EMA weights" if load_lora_checkpoint_ema(pipeline, path) else "adapter"
    print(f"{path}: a {kind}, its {weights} on its base model {base}")
    return pipeline


def load_lora_checkpoint_ema(pipeline, path, adapter=None):
    """Put a LoRA checkpoint's EMA weights into its adapter loaded on the pipeline (`adapter`: its name, when the
    pipeline holds others), as the run's final save would hold them; whether `path` is a checkpoint that has them.
    They are in the order training kept them: the UNet's adapter, then the text encoder's when the run trained one."""
    if not (os.path.isfile(os.path.join(path, "training_state.json")) and has_lora_ema(path)):
        return False
    named = [*pipeline.unet.named_parameters(), *pipeline.text_encoder.named_parameters()]
    weights = [p for name, p in named if ".lora_" in name and (adapter is None or f".{adapter}." in name)]
    try:
        load_lora_ema_weights(weights, path)
    except ValueError as err:
        raise UserError(f"could not load the LoRA checkpoint's EMA weights: {err}") from err
    return True


def trained_sampling(trained):
    """sample_as_trained's arguments from trained_model's record."""
    return {"prediction_type": trained["prediction_type"], "zero_terminal_snr": trained["zero_terminal_snr"]}


def load_single_file(path, dtype, config=None, **components):
    """A pipeline from one file in the original SD 1.x layout, with its configs from `config` (see
    single_file_config); components given (a trained UNet, ...) are used as they are."""
    folder = single_file_config(path, config)
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            path, config=folder, local_files_only=True, torch_dtype=dtype, **{"safety_checker": None, **components}
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if folder is None:
            why = "HF_HUB_OFFLINE=1 is set" if os.environ.get("HF_HUB_OFFLINE") == "1" else first_line(err)
            raise UserError(
                f"'{path}' is one file without its configs, and diffusers could not fetch SD 1.5's from the hub"
                f" ({why}); pass --model_config with a diffusers SD 1.x pipeline folder whose configs match it (its"
                " base model, e.g. a local copy of CompVis/stable-diffusion-v1-4)"
            ) from err
        raise UserError(
            f"could not load '{path}' with the configs of {folder}: {first_line(err)} -- is it an SD 1.x"
            " file, and --model_config a pipeline of the same architecture?"
        ) from err
    # One file holds no scheduler: a file this toolkit exported says in its header how its UNet was trained.
    header = {key.removeprefix("sdtoolkit."): value for key, value in safetensors_metadata(path).items()}
    return sample_as_trained(
        pipeline, path, prediction_type=recorded_prediction_type(header),
        zero_terminal_snr=recorded_zero_terminal_snr(header),
    )  # fmt: skip


def load_vae(name, dtype, *, base, config=None):
    """A VAE in place of the base model's (--pretrained_vae_model_name_or_path, kohya-ss's --vae): a diffusers
    AutoencoderKL folder or hub id (stabilityai/sd-vae-ft-mse), a pipeline folder (its vae/), or one .safetensors
    VAE file in the original layout (vae-ft-mse-840000-ema-pruned.safetensors, as A1111 loads), whose config is the
    base model's VAE's (config: for a base model that is one file, the pipeline whose configs describe it)."""
    check_file_exists(name)
    try:
        if is_single_file(name):
            safetensors_metadata(name)  # a pickle is refused here
            pipeline = single_file_config(base, config) if is_single_file(base) else config or base
            return AutoencoderKL.from_single_file(name, config=pipeline, subfolder="vae", torch_dtype=dtype)
        subfolder = "vae" if os.path.isfile(os.path.join(name, "vae", "config.json")) else None
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"could not load the VAE '{name}': {first_line(err)} -- give a diffusers VAE folder or hub id, or one"
            " .safetensors VAE file"
        ) from err


def load_base_model(name, dtype, revision=None, config=None, **components):
    """A base model named by a training run (a folder, a hub id or one file), with `components` in place of its own."""
    if is_single_file(name):
        return load_single_file(name, dtype, config, **components)
    return load_folder_or_hub(name, dtype, revision=revision, **components)


def load_folder_or_hub(model_path, dtype, revision=None, **components):
    check_file_exists(model_path)
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
        return StableDiffusionPipeline.from_pretrained(
            model_path, dtype=dtype, use_safetensors=True, revision=revision, **components
        )
    except (OSError, ValueError, EnvironmentError) as err:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 is set: only local folders and the local cache work)"
        raise UserError(
            f"could not load the pipeline '{model_path}'{hint}: {first_line(err)} -- if it is meant to be a local"
            " folder, it does not exist (`make demo` writes demo/sd-demo-model, `bash train.sh` sd-pokemon-model)"
        ) from err
