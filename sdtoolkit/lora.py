"""LoRA: train small low-rank adapters on the UNet's attention projections instead of all its weights.

With --lora_rank N the UNet is frozen and PEFT (the library diffusers itself uses) adds to each target layer
W a trainable update B @ A of rank N, scaled by lora_alpha / N (LoRA, arXiv 2106.09685). Only A and B are
trained, kept in float32 so the fp16 GradScaler can unscale their gradients; the frozen UNet may sit in
half precision. What is saved is the adapter only: a few MB instead of 3.4 GB. With --train_text_encoder
the CLIP text encoder gets an adapter of its own on its attention projections, trained alongside and saved in
the same files (under text_encoder. and lora_te_ keys), as kohya-ss trains by default.

With --use_dora the adapters are DoRA's (arXiv 2402.09353), PEFT's too: each adapted weight is split into a
magnitude per output (lora_magnitude_vector, trained) and a direction W + B @ A, scaled back to unit norm per
output before the magnitude multiplies it. diffusers' load_lora_weights reads them. No kohya-ss file is written:
AUTOMATIC1111 reads a DoRA file's magnitudes as one per input, and would apply PEFT's as another model.

    add_lora(unet, rank=4, alpha=4, dropout=0.0, target_modules=DEFAULT_TARGETS)   # or the text encoder
    add_lora(unet, ..., use_dora=True)   # --use_dora
    add_lora_from_file(unet, read_lora("other.safetensors"), part="unet", dropout=0.0)   # --init_lora
    save_lora(unet, folder, text_encoder)   # folder/pytorch_lora_weights.safetensors, which load_lora_weights reads
    load_lora(unet, folder, text_encoder)   # the adapter weights back into the models, bit for bit
    kohya_state_dict(unet, text_encoder)  # the same adapters in kohya-ss / AUTOMATIC1111 keys
    kohya_metadata(facts, ...)           # that file's header: what A1111 and Forge read
    tag_frequency(captions)              # the captions' tags and their counts, for that header
    store_in_float8(unet, torch.float16)   # --fp8_base: the frozen weights kept in float8, cast up layer by layer
    max_norm_regularize([unet, text_encoder], 1.0)   # --scale_weight_norms: each update's norm held to at most 1
"""

import collections
import datetime
import json
import logging
import os
import re

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from sdtoolkit.errors import UserError
from sdtoolkit.lycoris import conv_patterns, lycoris_kind

# The attention projections of every transformer block: what upstream's LoRA script and kohya train.
DEFAULT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# The text encoder's attention projections: what kohya-ss and diffusers' DreamBooth LoRA script train.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
EMA_NAME = "lora_ema.safetensors"


def add_lora(model, *, rank, alpha, dropout, target_modules, conv_rank=None, conv_alpha=None, use_dora=False):
    """Freeze the model (the UNet or the text encoder) and add a trainable LoRA adapter; returns its parameters,
    in float32. With conv_rank, the targeted 3x3 convolutions take that rank and conv_alpha (LoCon's conv_dim, see
    sdtoolkit/lycoris.py's conv_patterns). With use_dora, a DoRA adapter: PEFT starts each layer's magnitude at
    the norms of its frozen weight, so the adapted model starts as the base model, as a LoRA does."""
    model.requires_grad_(False)
    rank_pattern, alpha_pattern = conv_patterns(model, target_modules, conv_rank, conv_alpha)
    model.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=target_modules,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_dora=use_dora,
        )  # fmt: skip
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


