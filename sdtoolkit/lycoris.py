"""LyCORIS files, LoHa and LoKr in kohya-ss keys, as AUTOMATIC1111 applies them from its models/Lora folder: loaded
as PEFT adapters on the UNet and the text encoder, so that the server and metrics.py apply, mix and weigh them per
request as they do a LoRA (sdtoolkit/inference.py's load_lora sends these files here). LoCon, a LoRA that reaches
the convolutions too, is a LoRA: diffusers loads it as one.

Each module of such a file adds to its layer's weight W (out x in) an update of W's shape, scaled by alpha / rank,
as LyCORIS and AUTOMATIC1111 compute it:

    LoHa  (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)     the Hadamard (elementwise) product of two low-rank
                                                                  products; rank: hada_w1_b's rows
    LoKr  kron(lokr_w1, lokr_w2)                                 a Kronecker product, each factor a full matrix or a
                                                                  low-rank product (lokr_w1_a @ lokr_w1_b); rank: that
                                                                  product's inner size, and no scaling when both are full

PEFT's LoHa and LoKr layers hold the same tensors under the same names and compute the same update
(https://arxiv.org/abs/2108.06098 for LoHa, https://arxiv.org/abs/2309.14859 for both).

Training (--lora_type loha or lokr) adds such PEFT layers to the UNet (and the text encoder) with add_lycoris, and
saves them with save_lycoris in the keys above, the file load_lycoris and AUTOMATIC1111 read:

    add_lycoris(unet, "loha", rank=8, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    save_lycoris(path, unet, text_encoder, metadata={...})
    load_lycoris_weights(path, unet, text_encoder)   # the weights back into the adapters, bit for bit (resuming)
"""

import collections
import re

import torch
from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_
from diffusers.utils.peft_utils import _create_lokr_config
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file, save_file

from sdtoolkit.atomic_files import written_atomically
from sdtoolkit.errors import UserError

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lycoris_kind(keys):
    """ "LoHa" or "LoKr" for a file holding these keys, else None (a LoRA, or something else)."""
    if any(key.endswith(".hada_w1_a") for key in keys):
        return "LoHa"
    if any(".lokr_w" in key for key in keys):
        return "LoKr"
    return None


def kohya_names(unet, text_encoder=None):
    """{kohya-ss module name: (component, module path)}: kohya-ss names a layer by its path with '_' for '.', under
    lora_unet_ (the UNet's diffusers paths) or lora_te_ (the text encoder's, text_model.encoder..., a prefix
    transformers 5.6 and later leave out of the module paths)."""
    names = {}
    for name, _ in unet.named_modules():
        names["lora_unet_" + name.replace(".", "_")] = ("unet", name)
    for name, _ in text_encoder.named_modules() if text_encoder is not None else []:
        full = name if name.startswith("text_model.") else f"text_model.{name}"
        names["lora_te_" + full.replace(".", "_")] = ("text_encoder", name)
    return names


def loha_config(layers):
    """The LoHaConfig that makes PEFT build each layer's LoHa module with the file's rank and alpha."""
    ranks = {path: tensors["hada_w1_b"].shape[0] for path, tensors in layers.items()}
    alphas = {path: float(tensors.get("alpha", ranks[path])) for path, tensors in layers.items()}
    # One rank and alpha for most layers, the others by pattern (PEFT matches a pattern at the end of a path).
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return LoHaConfig(
        r=rank,
        alpha=alpha,
        target_modules=list(layers),
        rank_pattern={re.escape(path): r for path, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(path): a for path, a in alphas.items() if a != alpha},
        use_effective_conv2d=any("hada_t1" in tensors for tensors in layers.values()),
    )


def lokr_config(layers):
    """The LoKrConfig that makes PEFT build each layer's LoKr module with the file's factor shapes, alpha baked
    into the first factor (diffusers' reading of LyCORIS LoKr files; it infers the factorization from the shapes)."""
    flat = {f"{path}.{name}": tensor for path, tensors in layers.items() for name, tensor in tensors.items()}
    _bake_lokr_alpha_(flat)  # in place: w1 *= alpha / rank, the alpha keys dropped
    baked = collections.defaultdict(dict)
    for key, tensor in flat.items():
        path, _, name = key.rpartition(".")
        baked[path][name] = tensor
    return _create_lokr_config(flat, None), dict(baked)


def read_lycoris_file(path):
    """(kind, {kohya-ss layer name: {tensor name: tensor}}) of the LoHa or LoKr file at `path`, for no model."""
    state = load_file(path)
    layers = {}
    for key, tensor in state.items():
        name, _, tensor_name = key.partition(".")
        layers.setdefault(name, {})[tensor_name] = tensor
    return lycoris_kind(state), layers


