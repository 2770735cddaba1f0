"""Export a diffusers Stable Diffusion 1.x pipeline as one .safetensors file in the original (CompVis/LDM) layout.

AUTOMATIC1111, ComfyUI and diffusers' own `from_single_file` read SD 1.x models as one file whose keys follow
the original training code: the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`, the
CLIP text encoder under `cond_stage_model.transformer.` (its keys keep transformers' `text_model.` prefix).

    python -m sdtoolkit.export sd-pokemon-model sd-pokemon.safetensors            # fp16 (the default)
    python -m sdtoolkit.export sd-pokemon-model/checkpoint-1500 out.safetensors --no-half   # its EMA weights if any
    python -m sdtoolkit.export sd-pokemon-lora merged.safetensors                 # a LoRA merged into its base
    python -m sdtoolkit.export base.safetensors out.safetensors --lora a.safetensors --ratios 0.8   # any LoRA, merged

The mapping below is built from each model's config: the UNet's blocks are numbered in one sequence in the
original layout (input_blocks, middle_block, output_blocks), where diffusers nests them (down_blocks.i.resnets.j),
and a few layers have other names. The VAE's attention projections are 1x1 convolutions there, linear layers
here. Nothing is written until every tensor has a place, and the file is written under a temporary name and
renamed, so a failed export leaves no half-written file.

A v-prediction model gets a second file beside it, `<name>.yaml`: the original code's config with
`parameterization: "v"`, which AUTOMATIC1111 reads beside a checkpoint of the same name. Without it, it takes
any SD 1.x file for a noise-predicting one, and its images come out as noise.
"""

import argparse
import json
import os

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtoolkit.atomic_files import written_atomically
from sdtoolkit.errors import UserError, run_main
from sdtoolkit.inference import (
    add_model_config_argument,
    checkpoint_text_encoder,
    checkpoint_unet,
    is_single_file,
    load_base_model,
    load_pipeline,
    load_vae,
    looks_like_local_path,
    merge_loras,
    quiet_diffusers_noise,
    run_record,
    trained_model,
)
from sdtoolkit.lora import holds_lora

# The names that differ inside one UNet resnet, and inside one VAE resnet or attention block.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

SD1_DOWN_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D"}
SD1_UP_BLOCKS = {"CrossAttnUpBlock2D", "UpBlock2D"}