class ReadAs(torch.nn.Module):
    """A parametrization: the weight is stored as it is (float8) and read in `dtype`, as a new tensor each time."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight):
        return weight.to(self.dtype)


def store_in_float8(model, compute_dtype):
    """--fp8_base: keep the frozen weights of the model's linear and convolution layers in float8 (e4m3), and read
    them in `compute_dtype` while a layer runs. The adapters, biases, norms and embeddings keep their precision.

    Each read makes a new tensor, which is what autograd saves for the backward pass: the float8 weights stay as
    they are. (diffusers' layerwise casting casts a layer's own weights up and back instead, and in training SD
    v1-4's UNet the backward pass then finds them in float8.) Call it after the adapter is added: PEFT gives a new
    adapter the dtype of the layer it wraps."""
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or re.search(r"lora_|embed", name):
            continue
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
        parametrize.register_parametrization(module, "weight", ReadAs(compute_dtype), unsafe=True)


def max_norm_regularize(models, max_norm):
    """kohya-ss's --scale_weight_norms, after each optimizer step: an adapter whose update (B @ A times its scaling,
    the weight it adds) has a Frobenius norm above max_norm is scaled down to it, A and B each by the square root of
    the ratio, so that no layer's update grows without bound. Returns (how many were scaled, the mean and the
    largest norm after it), as tensors: reading them waits for the device, which only the log needs."""
    norms, scaled = [], []
    with torch.no_grad():
        for model in models:
            for module in model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                for name in module.lora_A:
                    down, up = module.lora_A[name].weight, module.lora_B[name].weight
                    # The update as a matrix (out, in x kernel): a convolution's has the same norm.
                    norm = (up.flatten(1) @ down.flatten(1)).norm() * module.scaling[name]
                    # As kohya-ss: a norm below half the bound counts as half of it, against dividing by ~0.
                    floored = norm.clamp(min=max_norm / 2)
                    ratio = floored.clamp(max=max_norm) / floored  # exactly 1 when within the bound
                    down.mul_(ratio.sqrt())
                    up.mul_(ratio.sqrt())
                    norms.append(norm * ratio)
                    scaled.append(ratio < 1)
    norms = torch.stack(norms)
    return torch.stack(scaled).sum(), norms.mean(), norms.max()


def lora_location(path):
    """(folder, file name) of a LoRA given as a folder holding pytorch_lora_weights.safetensors (a LoRA run's output
    or checkpoint) or as one .safetensors file."""
    if os.path.isfile(path):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, WEIGHTS_NAME


def check_lora_path(path, flag):
    """One line, when `path` (given as `flag`) is neither a .safetensors file nor a folder with a LoRA's weights."""
    folder, name = lora_location(path)
    if not os.path.isfile(os.path.join(folder, name)):
        raise UserError(f"{flag} {path}: no LoRA there (a .safetensors file, or a folder with {WEIGHTS_NAME})")


# diffusers' older names of the attention projections, as it names their alphas in a kohya-ss file: the UNet's
# (...attn1.processor.to_q_lora.down.weight.alpha) and the text encoder's (...self_attn.to_q_lora.down.weight.alpha).
OLDER_ATTENTION_ALPHA = re.compile(r"\.(processor\.)?(to_q|to_k|to_v|to_out)_lora\.down\.weight\.alpha$")
UNET_LAYER = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
TEXT_ENCODER_LAYER = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def alpha_name(key):
    """The name by which diffusers' loader finds the layer of a kohya-ss file's alpha it named `key` (see read_lora):
    a UNet layer's path and .alpha; a text encoder layer's path and one part more, as it names its MLP layers'
    (...mlp.fc1.lora_linear_layer.down.weight.alpha), without transformers 4's text_model. part."""
    if key.startswith("unet."):
        return OLDER_ATTENTION_ALPHA.sub(lambda m: f".{UNET_LAYER[m[2]]}.alpha", key)
    key = OLDER_ATTENTION_ALPHA.sub(lambda m: f".{TEXT_ENCODER_LAYER[m[2]]}.lora_linear_layer.down.weight.alpha", key)
    return key.replace("text_encoder.text_model.", "text_encoder.", 1)


def dora_magnitudes(scales, state):
    """A kohya-ss file's DoRA magnitudes (`scales`: its <layer>.dora_scale tensors) in PEFT's names, for the layers
    of `state` (read_lora's, in PEFT's keys). LyCORIS writes one magnitude per output, (out, 1), as PEFT has them;
    AUTOMATIC1111 reads them as one per input, (1, in), as OneTrainer writes them, which PEFT can't apply: refused.
    The shape tells them apart, as ComfyUI tells them."""
    magnitudes = {}
    for key in [key for key in state if key.endswith(".lora_A.weight")]:
        part, _, layer = key.removesuffix(".lora_A.weight").partition(".")
        name = kohya_name("lora_unet_" if part == "unet" else "lora_te_", layer)
        scale = scales.pop(f"{name}.dora_scale", None)
        if scale is None:
            continue
        outputs = state[f"{part}.{layer}.lora_B.weight"].shape[0]
        if scale.shape[0] != outputs or scale.numel() != outputs:
            raise ValueError(
                f"its {name}.dora_scale, of shape {tuple(scale.shape)}, is a DoRA magnitude per input (OneTrainer's"
                " and AUTOMATIC1111's), which PEFT can't apply; one per output (LyCORIS's) loads"
            )
        if part == "unet":  # a convolution's is (1, out, 1, 1) in PEFT
            shape = (outputs,) if state[key].ndim == 2 else (1, outputs, 1, 1)
            magnitudes[f"unet.{layer}.lora_magnitude_vector"] = scale.reshape(shape)
        else:  # under the name transformers finds (see save_lora)
            magnitudes[f"text_encoder.{layer}.lora_magnitude_vector.weight"] = scale.reshape(outputs)
    if scales:
        raise ValueError(f"its {next(iter(scales))} is the DoRA magnitude of no LoRA layer in it")
    return magnitudes


