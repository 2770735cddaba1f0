"""Extract a LoRA from a full fine-tune: each layer's change from the base model, kept at a low rank.

A full fine-tune (this toolkit's default) changes all 860M of the UNet's weights, a 3.4 GB folder to share. A LoRA
of the change loads on the base model in AUTOMATIC1111, ComfyUI and diffusers, is a few MB to a few hundred, and
mixes with other LoRAs at a strength of one's choosing. This is what kohya-ss's extract_lora_from_models.py does:
for each layer a LoRA adapts, the change D = W_tuned - W_base (out x in; a convolution's flattened to out x in*k*k)
is taken apart by its singular value decomposition, D = U S Vh, and its best approximation of rank r
(Eckart-Young) becomes the adapter: lora_up = U[:, :r] S[:r] (out x r), lora_down = Vh[:r] (r x in), alpha = r, so
that it applies at a scale of 1.

    python -m sdtoolkit.extract_lora CompVis/stable-diffusion-v1-4 sd-pokemon-model pokemon.safetensors --rank 32
    python -m sdtoolkit.extract_lora base.safetensors tuned.safetensors out.safetensors --rank 64 --conv_rank 32

The layers are kohya-ss's: every linear layer and 1x1 convolution in the UNet's transformer blocks (the
attention, feed-forward, proj_in and proj_out), and with --conv_rank the ResNet blocks' and the samplers' layers
too, their 3x3 convolutions at that rank; the text encoder's attention and MLP layers when it changed by more than
--min_diff (a run that did not train it left it as it was). As kohya-ss does, the factors' values are clamped to
the --clamp_quantile quantile of their values (0.99), which trims rare outliers; 1 keeps them as they are. With
--dynamic_method each layer gets the rank its singular values call for (kohya-ss's resize_lora.py), and every
layer's alpha is 1 (see extract).

What a LoRA can't hold is said, not hidden: the share of those layers' change that the rank keeps, and the
changed tensors that have no place in a LoRA (biases, norms, the UNet's first and last convolutions, embeddings).

The tuned model may be a LoRA itself (or LyCORIS's LoHa or LoKr): merged into the base model, its update is taken
apart in the same way, which gives it at another rank (kohya-ss's resize_lora.py) or a LyCORIS file as a LoRA.

    python -m sdtoolkit.extract_lora CompVis/stable-diffusion-v1-4 big-lora.safetensors small-lora.safetensors --rank 8

Several LoRAs, at --ratios, are merged as one (kohya-ss's svd_merge_lora.py).

The file is in kohya-ss keys, with a header that names its base model, so metrics.py and gradio_app.py take it as a
--model_path of its own, as they take a LoRA run's file.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdtoolkit.atomic_files import written_atomically
from sdtoolkit.errors import ArgumentParser, UserError, run_main
from sdtoolkit.export import training_metadata
from sdtoolkit.inference import (
    add_model_config_argument,
    load_pipeline,
    merge_loras,
    pick_device_and_dtype,
    quiet_diffusers_noise,
    recorded_clip_skip,
)
from sdtoolkit.lora import holds_lora, kohya_metadata, kohya_name
from sdtoolkit.output_dir import local_path_or_name

# The blocks whose linear layers and convolutions kohya-ss's LoRA adapts (networks/lora.py).
UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # with --conv_rank
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP")
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def target_layers(model, blocks):
    """{path: layer} of the linear layers and convolutions inside the model's blocks of these classes."""
    layers = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ in blocks:
            for path, layer in block.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    layers[f"{block_path}.{path}"] = layer
    return layers


def dynamic_rank(S, method, param, most):
    """The rank kohya-ss's --dynamic_method picks for a layer from its change's singular values S (largest first),
    at most `most`: sv_ratio, those within a factor `param` of the largest; sv_cumulative, the fewest whose sum is
    that fraction of the sum of all; sv_fro, the fewest that keep that fraction of the change's Frobenius norm."""
    if method == "sv_ratio":
        rank = int((S > S[0] / param).sum())
    else:
        kept = S.cumsum(0) if method == "sv_cumulative" else S.square().cumsum(0)
        target = param if method == "sv_cumulative" else param**2
        rank = int((kept / kept[-1] < target).sum()) + 1
    return max(1, min(rank, most))