def unet_prefixes(config):
    """[(diffusers prefix, original prefix, renames)] for every module of an SD 1.x UNet with this config."""
    per_block = config["layers_per_block"]
    prefixes = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
                ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
                ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
                ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]  # fmt: skip
    blocks = len(config["down_block_types"])
    # input_blocks: conv_in, then per down block its layers (a resnet and maybe an attention each), then its
    # downsampler (all but the last block).
    for block, kind in enumerate(config["down_block_types"]):
        for layer in range(per_block):
            index = 1 + block * (per_block + 1) + layer
            prefixes.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", UNET_RESNET))
            if kind.startswith("CrossAttn"):
                prefixes.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.", {}))
        if block < blocks - 1:
            prefixes.append(
                (
                    f"down_blocks.{block}.downsamplers.0.conv.",
                    f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.",
                    {},
                )
            )
    # output_blocks: per up block, one layer more than down; the upsampler sits in the block's last layer,
    # after its attention if it has one.
    for block, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for layer in range(per_block + 1):
            index = block * (per_block + 1) + layer
            prefixes.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", UNET_RESNET))
            if attention:
                prefixes.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.", {}))
        if block < blocks - 1:
            last = block * (per_block + 1) + per_block
            prefixes.append(
                (f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{last}.{2 if attention else 1}.conv.", {})
            )
    return prefixes


def vae_prefixes(config):
    """[(diffusers prefix, original prefix, renames)] for every module of an SD 1.x VAE with this config."""
    prefixes = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    blocks = len(config["down_block_types"])
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                     (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                     (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]  # fmt: skip
    for block in range(blocks):
        prefixes.append((f"encoder.down_blocks.{block}.resnets.", f"encoder.down.{block}.block.", VAE_RESNET))
        prefixes.append(
            (f"encoder.down_blocks.{block}.downsamplers.0.conv.", f"encoder.down.{block}.downsample.conv.", {})
        )
        # The decoder's blocks are numbered from the bottom in the original layout.
        original = blocks - 1 - block
        prefixes.append((f"decoder.up_blocks.{block}.resnets.", f"decoder.up.{original}.block.", VAE_RESNET))
        prefixes.append((f"decoder.up_blocks.{block}.upsamplers.0.conv.", f"decoder.up.{original}.upsample.conv.", {}))
    return prefixes


def rename(state_dict, prefixes, into, what):
    """Each tensor of state_dict under its original key (into + mapped key); UserError if one has no place."""
    out = {}
    for key, tensor in state_dict.items():
        match = max((p for p in prefixes if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        if match is None:
            raise UserError(f"the {what} has a weight the SD 1.x layout has no place for: {key}")
        source, target, renames = match
        rest = key[len(source) :]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        out[into + target + rest] = tensor
    return out


def check_sd1(folder, unet_config, vae_config, text_config):
    """UserError naming what makes the pipeline in `folder` something other than Stable Diffusion 1.x."""
    problems = []
    if (
        not set(unet_config.get("down_block_types", [])) <= SD1_DOWN_BLOCKS
        or not set(unet_config.get("up_block_types", [])) <= SD1_UP_BLOCKS
    ):
        problems.append(f"UNet blocks {unet_config.get('down_block_types')} / {unet_config.get('up_block_types')}")
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"UNet mid block {unet_config['mid_block_type']}")
    if not isinstance(unet_config.get("layers_per_block"), int):
        problems.append(f"layers_per_block {unet_config.get('layers_per_block')} (one number per block)")
    if unet_config.get("use_linear_projection"):
        problems.append("linear attention projections (SD 2.x)")
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        problems.append("extra conditioning embeddings (SDXL, upscalers)")
    if text_config.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
        problems.append(f"text encoder {text_config.get('architectures')}")
    if vae_config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"VAE {vae_config.get('_class_name')}")
    if problems:
        raise UserError(
            f"{folder} is not a Stable Diffusion 1.x pipeline ({'; '.join(problems)}); this export writes SD 1.x's layout"
        )


def read_config(folder):
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_weights(folder):
    """The state dict in a model folder's safetensors file."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_file(path)
    raise UserError(f"{folder} has no safetensors weights (diffusion_pytorch_model.safetensors or model.safetensors)")


def sources(path, ema):
    """The weights and configs of the UNet, VAE and text encoder to export, and the training state if there is one.

    path: a pipeline folder (as training saves it) or a checkpoint-N folder, whose VAE and text encoder are
    the base model's (named in its training_state.json: a pipeline folder or one file). ema: the checkpoint's
    unet_ema instead of its unet;
    None: unet_ema when the checkpoint has one (what the run's final save would hold, and what metrics.py and
    gradio_app.py load from a checkpoint).
    """
    if os.path.isfile(os.path.join(path, "model_index.json")):
        if ema is not None:
            raise UserError(
                f"--ema and --no-ema are for checkpoint folders; a saved pipeline ({path}) already holds the EMA weights when the run had EMA"
            )
        states = sorted(
            (d for d in os.listdir(path) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()),
            key=lambda d: int(d.split("-")[1]),
        )
        state = os.path.join(path, states[-1], "training_state.json") if states else None
        folders = [os.path.join(path, name) for name in ("unet", "vae", "text_encoder")]
        return [read_weights(d) for d in folders], [read_config(d) for d in folders], state
    trained = trained_model(path)
    if trained is None or trained["kind"] != "checkpoint":
        raise UserError(
            f"{path} is neither a pipeline folder (no model_index.json) nor a checkpoint (no training_state.json)"
        )
    base = trained["base"]
    unet = checkpoint_unet(path, ema)
    if not os.path.isdir(unet):
        raise UserError(f"{path} has no {os.path.basename(unet)}/" + (" (the run had no --use_ema)" if ema else ""))
    text_encoder = checkpoint_text_encoder(path, ema)  # a text encoder the run trained (--train_text_encoder)
    state = os.path.join(path, "training_state.json")
    if is_single_file(base) or not looks_like_local_path(base):
        # A base model in one file, or on the hub (or in its local cache): its VAE and text encoder as diffusers
        # loads them.
        vae = (
            {"vae": load_vae(trained["vae"], torch.float32, base=base, config=trained["config"])}
            if trained["vae"]
            else {}
        )
        pipeline = load_base_model(base, torch.float32, trained["revision"], trained["config"], unet=None, **vae)
        weights = [read_weights(unet), pipeline.vae.state_dict(), pipeline.text_encoder.state_dict()]
        configs = [read_config(unet), dict(pipeline.vae.config), pipeline.text_encoder.config.to_dict()]
        if text_encoder is not None:
            weights[2], configs[2] = read_weights(text_encoder), read_config(text_encoder)
        return weights, configs, state
    if not os.path.isfile(os.path.join(base, "model_index.json")):
        raise UserError(
            f"the checkpoint's base model {base} is no longer there (no model_index.json); put it back, or export"
            " the run's saved pipeline instead"
        )
    folders = [unet, os.path.join(base, "vae"), text_encoder or os.path.join(base, "text_encoder")]
    weights, configs = [read_weights(d) for d in folders], [read_config(d) for d in folders]
    if trained["vae"] is not None:  # the VAE the run trained with (--pretrained_vae_model_name_or_path)
        vae = load_vae(trained["vae"], torch.float32, base=base, config=trained["config"])
        weights[1], configs[1] = vae.state_dict(), dict(vae.config)
    return weights, configs, state


LDM_CONFIG_HEADER = (
    "# The original training code's config of a v-prediction SD 1.x model; written by sdtoolkit.export\n"
)


def ldm_config(unet, vae, scheduler):
    """The config the original code (CompVis's ldm, which AUTOMATIC1111 runs) builds a v-predicting SD 1.x model
    from, as its v1-inference.yaml is laid out, with the sizes of these diffusers configs (UNet, VAE, scheduler)."""
    base, ch = unet["block_out_channels"][0], vae["block_out_channels"][0]
    heads = unet["attention_head_dim"]  # SD 1.x's diffusers configs give the number of heads under this name
    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "parameterization": "v",
                "linear_start": scheduler.get("beta_start", 0.00085),
                "linear_end": scheduler.get("beta_end", 0.012),
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": scheduler.get("num_train_timesteps", 1000),
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": unet["sample_size"],
                "channels": unet["in_channels"],
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": vae.get("scaling_factor", 0.18215),
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": 32,  # unused
                        "in_channels": unet["in_channels"],
                        "out_channels": unet["out_channels"],
                        "model_channels": base,
                        # The downsampling factors whose blocks have attention: [4, 2, 1] for SD 1.x.
                        "attention_resolutions": [
                            2**i
                            for i, kind in reversed(list(enumerate(unet["down_block_types"])))
                            if "CrossAttn" in kind
                        ],
                        "num_res_blocks": unet["layers_per_block"],
                        "channel_mult": [channels // base for channels in unet["block_out_channels"]],
                        "num_heads": heads if isinstance(heads, int) else heads[0],
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": unet["cross_attention_dim"],
                        "use_checkpoint": False,
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": vae["latent_channels"],
                        "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": vae["latent_channels"],
                            "resolution": 256,
                            "in_channels": vae["in_channels"],
                            "out_ch": vae["out_channels"],
                            "ch": ch,
                            "ch_mult": [channels // ch for channels in vae["block_out_channels"]],
                            "num_res_blocks": vae["layers_per_block"],
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            },
        }
    }


def ldm_config_path(out):
    """The .yaml beside the exported file `out`, which AUTOMATIC1111 reads with it."""
    return os.path.splitext(out)[0] + ".yaml"


def written_ldm_config(path):
    """Whether the file at `path` is a .yaml an export wrote (see write_ldm_config)."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline() == LDM_CONFIG_HEADER


def write_ldm_config(out, config):
    """Write `config` (see ldm_config) as the .yaml beside the exported file `out`, under a temporary name first; with
    config None, remove a .yaml that an earlier export of a v-prediction model left there."""
    path = ldm_config_path(out)
    if config is None:
        if written_ldm_config(path):  # it would make the web UI sample this model as v-prediction
            os.remove(path)
        return
    try:
        with written_atomically(path) as partial, open(partial, "w", encoding="utf-8") as f:
            f.write(LDM_CONFIG_HEADER + yaml.safe_dump(config, sort_keys=False))
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}") from err


def single_file_name(output_dir):
    """The file --export_single_file writes in a training run's output_dir: named after the folder."""
    return os.path.basename(os.path.abspath(output_dir)) + ".safetensors"


def training_metadata(state_path, training=None, layout="stable-diffusion-v1 (CompVis/LDM keys)"):
    """The safetensors header's metadata (strings only): the training state's facts, then `training`'s."""
    metadata = {"format": "pt", "sdtoolkit.layout": layout}
    state = {}
    if state_path and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    state.update(training or {})
    if state:
        for key in ("model", "revision", "model_config", "data", "data_rows", "global_step", "seed", "total_batch_size",
                    "resolution", "learning_rate", "clip_skip", "prediction_type", "vae",
                    "zero_terminal_snr", "merged_loras"):  # fmt: skip
            if state.get(key) is not None:
                metadata[f"sdtoolkit.{key}"] = str(state[key])
    # What the UNet predicts, in the ModelSpec key that kohya-ss writes and other tools read (one file holds no
    # scheduler to say it).
    if state.get("prediction_type") in ("epsilon", "v_prediction"):
        metadata["modelspec.prediction_type"] = "v" if state["prediction_type"] == "v_prediction" else "epsilon"
    return metadata


def pipeline_weights(pipeline):
    """(weights, configs) of the pipeline's UNet, VAE and text encoder."""
    models = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    weights = [model.state_dict() for model in models]
    configs = [dict(pipeline.unet.config), dict(pipeline.vae.config), pipeline.text_encoder.config.to_dict()]
    return weights, configs


def with_loras(path, loras, ratios, config=None):
    """(weights, configs, scheduler config) of the model at `path` (a pipeline folder, a checkpoint, one file, a hub
    id) with other LoRAs (LoHas, LoKrs) merged into it, each at its ratio: kohya-ss's merge_lora.py."""
    if holds_lora(path):
        raise UserError(f"{path} is a LoRA; give the model to merge --lora into")
    pipeline = merge_loras(load_pipeline(path, torch.device("cpu"), torch.float32, config), loras, ratios)
    weights, configs = pipeline_weights(pipeline)
    return weights, configs, dict(pipeline.scheduler.config)


def lora_merged(path):
    """For a LoRA run's output, kohya file or LoRA checkpoint at `path` (see sdtoolkit/inference.py): its base
    model with the adapters merged into the UNet's weights (and the text encoder's, when it has one), as
    (weights, configs) of the UNet, VAE and text encoder, and the run's facts from its files' headers (see
    inference.run_record). None for anything else."""
    trained = trained_model(path)
    if trained is None or "LoRA" not in trained["kind"]:
        return None
    pipeline = load_pipeline(path, torch.device("cpu"), torch.float32)
    pipeline.fuse_lora(components=["unet", "text_encoder"])
    pipeline.unload_lora_weights()  # the adapter's layers go, its update stays in the fused weights
    weights, configs = pipeline_weights(pipeline)
    header = {}
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    record = run_record(path if os.path.isdir(path) else os.path.dirname(path) or ".", header)
    facts = {key: value for key, value in record.items() if key != "layout"}
    return weights, configs, facts


def export_single_file(path, out, *, half=True, ema=None, training=None, loras=(), ratios=None, config=None):
    """Write the pipeline, checkpoint or LoRA at `path` to `out` as one SD 1.x .safetensors file (a LoRA merged into
    its base model). Returns the tensor count.

    training: facts of the run for the file's metadata (model, data, global_step, seed, resolution, ...), over
    those of the newest checkpoint's training_state.json. loras: LoRAs to merge into the model at `path` first, at
    their `ratios` (1 each by default); config: for a model that is one file, the pipeline whose configs describe it.
    """
    scheduler = {}  # a pipeline folder's scheduler config, for the betas of a v-prediction model's .yaml
    merged = lora_merged(path) if not loras else None
    if loras:
        if ema is not None:
            raise UserError(
                "--ema and --no-ema can't go with --lora: a checkpoint gives its EMA weights when it has them"
            )
        (unet, vae, text), configs, scheduler = with_loras(path, loras, ratios or [1.0] * len(loras), config)
        state = None
        training = {
            "model": os.path.abspath(path) if os.path.exists(path) else path,
            "merged_loras": " ".join(os.path.abspath(lora) for lora in loras),
            "prediction_type": scheduler.get("prediction_type"),
            "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr")),
            **(training or {}),
        }
    elif merged is not None:
        if ema is not None:
            raise UserError(
                "--ema and --no-ema are for full fine-tuning checkpoints; a LoRA checkpoint's EMA weights are used by itself"
            )
        (unet, vae, text), configs, facts = merged
        state = os.path.join(path, "training_state.json") if os.path.isdir(path) else None
        training = {**facts, **(training or {})}
    else:
        (unet, vae, text), configs, state = sources(path, ema)
        # A pipeline folder's scheduler says how to sample its UNet (a checkpoint's training state says it too).
        scheduler_config = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler_config):
            with open(scheduler_config, encoding="utf-8") as f:
                scheduler = json.load(f)
            sampling = {"prediction_type": scheduler.get("prediction_type"),
                        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr"))}  # fmt: skip
            training = {**sampling, **(training or {})}
    check_sd1(path, *configs)
    tensors = {}
    tensors.update(rename(unet, unet_prefixes(configs[0]), "model.diffusion_model.", "UNet"))
    vae = rename(vae, vae_prefixes(configs[1]), "first_stage_model.", "VAE")
    for key, tensor in vae.items():
        # The VAE's attention projections are 1x1 convolutions in the original layout.
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            vae[key] = tensor[:, :, None, None]
    tensors.update(vae)
    # The text encoder's keys are transformers' under `text_model.`: transformers 5.6 and later save CLIPTextModel
    # without that prefix, and a single file without it is refused by diffusers' loader (and A1111's).
    for key, tensor in text.items():
        key = key.removeprefix("text_model.")
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            tensors["cond_stage_model.transformer.text_model." + key] = tensor
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = training_metadata(state, training)
    try:
        with written_atomically(out) as partial:
            save_file(tensors, partial, metadata=metadata)
    except OSError as err:
        raise UserError(f"could not write {out}: {err.strerror or err}") from err
    # A v-prediction model's config beside it, for AUTOMATIC1111 (see the module's docstring).
    v_prediction = metadata.get("modelspec.prediction_type") == "v"
    write_ldm_config(out, ldm_config(configs[0], configs[1], scheduler) if v_prediction else None)
    return len(tensors)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a Stable Diffusion 1.x pipeline as one .safetensors file (A1111, ComfyUI)."
    )
    parser.add_argument(
        "path",
        help="A pipeline folder (as training saves it), a checkpoint-N folder, or a LoRA run's output folder, LoRA"
        " checkpoint or kohya file (merged into the base model the run names).",
    )
    parser.add_argument("out", help="The .safetensors file to write.")
    parser.add_argument(
        "--half", action=argparse.BooleanOptionalAction, default=True, help="Store float16 (default) or float32."
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="From a checkpoint folder: its EMA weights (unet_ema/), or with --no-ema its trained weights (unet/)."
        " Default: the EMA weights when it has them, as the run's final save would hold.",
    )
    parser.add_argument(
        "--lora",
        nargs="+",
        default=(),
        help="LoRAs (LoHas, LoKrs: files, or LoRA runs' folders) to merge into the model first, as kohya-ss's"
        " merge_lora.py: one file with them in its weights. The model may then be one file or a hub id too.",
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=None, help="With --lora: the strength of each (1 each)."
    )
    add_model_config_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    quiet_diffusers_noise()
    if not args.out.endswith(".safetensors"):
        raise UserError(f"{args.out}: the output file must end in .safetensors")
    if args.ratios is not None and len(args.ratios) != len(args.lora):
        raise UserError(f"--ratios gives {len(args.ratios)} strengths for {len(args.lora)} LoRAs; give one each")
    if args.model_config is not None and not args.lora:
        raise UserError("--model_config is for a model that is one file, which only --lora makes sense with")
    count = export_single_file(
        args.path,
        args.out,
        half=args.half,
        ema=args.ema,
        loras=args.lora,
        ratios=args.ratios,
        config=args.model_config,
    )
    size = os.path.getsize(args.out) / 1024**2
    print(f"Wrote {args.out}: {count} tensors, {size:.1f} MB, {'float16' if args.half else 'float32'}")
    if os.path.isfile(ldm_config_path(args.out)):
        print(f"Wrote {ldm_config_path(args.out)} beside it: the model predicts v, which AUTOMATIC1111 reads there")


if __name__ == "__main__":
    run_main(main)