def read_lora(path):
    """The adapters saved at `path` as diffusers reads them, kohya-ss keys converted to diffusers':
    (state dict with unet. and text_encoder. keys, kohya-ss's alphas or None, diffusers' metadata or None).
    A kohya-ss file's DoRA magnitudes (dora_scale), which diffusers leaves out of SD 1.x files with a warning, are
    read in PEFT's names (dora_magnitudes).

    diffusers names some of a kohya-ss file's alphas by paths that name no layer, and PEFT then gives such a layer
    the file's most common alpha: one with an alpha of its own would apply at another scale. They are renamed
    (alpha_name): the attention projections', which it names by its older names (to_q_lora), and the text encoder's,
    which it names by their transformers 4 paths (text_model.encoder...), which transformers 5's text encoder does
    not have: without the text_model. part the name matches either version's layer.
    """
    folder, name = lora_location(path)
    with safe_open(os.path.join(folder, name), "pt") as f:
        kind = lycoris_kind(f.keys())
        scales = {key: f.get_tensor(key) for key in f.keys() if key.endswith(".dora_scale") and not kind}
    if kind:
        raise ValueError(
            f"it is a LyCORIS {kind} file, not a LoRA: sdtoolkit/lycoris.py reads it (gradio_app.py and metrics.py"
            " apply it, and --init_lora trains on from it)"
        )
    diffusers_logger = logging.getLogger("diffusers.loaders.lora_pipeline")
    level = diffusers_logger.level
    if scales:  # its warning that it leaves the DoRA magnitudes out: they are read below
        diffusers_logger.setLevel(logging.ERROR)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            folder, weight_name=name, return_lora_metadata=True
        )
    finally:
        diffusers_logger.setLevel(level)
    if alphas:
        alphas = {alpha_name(key): alpha for key, alpha in alphas.items()}
    # Every key in PEFT's names, as save_lora writes them: diffusers converts a UNet's only when the first key is
    # in its older names (see save_lora), and files from elsewhere, or from earlier runs, may mix both.
    unet = {key: value for key, value in state.items() if key.startswith("unet.")}
    text_encoder = {key: value for key, value in state.items() if key.startswith("text_encoder.")}
    if any("lora_linear_layer" in key or "_lora." in key for key in text_encoder):
        # diffusers tells its older names (to_q_lora) from its newer ones (lora_linear_layer) by an out_proj adapter
        # (to_out_lora), and refuses a file without one: a text encoder LoRA on q_proj alone would not load. The
        # older names' mapping reads both.
        text_encoder = convert_state_dict_to_peft(text_encoder, original_type=StateDictType.DIFFUSERS_OLD)
    state = {**convert_unet_state_dict_to_peft(unet), **text_encoder}
    if scales:
        state.update(dora_magnitudes(scales, state))
    return state, alphas, metadata


def adapter_ranks(state, part):
    """The rank of each adapter layer the state dict (from read_lora) holds for `part` ("unet" or "text_encoder")."""
    downs = (".down.weight", ".lora_A.weight")  # diffusers' older and newer names for A
    return [tensor.shape[0] for key, tensor in state.items() if key.startswith(part + ".") and key.endswith(downs)]