def read_lycoris(path, unet, text_encoder):
    """(kind, {"unet": layers, "text_encoder": layers}) of the LoHa or LoKr file at `path`, each part's layers as
    {module path: {tensor name: tensor}}; ValueError, saying what does not fit, for a file these models can't take."""
    kind, layers = read_lycoris_file(path)
    known = set(LOHA if kind == "LoHa" else LOKR) | {"alpha"}
    names = kohya_names(unet, text_encoder)
    parts = {"unet": {}, "text_encoder": {}}
    for name, tensors in layers.items():
        for tensor_name in tensors:
            if tensor_name not in known:
                raise ValueError(
                    f"it holds {name}.{tensor_name}, which this server can't apply (a {kind} file holds"
                    f" {', '.join(sorted(known))})"
                )
        if name not in names:
            raise ValueError(f"{name} is no layer of this model (is the file made for another one, such as SDXL?)")
        part, module_path = names[name]
        parts[part][module_path] = tensors
    return kind, parts


def inject_lycoris(model, kind, layers, adapter_name):
    """Add to the model (the UNet or the text encoder) the LoHa or LoKr adapter `adapter_name` that `layers` (one
    part of read_lycoris's) describe, with their weights, active at weight 1; returns the layers as copied (a
    LoKr's alpha folded in). ValueError, saying what does not fit, for layers this model can't take."""
    if kind == "LoHa":
        config = loha_config(layers)
    else:
        config, layers = lokr_config(layers)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    model._hf_peft_config_loaded = True  # what diffusers and transformers mark a model holding adapters with
    copy_lycoris_weights(model, kind, layers, adapter_name)
    return layers


def copy_lycoris_weights(model, kind, layers, adapter_name):
    """Copy the weights of `layers` (as inject_lycoris takes them, a LoKr's alpha folded in) into the model's
    adapter `adapter_name`, in the adapter's dtype; ValueError for a layer that does not fit."""
    for module_path, tensors in layers.items():
        module = model.get_submodule(module_path)
        # Every tensor PEFT made for the layer must come from the file: one left out would stay random.
        made = {name for name in LOHA + LOKR + ("lokr_t2",) if adapter_name in getattr(module, name, {})}
        if made - set(tensors):
            raise ValueError(f"its {module_path} lacks {', '.join(sorted(made - set(tensors)))}")
        for tensor_name, tensor in tensors.items():
            if tensor_name == "alpha":
                continue
            parameters = getattr(module, tensor_name)
            if adapter_name not in parameters:  # a full factor where PEFT made a low-rank one, or the reverse
                raise ValueError(f"its {module_path} holds {tensor_name}, which this model's {kind} layer lacks")
            parameter = parameters[adapter_name]
            if parameter.numel() != tensor.numel():
                raise ValueError(
                    f"its {module_path}.{tensor_name} is {tuple(tensor.shape)}, and this model's layer takes"
                    f" {tuple(parameter.shape)}"
                )
            with torch.no_grad():
                parameter.copy_(tensor.reshape(parameter.shape))


def add_lycoris_from_file(model, kind, layers):
    """Add to the model the LoHa or LoKr adapter a file holds for it (one part of read_lycoris's), ready to go on
    training as add_lycoris's would be: the model's own weights frozen (PEFT freezes them), the adapter trainable,
    float32, with the file's layers, ranks and alphas. (A LoKr layer with a low-rank factor comes with its alpha /
    rank folded into its first factor, as diffusers reads LoKr files, and is not scaled: the same update.) Returns
    its parameters."""
    layers = inject_lycoris(model, kind, layers, "default")
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    # PEFT made the adapter in the model's dtype, half under mixed precision: the weights again, into float32.
    copy_lycoris_weights(model, kind, layers, "default")
    return parameters


def lycoris_ranks(layers):
    """The rank of each layer of one part of read_lycoris's: LoHa's hada_w1_b rows; LoKr's low-rank factor's inner
    size, or for two full factors the second one's longer side (the least rank for which PEFT makes it full)."""
    ranks = []
    for tensors in layers.values():
        if "hada_w1_b" in tensors:
            ranks.append(tensors["hada_w1_b"].shape[0])
        elif "lokr_w1_b" in tensors or "lokr_w2_b" in tensors:
            ranks.append(tensors["lokr_w1_b" if "lokr_w1_b" in tensors else "lokr_w2_b"].shape[0])
        elif "lokr_w2" in tensors:
            ranks.append(max(tensors["lokr_w2"].shape[:2]))
    return ranks


def load_lycoris(pipeline, path, adapter_name):
    """Load the LoHa or LoKr file at `path` onto the pipeline's UNet and text encoder as the adapter `adapter_name`,
    active at weight 1. ValueError, saying what does not fit, for a file this model can't take."""
    kind, parts = read_lycoris(path, pipeline.unet, pipeline.text_encoder)
    for part, layers in parts.items():
        if layers:
            inject_lycoris(getattr(pipeline, part), kind, layers, adapter_name)
    return kind