def low_rank(change, rank, clamp_quantile, dynamic=None):
    """(up, down): the best approximation of this rank of a layer's change (out x in, or a convolution's
    out x in x kh x kw), up @ down, shaped as kohya-ss stores them (a convolution's down keeps its kernel, its up
    is 1x1), their values clamped to the clamp_quantile quantile of both (the nearest value) unless it is 1.
    dynamic: (method, param) to pick the layer's rank from its singular values, `rank` at most (see dynamic_rank).

    A layer narrower than a fixed rank has fewer directions than that: the factors are padded with zeros to the
    rank, so that every layer has the one rank and alpha of the file's header. (diffusers 0.42's load_lora_weights
    misreads a kohya-ss file's alphas of attention projections, to_q_lora...alpha for to_q, and gives such a layer
    the file's most common alpha: a layer of another rank would apply at another scale.)
    """
    matrix = change.flatten(1).float()  # (out, in * kh * kw)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = dynamic_rank(S, *dynamic, min(rank, len(S))) if dynamic else min(rank, len(S))
    up, down = U[:, :kept] * S[:kept], Vh[:kept]  # (out, kept), (kept, in * kh * kw)
    if clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        limit = values.kthvalue(1 + round(clamp_quantile * (len(values) - 1))).values
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if not dynamic:
        up = torch.nn.functional.pad(up, (0, rank - kept))  # (out, rank)
        down = torch.nn.functional.pad(down, (0, 0, 0, rank - kept))  # (rank, in * kh * kw)
    if change.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(len(down), *change.shape[1:])
    return up, down