def add_lora_from_file(model, lora, *, part, dropout):
    """Add to the model the adapter a LoRA holds for it (`lora`: what read_lora returned; `part`: "unet" or
    "text_encoder"), ready to go on training as add_lora's would be: the model frozen, the adapter trainable,
    float32, with `dropout`. Its rank, alpha and layers are the file's, as diffusers' load_lora_weights reads them
    (a kohya-ss file's too). Returns the adapter's parameters."""
    state, alphas, metadata = lora
    load = {
        "unet": StableDiffusionPipeline.load_lora_into_unet,
        "text_encoder": StableDiffusionPipeline.load_lora_into_text_encoder,
    }[part]
    model.requires_grad_(False)
    try:
        load(state, alphas, model, adapter_name="default", metadata=metadata)
    except RuntimeError as err:  # torch's load_state_dict lists every layer whose shape differs
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        raise ValueError(
            f"{len(mismatches)} of its layers have other shapes than this model's: {mismatches[0]}"
        ) from err
    # diffusers only warns about adapter layers that find no place in the model; a run must not start without them.
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    expected = len(adapter_ranks(state, part))
    if len(layers) != expected:
        raise ValueError(
            f"{expected - len(layers)} of its {expected} {part} adapter layers match no layer of this model"
        )
    for layer in layers:  # a file's adapter is loaded without dropout
        if dropout:
            layer.lora_dropout["default"] = torch.nn.Dropout(p=dropout)
    parameters = [parameter for name, parameter in model.named_parameters() if ".lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()
    # diffusers made the adapter in the model's dtype, half under mixed precision: the weights again, into float32.
    copy_adapter_weights(model, state, part)
    return parameters


# The path of a layer up to its name within its block: a UNet transformer block (and its attention), a UNet
# attention or ResNet block, a CLIP layer (and its attention or MLP).
BLOCK_PATH = re.compile(
    r"^(.*\.)?(transformer_blocks\.\d+\.(attn\d\.)?|attentions\.\d+\.|resnets\.\d+\.|layers\.\d+\.(self_attn\.|mlp\.)?)"
)


def adapted_layer_names(model):
    """The names of the layers that carry the model's adapter, within their blocks ("to_q", "to_out.0", "ff.net.2"),
    for the model card."""
    return sorted(
        {BLOCK_PATH.sub("", name) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    )


def adapter_weights(model):
    """The adapter's weights in PEFT's keys. (PEFT would look for the model's config on disk to decide whether to
    save its embeddings too; no adapter here is on an embedding.)"""
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def save_lora(unet, folder, text_encoder=None, header=None):
    """folder/pytorch_lora_weights.safetensors: StableDiffusionPipeline.load_lora_weights(folder) reads it. With a
    text encoder that has an adapter too (--train_text_encoder), the file holds both. `header`: more of the file's
    metadata (strings), beside diffusers' own: the run's record, which metrics.py and gradio_app.py read.

    The weights keep PEFT's keys (<module>.lora_A.weight), which diffusers reads as they are. (Its converter to
    the older keys, which upstream's LoRA script saves with, renames only attention layers; given a file that
    mixes both kinds, load_lora_weights looks at the first key only, and drops the attention layers of an adapter
    that also has proj_in or ff layers, with a warning.) The adapters' configs (rank, alpha, targets) go into the
    file's metadata: without them a loader assumes alpha = rank, and an adapter trained with another alpha would
    apply at the wrong scale. The file is written under another name and renamed into place, so a run killed
    while saving leaves the previous one whole.

    A DoRA's magnitudes are saved as PEFT names them (<module>.lora_magnitude_vector), except the text encoder's:
    diffusers hands those to transformers 5, which looks for <module>.lora_magnitude_vector.weight, PEFT's name for
    the parameter, and would leave them at their starting values with only a warning. Under that name both
    transformers and PEFT (the UNet's loader, and load_lora here) find them.
    """
    text_encoder_layers = text_encoder_config = None
    if text_encoder is not None:
        text_encoder_layers = {
            key + ".weight" if key.endswith(".lora_magnitude_vector") else key: tensor
            for key, tensor in adapter_weights(text_encoder).items()
        }
        text_encoder_config = text_encoder.peft_config["default"].to_dict()
    partial = WEIGHTS_NAME + ".partial"
    # diffusers logs where it saved: the temporary name, which would mislead. The caller says where it is.
    diffusers_logger = logging.getLogger("diffusers.loaders.lora_base")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.WARNING)
    try:
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=adapter_weights(unet), safe_serialization=True, weight_name=partial,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), text_encoder_lora_layers=text_encoder_layers,
            text_encoder_lora_adapter_metadata=text_encoder_config,
        )  # fmt: skip
    finally:
        diffusers_logger.setLevel(level)
    if header:
        path = os.path.join(folder, partial)
        with safe_open(path, "pt") as f:
            metadata = {**header, **f.metadata()}  # diffusers' own keys as diffusers wrote them
        save_file(load_file(path), path, metadata=metadata)
    os.replace(os.path.join(folder, partial), os.path.join(folder, WEIGHTS_NAME))