def conv_patterns(model, target_modules, conv_rank, conv_alpha):
    """(rank_pattern, alpha_pattern) for PEFT that give the model's targeted convolutions with a kernel larger than
    1x1 (the ResNet blocks' conv1 and conv2, the samplers' conv) their own rank and alpha, as kohya-ss's LoCon gives
    them conv_dim and conv_alpha (alpha: the rank unless given); empty without conv_rank. 1x1 convolutions (proj_in,
    conv_shortcut) are linear layers in all but shape, and keep the adapter's rank, as in kohya-ss."""
    if not conv_rank:
        return {}, {}
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
        and any(name == target or name.endswith("." + target) for target in target_modules)
    ]  # fmt: skip
    if not names:
        raise UserError(
            "--lora_conv_rank is for the 3x3 convolutions, and --lora_target_modules names none: add conv1 conv2"
        )
    # PEFT reads each key as a pattern for the end of a module's path: the whole path, escaped, is that module only.
    return {re.escape(name): conv_rank for name in names}, {re.escape(name): conv_alpha or conv_rank for name in names}


def add_lycoris(model, kind, *, rank, alpha, target_modules, conv_rank=None, conv_alpha=None):
    """Add a trainable LoHa or LoKr adapter (`kind`: "loha" or "lokr") of this rank and alpha to the target layers of
    the model (the UNet or the text encoder), whose own weights PEFT then freezes; returns the adapter's parameters,
    in float32. PEFT starts it at a zero update (LoHa's hada_w2_b, LoKr's lokr_w1 are zeros), so training starts
    from the model as it is. With conv_rank, the targeted 3x3 convolutions take that rank and conv_alpha (see
    conv_patterns).

    A LoKr layer whose two factors are full matrices (LoKr's usual form: its factors are small, and a rank at least
    half the second one's side makes it full) is not scaled by alpha / rank, as LyCORIS trains and AUTOMATIC1111
    applies it; a layer with a low-rank factor is."""
    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    rank_pattern, alpha_pattern = conv_patterns(model, target_modules, conv_rank, conv_alpha)
    model.add_adapter(
        config(
            r=rank, alpha=alpha, target_modules=target_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        )
    )
    for module in model.modules():
        if isinstance(module, LoKrLayer) and "default" in module.lokr_w1 and "default" in module.lokr_w2:
            module.scaling["default"] = 1.0
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def lycoris_layers(unet, text_encoder=None):
    """{kohya-ss module name: PEFT LoHa or LoKr layer} of the models' adapters (see kohya_names for the names)."""
    models, layers = {"unet": unet, "text_encoder": text_encoder}, {}
    for name, (part, path) in kohya_names(unet, text_encoder).items():
        module = models[part].get_submodule(path)
        if isinstance(module, LycorisLayer):
            layers[name] = module
    return layers


def save_lycoris(path, unet, text_encoder=None, metadata=None):
    """The models' LoHa or LoKr adapters as one file in LyCORIS's kohya-ss keys, with each layer's alpha (a LoKr
    layer of two full factors, which is not scaled, gets alpha = rank, as LyCORIS writes it), and `metadata` as
    its header. Written under another name and renamed into place."""
    state = {}
    for name, layer in lycoris_layers(unet, text_encoder).items():
        for tensor_name in layer.adapter_layer_names:
            if "default" in getattr(layer, tensor_name):
                state[f"{name}.{tensor_name}"] = getattr(layer, tensor_name)["default"].detach().contiguous()
        unscaled = isinstance(layer, LoKrLayer) and layer.scaling["default"] == 1.0
        state[f"{name}.alpha"] = torch.tensor(float(layer.r["default"] if unscaled else layer.alpha["default"]))
    with written_atomically(path) as partial:
        save_file(state, partial, metadata=metadata)


def load_lycoris_weights(path, unet, text_encoder=None):
    """Copy the adapter weights of a file save_lycoris wrote back into the models' adapters, bit for bit; ValueError
    when it does not hold every weight of theirs, or holds others."""
    layers = lycoris_layers(unet, text_encoder)
    expected = {f"{name}.{tensor_name}": getattr(layer, tensor_name)["default"] for name, layer in layers.items()
                for tensor_name in layer.adapter_layer_names if "default" in getattr(layer, tensor_name)}  # fmt: skip
    state = {key: tensor for key, tensor in load_file(path).items() if not key.endswith(".alpha")}
    if state.keys() != expected.keys():
        differ = sorted(state.keys() ^ expected.keys())
        raise ValueError(f"{path} holds other adapter weights than this run's, such as {differ[0]}")
    with torch.no_grad():
        for key, parameter in expected.items():
            parameter.copy_(state[key])
