"""Offline Stable Diffusion and CLIP folders with random weights, in the real diffusers/transformers formats.

Nothing here touches the model hub. The tokenizer is the real SD v1-4 CLIP tokenizer: its vocabulary and
merges are rebuilt from the BPE merges file that open_clip_torch ships, the same file OpenAI's CLIP and
SD v1-4 were tokenized with. The weights are random, so images look like noise, but every file, shape and
code path is the real one.

The VAE is made realistic where training depends on it. A random VAE's posterior is wide (its standard
deviation swamps its mean), so training on latent samples, as the script rightly does, would train on noise; a
trained VAE is nearly deterministic. So the fixture's posterior log-variance is set to POSTERIOR_LOGVAR
(std ~1e-3, about a trained VAE's), and its `scaling_factor` is measured on the bundled images to give their
latents unit variance, as SD's 0.18215 does for real images.

    python -m sdtoolkit.fixtures --preset tiny --out fixtures/tiny-sd        # for tests and the demo
    python -m sdtoolkit.fixtures --preset sd-v1-4 --out fixtures/sd-v1-4     # the full architecture (~4.3 GB)
    python -m sdtoolkit.fixtures --preset tiny-clip --out fixtures/tiny-clip # a CLIP model for metrics.py
    python -m sdtoolkit.fixtures --preset tiny-open-clip --out fixtures/tiny-oc # the same for open_clip
"""

import argparse
import gzip
import json
import os
import shutil
import tempfile

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from PIL import Image
from torchvision.transforms import functional as TF
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

# The bundled demo images (data/creatures), on which the fixture VAE's scaling factor is measured.
BUNDLED_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "creatures")

# CLIP's BPE: 49,152 merges-file entries minus 256 byte tokens and 2 specials, plus the header line.
NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77

# The model architectures. "sd-v1-4" is CompVis/stable-diffusion-v1-4's own config; "tiny" keeps SD's block
# types (cross-attention down/up blocks, an 8x VAE) at a size that builds and runs in seconds on a CPU.
PRESETS = {
    "sd-v1-4": {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            sample_size=512,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        ),
        "text_encoder": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        ),
    },
    "tiny": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        "vae": dict(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        ),
    },
}


def write_clip_tokenizer_files(folder):
    """Write SD v1-4's CLIP tokenizer (vocab.json, merges.txt and transformers' own files) into `folder`."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    # The vocabulary order CLIP uses: 256 byte symbols, the same with an end-of-word mark, one token per
    # merge, then the two special tokens (ids 49406 and 49407).
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, f"unexpected CLIP vocabulary size {len(vocab)}"

    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")

    # SD v1-4 pads with the end-of-text token; model_max_length makes padding="max_length" work.
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_encoder_config(preset):
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **PRESETS[preset]["text_encoder"],
    )


def build_models(preset, seed=0):
    """Instantiate (unet, vae, text_encoder) of a preset with seeded random weights."""
    config = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**config["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(preset))
    return unet, vae, text_encoder


# The posterior log-variance of the fixture VAE: std = exp(-7) ~ 1e-3, nearly deterministic like a trained VAE.
POSTERIOR_LOGVAR = -14.0


@torch.no_grad()
def make_vae_realistic(vae, images_folder, resolution=64):
    """Make a random VAE's posterior nearly deterministic and scale its latents to unit variance on the images.

    The encoder's last 1x1 convolution (quant_conv) outputs the posterior's mean and log-variance channels; the
    log-variance half gets zero weights and a bias of POSTERIOR_LOGVAR. The scaling factor is 1 / the std of the
    latent means of the images in `images_folder` at `resolution` px.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = POSTERIOR_LOGVAR

    names = sorted(n for n in os.listdir(images_folder) if n.endswith(".png"))
    images = [
        Image.open(os.path.join(images_folder, n)).convert("RGB").resize((resolution, resolution)) for n in names
    ]
    pixels = torch.stack([TF.normalize(TF.to_tensor(image), [0.5], [0.5]) for image in images])
    means = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / means.std().item(), 5))
    return vae


def sd_scheduler():
    """SD v1-4's scheduler: PNDM with the scaled-linear betas Stable Diffusion was trained with."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def _write_atomically(out, write):
    """Call write(tmp_folder), then move the finished folder to `out`, so `out` is never half-written."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_sd_pipeline(out, preset="tiny", seed=0):
    """Write a complete StableDiffusionPipeline folder (safetensors) that from_pretrained(out) loads offline."""

    def write(folder):
        unet, vae, text_encoder = build_models(preset, seed)
        make_vae_realistic(vae, BUNDLED_IMAGES)
        tokenizer_dir = os.path.join(folder, "tokenizer")
        tokenizer = write_clip_tokenizer_files(tokenizer_dir)
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)
        # save_pretrained rewrote tokenizer/ with transformers' files. Leave it as the hub's SD v1-4 folder has it:
        # the BPE files and tokenizer_config.json, without transformers' tokenizer.json (which also takes a load
        # three times as long: 0.3 s against 0.1, in every training run and server start of the tests).
        write_clip_tokenizer_files(tokenizer_dir)
        os.remove(os.path.join(tokenizer_dir, "tokenizer.json"))

    return _write_atomically(out, write)


def build_tiny_clip(out, seed=0, image_size=32):
    """Write a tiny CLIPModel + CLIPProcessor folder (random weights, real tokenizer) for metrics tests."""

    def write(folder):
        text_config = dict(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        vision_config = dict(
            image_size=image_size,
            patch_size=4,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32))
        with torch.no_grad():
            # Random CLIP weights give image-text cosines around 0, which clip_score floors at 0. A shared offset
            # in both final norms and a shared projection move scores into a positive range that still varies
            # from image to image, so tests of the score compare real numbers.
            model.text_projection.weight.copy_(model.visual_projection.weight)
            model.vision_model.post_layernorm.bias.fill_(1.0)
            model.text_model.final_layer_norm.bias.fill_(1.0)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer = write_clip_tokenizer_files(os.path.join(folder, "bpe"))
        shutil.rmtree(os.path.join(folder, "bpe"))
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)

    return _write_atomically(out, write)


def build_tiny_open_clip(out, seed=0, image_size=32):
    """Write a tiny open_clip model as a local-dir folder (open_clip_config.json + safetensors weights)."""
    import open_clip
    from safetensors.torch import save_file

    def write(folder):
        model_cfg = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
            "text_cfg": {
                "context_length": CLIP_MAX_LENGTH,
                "vocab_size": CLIP_VOCAB_SIZE,
                "width": 32,
                "heads": 4,
                "layers": 2,
            },
        }
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
        with torch.no_grad():  # positive, varying scores, as in build_tiny_clip
            model.text_projection.copy_(model.visual.proj)
            model.visual.ln_post.bias.fill_(1.0)
            model.ln_final.bias.fill_(1.0)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f, indent=2)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(folder, "open_clip_model.safetensors"),
        )

    return _write_atomically(out, write)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build an offline model folder with random weights.")
    parser.add_argument("--preset", choices=[*PRESETS, "tiny-clip", "tiny-open-clip"], default="tiny")
    parser.add_argument("--out", required=True, help="Folder to create (must not exist).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.preset == "tiny-clip":
        out = build_tiny_clip(args.out, seed=args.seed)
    elif args.preset == "tiny-open-clip":
        out = build_tiny_open_clip(args.out, seed=args.seed)
    else:
        out = build_sd_pipeline(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} to {out}")


if __name__ == "__main__":
    main()