def load_lora(unet, folder, text_encoder=None):
    """Put the adapters saved in `folder` (by save_lora) back into the UNet's adapter, and the text encoder's when
    it is given, bit for bit."""
    state, _, _ = read_lora(folder)
    try:
        copy_adapter_weights(unet, state, "unet")
        if text_encoder is not None:
            copy_adapter_weights(text_encoder, state, "text_encoder")
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from err


def copy_adapter_weights(model, state, part):
    """Copy the weights a read_lora state dict holds for `part` ("unet" or "text_encoder") into the model's adapter,
    in the adapter's own dtype."""
    own = {key.removeprefix(part + "."): value for key, value in state.items() if key.startswith(part + ".")}
    if not hasattr(model, "text_model"):  # kohya-ss names the text encoder's layers by transformers 4's paths
        own = {key.removeprefix("text_model."): value for key, value in own.items()}
    incompatible = set_peft_model_state_dict(model, own, adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"it holds adapter weights the {part} has no place for: {unexpected[:3]}")


def has_text_encoder_lora(folder):
    """Whether the adapter file in `folder` holds a text encoder's adapter (a --train_text_encoder run's), in
    diffusers' keys or in kohya-ss's (a LoHa or LoKr run's)."""
    with safe_open(os.path.join(folder, WEIGHTS_NAME), "pt") as f:
        return any(key.startswith(("text_encoder.", "lora_te_")) for key in f.keys())