def extract(base, tuned, prefix, layers, ranks, clamp_quantile, dynamic, device):
    """The adapters, in kohya-ss keys, of the layers (paths) of `base` that `tuned` changed, at their `ranks` (at
    most, with `dynamic`), each applying its change at a scale of 1, and (squared norm of the change in those
    layers, squared norm of what the adapters leave of it).

    Each layer's alpha is its rank; with `dynamic`, each layer's rank is its own and every layer's alpha is 1, with
    lora_up multiplied by the rank to keep the scale at 1: diffusers 0.42's load_lora_weights gives an attention
    projection the file's most common alpha (see low_rank), which is then every layer's own."""
    base_layers, tuned_layers = dict(base.named_modules()), dict(tuned.named_modules())
    state, change_norm, left_norm = {}, 0.0, 0.0
    for path in tqdm(layers, desc=f"{type(base).__name__}'s layers", leave=False):
        change = (tuned_layers[path].weight.detach().float() - base_layers[path].weight.detach().float()).to(device)
        if not change.any():  # a layer the run kept frozen
            continue
        up, down = low_rank(change, ranks[path], clamp_quantile, dynamic)
        change_norm += change.square().sum().item()
        left_norm += (change.flatten(1) - up.flatten(1) @ down.flatten(1)).square().sum().item()
        alpha = float(len(down))
        if dynamic:
            up, alpha = up * alpha, 1.0
        name = kohya_name(prefix, path)
        state[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        state[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state, change_norm, left_norm


def left_out_changes(base, tuned, covered):
    """{name: squared norm of its change} of the tensors of `base` that `tuned` changed, other than the weights of
    the `covered` layers: what no LoRA holds."""
    tuned_state, changes = tuned.state_dict(), {}
    for key, tensor in base.state_dict().items():
        if key.removesuffix(".weight") in covered and key.endswith(".weight"):
            continue
        change = tuned_state[key].float() - tensor.float()
        if change.any():
            changes[key] = change.square().sum().item()
    return changes


def check_same_architecture(base, tuned, what):
    """One line when the two models' `what` (the UNet, the text encoder) differ in their tensors' names or shapes."""
    base_shapes = {key: tuple(t.shape) for key, t in base.state_dict().items()}
    tuned_shapes = {key: tuple(t.shape) for key, t in tuned.state_dict().items()}
    if base_shapes != tuned_shapes:
        key = next(
            k for k in sorted(base_shapes.keys() | tuned_shapes.keys()) if base_shapes.get(k) != tuned_shapes.get(k)
        )
        raise UserError(
            f"the two models' {what}s differ in architecture ({key}: {base_shapes.get(key, 'absent')} in the base,"
            f" {tuned_shapes.get(key, 'absent')} in the tuned model); a LoRA is the difference of two models of one"
            " architecture, the tuned one trained from the base"
        )


def load_tuned(paths, ratios, base, config, ema=None):
    """The tuned model on the CPU in float32 (see load_pipeline; ema: a checkpoint's EMA weights or not), or, for
    LoRAs, LoHas or LoKrs, the base model with them merged into its weights, each at its ratio: what is extracted
    from it then is their update at another rank (kohya-ss's resize_lora.py), several LoRAs' as one (its
    svd_merge_lora.py), or a LyCORIS file's as a LoRA."""
    if not holds_lora(paths[0]):
        return load_pipeline(paths[0], torch.device("cpu"), torch.float32, config, ema=ema)
    if ema is not None:
        raise UserError("--ema and --no-ema are for a full fine-tune's checkpoint; a LoRA checkpoint gives its EMA"
                        " weights when it has them")  # fmt: skip
    pipeline = merge_loras(load_pipeline(base, torch.device("cpu"), torch.float32, config), paths, ratios)
    merged = ", ".join(f"{path} at {ratio:g}" for path, ratio in zip(paths, ratios))
    print(f"Merged into {base}, to be taken apart again: {merged}")
    return pipeline


def ranks_said(state, args, convolutions=True):
    """The adapters' ranks in words: the rank asked for, or with --dynamic_method the ones it picked."""
    if not args.dynamic_method:
        conv = f" ({args.conv_rank} for 3x3 convolutions)" if args.conv_rank and convolutions else ""
        return f"at rank {args.rank}{conv}"
    ranks = [len(tensor) for key, tensor in state.items() if key.endswith("lora_down.weight")]
    return f"at ranks {min(ranks, default=0)} to {max(ranks, default=0)} ({args.dynamic_method} {args.dynamic_param})"


def share(part, whole):
    return 100 * part / whole if whole else 0.0


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Extract a LoRA from a full fine-tune (its change from the base model, at a low rank), or write a"
        " LoRA, LoHa or LoKr again as a LoRA at another rank.",
        known_elsewhere={
            "--model_org": "the first argument here (the base model)",
            "--model_tuned": "the second argument here (the tuned model)",
            "--save_to": "the third argument here (the .safetensors file to write)",
        },
    )
    parser.add_argument("base", help="The base model the tuned one was trained from: a folder, a hub id or one file.")
    parser.add_argument(
        "tuned",
        nargs="+",
        help="The fine-tuned model: a run's output folder, a checkpoint-N folder (its EMA weights when it has"
        " them), or one file. Or one or more LoRAs, LoHas or LoKrs (files, LoRA runs' folders or checkpoints), merged into the"
        " base model (at --ratios) and extracted again: a LoRA at another rank, several as one, a LyCORIS file as a"
        " LoRA.",
    )
    parser.add_argument("out", help="The LoRA file to write (.safetensors, kohya-ss keys).")
    parser.add_argument(
        "--rank",
        "--dim",
        "--new_rank",
        type=int,
        default=4,
        help="The LoRA's rank for linear layers and 1x1 convolutions (4).",
    )
    parser.add_argument(
        "--conv_rank",
        "--conv_dim",
        "--new_conv_rank",
        type=int,
        default=None,
        help="Adapt the ResNet blocks' and samplers' layers too, their 3x3 convolutions at this rank (LoCon).",
    )
    parser.add_argument(
        "--clamp_quantile",
        type=float,
        default=None,
        help="Clamp the factors' values to this quantile of them; 1 keeps them as they are. Default: 0.99 from a"
        " fine-tune (kohya-ss's extraction), 1 from a LoRA (its resize_lora.py).",
    )
    parser.add_argument(
        "--dynamic_method",
        choices=["sv_ratio", "sv_fro", "sv_cumulative"],
        default=None,
        help="Pick each layer's rank from its singular values, --rank (--conv_rank) at most, as kohya-ss's"
        " resize_lora.py: sv_fro keeps --dynamic_param of each change's Frobenius norm (e.g. 0.9), sv_cumulative"
        " that fraction of the singular values' sum, sv_ratio those within a factor --dynamic_param of the largest.",
    )
    parser.add_argument("--dynamic_param", type=float, default=None, help="The target of --dynamic_method.")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help="With LoRAs as the tuned model: the strength of each, in their order (1 each by default), as"
        " kohya-ss's svd_merge_lora.py and AUTOMATIC1111's <lora:NAME:ratio>.",
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="From a full fine-tune's checkpoint-N folder: its EMA weights (unet_ema/, the default when it has them),"
        " or with --no-ema its trained weights (unet/).",
    )
    parser.add_argument(
        "--min_diff",
        type=float,
        default=0.01,
        help="The text encoder is adapted only when one of its weights changed by more than this (0.01).",
    )
    parser.add_argument(
        "--save_precision", choices=sorted(PRECISIONS), default="float", help="float (default), fp16 or bf16."
    )
    parser.add_argument(
        "--device", default="auto", help="Where to compute the decompositions: auto (CUDA when available), cpu, cuda."
    )
    add_model_config_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    quiet_diffusers_noise()
    if not args.out.endswith(".safetensors"):
        raise UserError(f"{args.out}: the LoRA file must end in .safetensors")
    if args.rank < 1 or (args.conv_rank is not None and args.conv_rank < 1):
        raise UserError("--rank and --conv_rank must be at least 1")
    if args.clamp_quantile is not None and not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile must be above 0 and at most 1, got {args.clamp_quantile}")
    if (args.dynamic_method is None) != (args.dynamic_param is None):
        raise UserError("--dynamic_method and --dynamic_param go together")
    if args.dynamic_method == "sv_ratio" and not args.dynamic_param >= 1:
        raise UserError(f"--dynamic_method sv_ratio takes a --dynamic_param of 1 or more, got {args.dynamic_param}")
    if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
        raise UserError(f"--dynamic_method {args.dynamic_method} takes a --dynamic_param above 0 and at most 1")
    dynamic = (args.dynamic_method, args.dynamic_param) if args.dynamic_method else None
    from_lora = holds_lora(args.tuned[0])
    if len(args.tuned) > 1 or args.ratios is not None:
        whole = [path for path in args.tuned if not holds_lora(path)]
        if whole:
            raise UserError(
                f"'{whole[0]}' is a whole model: several tuned models, and --ratios, are for LoRAs, merged into the"
                " base model; extract from one fine-tune at a time"
            )
        if args.ratios is not None and len(args.ratios) != len(args.tuned):
            raise UserError(f"--ratios gives {len(args.ratios)} strengths for {len(args.tuned)} LoRAs; give one each")
    ratios = args.ratios or [1.0] * len(args.tuned)
    device, _ = pick_device_and_dtype(args.device)

    if holds_lora(args.base):
        raise UserError(f"the base model '{args.base}' is a LoRA; give the model it applies to")
    base = load_pipeline(args.base, torch.device("cpu"), torch.float32, args.model_config)
    tuned = load_tuned(args.tuned, ratios, args.base, args.model_config, args.ema)

    # A full fine-tune's text encoder may differ from its base's by rounding alone (kohya-ss's reason for
    # --min_diff); a LoRA's changes it only where it has an adapter. kohya-ss clamps what it extracts from a
    # fine-tune, and not what it resizes.
    min_diff = 0.0 if from_lora else args.min_diff
    clamp_quantile = args.clamp_quantile if args.clamp_quantile is not None else 1.0 if from_lora else 0.99
    check_same_architecture(base.unet, tuned.unet, "UNet")
    check_same_architecture(base.text_encoder, tuned.text_encoder, "text encoder")

    # The UNet: its transformer blocks' layers at --rank; with --conv_rank its ResNet blocks' and samplers' too,
    # their 3x3 convolutions at --conv_rank (a 1x1 convolution is a linear layer in all but shape).
    unet_layers = target_layers(base.unet, UNET_BLOCKS + UNET_CONV_BLOCKS * (args.conv_rank is not None))
    ranks = {
        path: args.conv_rank if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1) else args.rank
        for path, layer in unet_layers.items()
    }
    state, change_norm, left_norm = extract(
        base.unet, tuned.unet, "lora_unet_", unet_layers, ranks, clamp_quantile, dynamic, device
    )
    print(
        f"UNet: {len(state) // 3} changed layers of {len(unet_layers)} {ranks_said(state, args)}: the LoRA keeps"
        f" {share(change_norm - left_norm, change_norm):.1f}% of their change (squared norm)"
    )
    left_out = left_out_changes(base.unet, tuned.unet, unet_layers)

    # The text encoder, when the run changed it (kohya-ss's test: a weight moved by more than --min_diff).
    text_layers = target_layers(base.text_encoder, TEXT_ENCODER_BLOCKS)
    tuned_text_layers = dict(tuned.text_encoder.named_modules())
    largest = max(
        (tuned_text_layers[path].weight.float() - layer.weight.float()).abs().max().item()
        for path, layer in text_layers.items()
    )
    if largest > min_diff:
        text_state, text_change, text_left = extract(
            base.text_encoder, tuned.text_encoder, "lora_te_", text_layers, dict.fromkeys(text_layers, args.rank),
            clamp_quantile, dynamic, device,
        )  # fmt: skip
        state.update(text_state)
        said = ranks_said(text_state, args, convolutions=False)
        print(
            f"Text encoder: {len(text_state) // 3} changed layers of {len(text_layers)} {said}: the LoRA keeps"
            f" {share(text_change - text_left, text_change):.1f}% of their change"
        )
        change_norm, left_norm = change_norm + text_change, left_norm + text_left
        text_left_out = left_out_changes(base.text_encoder, tuned.text_encoder, text_layers)
    else:
        within = f" (its largest change, {largest:.3g}, is within --min_diff {min_diff})" if largest else ""
        print(f"Text encoder: unchanged{within}: the LoRA adapts the UNet only")
        text_left_out = left_out_changes(base.text_encoder, tuned.text_encoder, {})
    left_out.update({f"text_encoder.{name}": norm for name, norm in text_left_out.items()})
    if not state:
        raise UserError(
            f"'{' '.join(args.tuned)}' has the same weights as '{args.base}' in every layer a LoRA adapts: nothing to"
            " extract"
        )
    if left_out:
        other_norm = sum(left_out.values())
        print(
            f"Left out: {len(left_out)} other changed tensors that a LoRA has no place for (the most changed:"
            f" {max(left_out, key=left_out.get)}), {share(other_norm, change_norm + other_norm):.1f}% of the whole"
            " change (squared norm)"
        )

    # The header: what the file is for the web UIs (kohya-ss's keys), and for metrics.py and gradio_app.py the base
    # model to load it on, and how the tuned model samples and is prompted.
    scheduler = tuned.scheduler.config
    facts = {
        "model": local_path_or_name(args.base),
        "model_config": local_path_or_name(args.model_config),
        "prediction_type": scheduler.prediction_type,
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr")),
        "clip_skip": recorded_clip_skip(args.tuned[0]),
    }
    name = os.path.splitext(os.path.basename(args.out))[0]
    metadata = kohya_metadata(
        facts, name=name, rank=args.rank, alpha=args.rank, prediction_type=scheduler.prediction_type,
        clip_skip=facts["clip_skip"] or 1, conv_rank=args.conv_rank, conv_alpha=args.conv_rank,
    )  # fmt: skip
    if dynamic:  # each layer has a rank of its own (kohya-ss's header says so), and every alpha is 1 (see extract)
        metadata.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "1.0"})
        if args.conv_rank is not None:
            metadata["ss_network_args"] = json.dumps({"conv_dim": "Dynamic", "conv_alpha": "1.0"})
    metadata.update(training_metadata(None, facts, layout="LoRA (kohya-ss keys)"))
    metadata["sdtoolkit.extracted_from"] = " ".join(str(local_path_or_name(path)) for path in args.tuned)
    dtype = PRECISIONS[args.save_precision]
    tensors = {key: tensor.to(dtype) for key, tensor in state.items()}
    try:
        with written_atomically(args.out) as partial:
            save_file(tensors, partial, metadata=metadata)
    except OSError as err:
        raise UserError(f"could not write {args.out}: {err.strerror or err}") from err
    size = os.path.getsize(args.out) / 1024**2
    print(
        f"Wrote {args.out}: {len(tensors) // 3} adapted layers, {size:.1f} MB, {args.save_precision}, on the base"
        f" model {args.base}. To see what it kept, score it beside the tuned model on the same seeds:"
        f" python metrics.py --model_path {args.base} {' '.join(args.tuned)} {args.out}"
    )


if __name__ == "__main__":
    run_main(main)