def kohya_name(prefix, module):
    """kohya-ss's name for the adapter of the layer at path `module` of the UNet (prefix lora_unet_) or the text
    encoder (lora_te_): the path with '_' for '.'. kohya's text encoder paths begin text_model.encoder..., a prefix
    that transformers 5.6 and later no longer have in CLIPTextModel's module names: it is put back."""
    if prefix == "lora_te_" and not module.startswith("text_model."):
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def kohya_state_dict(unet, text_encoder=None):
    """The adapters in kohya-ss keys, as AUTOMATIC1111, ComfyUI and diffusers' load_lora_weights read them.

    kohya names each module by its path in the model with '_' for '.', under lora_unet_ (the UNet's diffusers
    names) or lora_te_ (the text encoder's transformers names, text_model.encoder.layers...), with lora_down (A)
    and lora_up (B), and stores alpha per module: the update is scaled by alpha / rank, so alpha must be the
    layer's lora_alpha, not its rank (an adapter from --init_lora may have several).
    """
    state = {}
    models = [("lora_unet_", unet)] + [("lora_te_", text_encoder)] * (text_encoder is not None)
    for prefix, model in models:
        alphas = {name: m.lora_alpha["default"] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        for key, tensor in adapter_weights(model).items():
            module, _, rest = key.partition(".lora_")  # "down_blocks.0....to_q", "A.weight"
            alpha = alphas[module]
            name = kohya_name(prefix, module)
            part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[rest]
            state[f"{name}.{part}"] = tensor.contiguous()
            if part == "lora_down.weight":
                state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def tag_frequency(captions):
    """How often each comma-separated tag occurs in the captions (every caption of a row that has several), most
    frequent first: kohya-ss's ss_tag_frequency, which AUTOMATIC1111 lists as the LoRA's training tags. Given
    the training rows, an image that repeats (N_name folders, --dataset_repeats) counts once per repeat, as often
    as an epoch shows it (kohya-ss counts it once)."""
    counts = collections.Counter()
    for caption in captions:
        for text in [caption] if isinstance(caption, str) else caption:
            counts.update(tag.strip() for tag in text.split(",") if tag.strip())
    return dict(counts.most_common())


def kohya_metadata(facts, *, name, rank, alpha, prediction_type, tags=None, clip_skip=1, algo=None, conv_rank=None,
                   conv_alpha=None):  # fmt: skip
    """The header of the kohya-ss file (strings only), so that the UIs that load it know what it is.

    - kohya-ss's own keys, as its trainer writes them: AUTOMATIC1111 offers ss_output_name (`name`, the output
      folder's) as the name in `<lora:NAME:1>`, shows ss_sd_model_name, ss_resolution and ss_num_train_images on
      the LoRA's card, and takes a file with these keys (and ss_base_model_version) for an SD 1.x LoRA.
    - Stability's model spec (modelspec.*): architecture, implementation, title, resolution, date.

    Training adds this toolkit's facts of the run (export.training_metadata, as in an exported single file):
    sdtoolkit.model is the base model, by which metrics.py and gradio_app.py load the LoRA on it when given only
    the LoRA.

    facts: the run's identity (model, revision, data, data_rows, seed) with global_step, resolution and
    learning_rate; only the model for a LoRA extracted from two models (sdtoolkit/extract_lora.py). tags: the
    captions' tag_frequency. clip_skip: the text encoder's layer the captions were read from (ss_clip_skip, which
    the UIs show so that the LoRA is prompted the same way). algo: "loha" or "lokr" for LyCORIS's adapters, named
    as kohya-ss names a LyCORIS run's (ss_network_module lycoris.kohya, its algo in ss_network_args). conv_rank and
    conv_alpha: the 3x3 convolutions' (--lora_conv_rank), kohya-ss's conv_dim and conv_alpha in ss_network_args.
    """
    model = str(facts["model"])
    metadata = {
        "ss_output_name": name,
        "ss_sd_model_name": os.path.basename(model.rstrip("/")) if os.path.isabs(model) else model,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_clip_skip": str(clip_skip),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if "resolution" in facts:  # a training run's (a LoRA extracted from two models has no data or schedule)
        resolution = facts["resolution"]
        metadata.update({
            "ss_resolution": str((resolution, resolution)),
            "ss_num_train_images": str(facts["data_rows"]),
            "ss_steps": str(facts["global_step"]),
            "ss_learning_rate": str(facts["learning_rate"]),
            "ss_seed": str(facts["seed"]),
            "modelspec.resolution": f"{resolution}x{resolution}",
        })  # fmt: skip
    network_args = {}
    if algo:
        metadata["ss_network_module"] = "lycoris.kohya"
        network_args["algo"] = algo
    if conv_rank:
        network_args.update(conv_dim=str(conv_rank), conv_alpha=str(float(conv_alpha)))
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    if tags:
        # kohya-ss counts per dataset folder; this run has one data source.
        metadata["ss_tag_frequency"] = json.dumps({os.path.basename(str(facts["data"]).rstrip("/")): tags})
    return metadata


def save_lora_ema(ema, folder):
    """folder/lora_ema.safetensors: the EMA of the adapter's weights (in the order of its parameters) and its
    step count, which sets its decay."""
    tensors = {f"{i:05d}": shadow.detach().cpu().contiguous() for i, shadow in enumerate(ema.shadow_params)}
    save_file(tensors, os.path.join(folder, EMA_NAME), metadata={"optimization_step": str(ema.optimization_step)})


def load_lora_ema(ema, folder):
    """Put what save_lora_ema wrote back into `ema`, bit for bit."""
    ema.optimization_step = load_lora_ema_weights(ema.shadow_params, folder)


def load_lora_ema_weights(parameters, folder):
    """Copy the EMA weights save_lora_ema wrote into `parameters` (the adapter's, in their order); returns the
    EMA's step count."""
    with safe_open(os.path.join(folder, EMA_NAME), "pt") as f:
        names = sorted(f.keys())
        if len(names) != len(parameters):
            raise ValueError(f"{folder}/{EMA_NAME} holds {len(names)} tensors for an adapter of {len(parameters)}")
        for name, parameter in zip(names, parameters):
            tensor = f.get_tensor(name)
            if tensor.shape != parameter.shape:
                raise ValueError(
                    f"{folder}/{EMA_NAME}: tensor {name} is {tuple(tensor.shape)}, its weight {tuple(parameter.shape)}"
                )
            parameter.data.copy_(tensor)
        return int(f.metadata()["optimization_step"])


def has_lora_weights(folder):
    return os.path.isfile(os.path.join(folder, WEIGHTS_NAME))


def holds_lora(path):
    """Whether `path` is a LoRA's (or LyCORIS's) file, or a folder holding one, rather than a whole model."""
    if os.path.isdir(path):
        return has_lora_weights(path)
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        with safe_open(path, "pt") as f:
            return any("lora_" in key for key in f.keys())  # kohya-ss's and LyCORIS's lora_unet_, PEFT's lora_A
    except Exception:  # not safetensors: load_pipeline says so
        return False


def has_lora_ema(folder):
    return os.path.isfile(os.path.join(folder, EMA_NAME))
