#!/usr/bin/env python
"""CLIP score of Stable Diffusion pipelines on a set of prompts, side by side, with the pictures behind it.

The score is torchmetrics' `clip_score` (https://arxiv.org/abs/2104.08718): for each image, 100 times the
cosine between its CLIP image embedding and its prompt's CLIP text embedding; the model's score is the mean
over all images, floored at 0. With no arguments this scores `sd-pokemon-model` on the seed's six prompts
with `openai/clip-vit-base-patch16`:

    python metrics.py
    python metrics.py --model_path CompVis/stable-diffusion-v1-4 sd-pokemon-model --seeds 0 1 2 3

Every model sees the same seeds, so the same starting noise for the same prompt: each model after the first
is compared with the first prompt by prompt and seed, and the mean paired difference gets a bootstrap 95%
interval and a verdict (better, worse, or no difference this run can detect). With --reference_data (the
training images) it also reports each model's Fréchet and kernel distances to them in CLIP's image-feature
space, and each generated image's nearest training image, flagging near-copies. With --caption_data (a folder
of captioned images as training reads one) it reports each model's caption accuracy, as a diffusion classifier,
on them, compared image by image with the first model's. It writes scores.json, scores.csv, report.md and image
grids (rows are prompts, columns seeds x images) to --output_dir.

    python metrics.py --model_path CompVis/stable-diffusion-v1-4 sd-pokemon-model --seeds 0 1 2 3 \
        --reference_data my-training-images
    python metrics.py --doc_protocol --model_path CompVis/stable-diffusion-v1-4 stable-diffusion-v1-5/stable-diffusion-v1-5
"""

import csv
import json
import os
import re
import statistics
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from torchmetrics.functional.multimodal import clip_score
from torchvision.transforms.functional import to_pil_image
from tqdm.auto import tqdm

from sdtoolkit.caption_folders import IMAGE_EXTENSIONS
from sdtoolkit.clip_windows import encode_prompts, plain_text, unsupported_syntax
from sdtoolkit.data import read_large_photos, saved_train_split, saved_with_save_to_disk
from sdtoolkit.embeddings import load_embeddings
from sdtoolkit.errors import ArgumentParser, UserError, first_line, run_main
from sdtoolkit.evaluation import image_features, nearest, paired_bootstrap, set_distances, verdict
from sdtoolkit.inference import (
    add_device_arguments,
    add_model_config_argument,
    default_guidance_rescale,
    is_lora,
    load_pipeline,
    pick_clip_skip,
    pick_device_and_dtype,
    quiet_diffusers_noise,
    recorded_weighted_captions,
)
from sdtoolkit.learning_check import caption_hits, decode_images, read_caption_data, read_images
from sdtoolkit.output_dir import check_output_dir
from sdtoolkit.serving import LORA_TAG

# The seed's validation prompts.
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A high tech solarpunk utopia in the Amazon rainforest",
    "A pikachu fine dining with a view to the Eiffel Tower",
    "A mecha robot in a favela in expressionist style",
    "an insect robot preparing a delicious meal",
    "A small cabin on top of a snowy mountain in the style of Disney, artstation",
]


# The training script's flags people type here, and what does their work: an error that names one says so.
KNOWN_ELSEWHERE = {
    "--pretrained_model_name_or_path": "--model_path here (several, to score them side by side)",
    "--validation_prompts": "--prompts_file here (one prompt a line)",
    "--sample_prompts": "--prompts_file here (one prompt a line)",
    "--train_data_dir": (
        "--caption_data here for an imagefolder or caption-file folder (caption accuracy), --reference_data for any"
        " folder of images (distances to it)"
    ),
    "--dataset_name": "not here: give a local copy as --caption_data (a folder) or --reference_data",
    "--dataset_config": "--caption_data here, for caption accuracy on the file's training folders",
}


def parse_args(argv=None):
    parser = ArgumentParser(
        description="CLIP score of Stable Diffusion pipelines on a set of prompts.", known_elsewhere=KNOWN_ELSEWHERE
    )
    parser.add_argument(
        "--model_path",
        nargs="+",
        default=["sd-pokemon-model"],
        help="Pipeline folder(s), hub id(s) or SD 1.x .safetensors file(s); give two or more to compare them side by side.",
    )
    parser.add_argument(
        "--clip_model",
        default=None,
        help=(
            "CLIP model: a hub id or local folder for --clip_backend transformers (default"
            " openai/clip-vit-base-patch16); ARCH/PRETRAINED (a tag or checkpoint file), local-dir:FOLDER or"
            " hf-hub:ORG/REPO for --clip_backend open_clip (default ViT-B-16/openai)."
        ),
    )
    parser.add_argument("--clip_backend", choices=["transformers", "open_clip"], default="transformers")
    parser.add_argument(
        "--prompts_file",
        default=None,
        help=(
            "One prompt a line, or JSON lines with 'prompt' and optionally 'negative_prompt' (default: the"
            " seed's six prompts)."
        ),
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds; every model uses the same ones.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument(
        "--guidance_rescale",
        type=float,
        default=None,
        help=(
            "Rescale the guided prediction toward the prompt-only one by this much, 0 to 1 (diffusers'"
            " guidance_rescale, Lin et al.'s phi). Default: each model's own, 0.7 for a model that samples with zero"
            " terminal SNR (a --zero_terminal_snr run), else 0."
        ),
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Image side in pixels (default: the model's own, 512 for SD)."
    )
    parser.add_argument("--batch_size", type=int, default=1, help="Prompts per generation call.")
    parser.add_argument(
        "--lora",
        nargs="+",
        default=[],
        help=(
            "LoRA(s) to score as more models: each on top of the first --model_path (a folder with"
            " pytorch_lora_weights.safetensors, or a .safetensors file in diffusers' or kohya keys, LyCORIS's LoHa and"
            " LoKr files too)."
        ),
    )
    parser.add_argument(
        "--lora_scale",
        type=float,
        nargs="+",
        default=[1.0],
        help=(
            "How strongly the LoRAs apply: 1 as trained, 0 not at all (AUTOMATIC1111's <lora:NAME:scale>). Given"
            " several values, each LoRA is scored at each of them, side by side on the same seeds: which strength"
            " suits it."
        ),
    )
    parser.add_argument(
        "--clip_skip",
        type=int,
        default=None,
        help=(
            "Read the prompts from the text encoder's N-th layer from the end (AUTOMATIC1111's Clip skip), for every"
            " model. Default: each model's own, when its training run recorded one (train_text_to_image.py"
            " --clip_skip runs and kohya-ss LoRAs do), else 1."
        ),
    )
    parser.add_argument(
        "--embeddings_dir",
        default=None,
        help=(
            "A folder of textual inversion embeddings (.safetensors), each file a word the prompts may use, as"
            " gradio_app.py --embeddings_dir."
        ),
    )
    add_model_config_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--output_dir", default="clip-scores", help="Where scores.json, scores.csv and grids go.")
    parser.add_argument(
        "--caption_data",
        default=None,
        help=(
            "A folder of captioned images as the training script reads one, e.g. the training data (an imagefolder"
            " with a metadata.jsonl, .csv or .parquet, or images with same-named .txt caption files), or a kohya-ss"
            " dataset config (.toml, .json) for its training folders: also report"
            " each model's caption accuracy on it, the share of its images whose own caption the model picks among"
            " their captions when used as a diffusion classifier (see sdtoolkit/learning_check.py), and compare it"
            " image by image with the first model's."
        ),
    )
    parser.add_argument(
        "--caption_column",
        default="text",
        help="The column of --caption_data's metadata file that holds the captions (default: text), as in training.",
    )
    parser.add_argument(
        "--caption_extension",
        default=".txt",
        help="The extension of --caption_data's caption files (default: .txt), as in training.",
    )
    parser.add_argument(
        "--caption_from_filename",
        action="store_true",
        help="Caption --caption_data's images without a caption file by their file name, as in training.",
    )
    parser.add_argument(
        "--caption_prefix",
        default=None,
        help=(
            "Words put before every --caption_data caption, as the training run's --caption_prefix put them (a"
            " dataset config's subsets' own win), so each image is tried with the captions the model learned."
        ),
    )
    parser.add_argument(
        "--caption_suffix", default=None, help="Words put after every --caption_data caption, as --caption_prefix."
    )
    parser.add_argument(
        "--max_caption_images",
        type=int,
        default=64,
        help=(
            "Caption accuracy on at most this many of --caption_data's images, a seeded sample that is the same for"
            " every model (default 64; 0 for all): its cost grows with the square of the number, as each image is"
            " tried with every caption."
        ),
    )
    parser.add_argument(
        "--weighted_captions",
        action="store_true",
        help=(
            "Read --caption_data's captions for AUTOMATIC1111's emphasis, as a run with --weighted_captions trained"
            " on them, for every model; without it, so for the runs that recorded it, and as words for the others."
        ),
    )
    parser.add_argument(
        "--reference_data",
        default=None,
        help=(
            "A folder of images, e.g. the training data (an imagefolder, a caption folder, any folder of"
            " images): report each model's Fréchet and kernel distances to it in CLIP image-feature space, and"
            " each generated image's nearest image in it."
        ),
    )
    parser.add_argument(
        "--memorisation_threshold",
        type=float,
        default=0.95,
        help="CLIP image cosine similarity above which a generated image is flagged as a near-copy (default 0.95).",
    )
    parser.add_argument(
        "--doc_protocol",
        action="store_true",
        help=(
            "Reproduce the protocol of diffusers' removed 'Evaluating Diffusion Models' page: its six prompts in"
            " one batch, one torch.manual_seed(0) generator carried from model to model, 50 steps, guidance 7.5,"
            " each model's own scheduler, output_type='np' truncated to uint8, one CLIP score over the six."
        ),
    )
    args = parser.parse_args(argv)

    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip must be 1 (the text encoder's last layer) or more, got {args.clip_skip}")
    if args.doc_protocol and (args.clip_skip, args.embeddings_dir, args.guidance_rescale) != (None, None, None):
        raise UserError(
            "--doc_protocol samples as the page did: drop --clip_skip, --embeddings_dir and --guidance_rescale"
        )
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        raise UserError(f"--guidance_rescale must be from 0 (off) to 1, got {args.guidance_rescale}")
    if args.max_caption_images < 0 or args.max_caption_images == 1:
        raise UserError(f"--max_caption_images must be 0 (all) or at least 2, got {args.max_caption_images}")
    for flag in ("weighted_captions", "caption_prefix", "caption_suffix", "caption_from_filename"):
        if getattr(args, flag) and args.caption_data is None:
            raise UserError(f"--{flag} is for --caption_data's captions: give --caption_data too, or drop it")
    if not 0 < args.memorisation_threshold <= 1:
        raise UserError(f"--memorisation_threshold must be in (0, 1], got {args.memorisation_threshold}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8 != 0):
        raise UserError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}"
        )
    for flag in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.clip_model is None:
        args.clip_model = "openai/clip-vit-base-patch16" if args.clip_backend == "transformers" else "ViT-B-16/openai"
    return args


# Prompts are read as gradio_app.py reads them (emphasis, BREAK, windows, embeddings), but LoRAs are models here.
LORA_TAGS_ERROR = (
    "--prompts_file {}, prompt {}: <lora:...> tags are for gradio_app.py; score a LoRA with --lora (and --lora_scale)"
)


def check_prompt(text, prompts_file, number):
    """One line for a prompt (and its negative) that metrics.py can't read as gradio_app.py would."""
    if LORA_TAG.search(text):
        raise UserError(LORA_TAGS_ERROR.format(prompts_file, number))
    problem = unsupported_syntax(text)
    if problem:
        raise UserError(f"--prompts_file {prompts_file}, prompt {number}: {problem}")


def load_prompts(prompts_file):
    """(prompts, negative prompts); the negatives are None when no prompt has one."""
    if prompts_file is None:
        return list(PROMPTS), None
    if not os.path.isfile(prompts_file):
        raise UserError(f"--prompts_file {prompts_file} does not exist")
    with open(prompts_file, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UserError(f"--prompts_file {prompts_file} has no prompts (one prompt a line; # starts a comment)")
    if not (prompts_file.endswith(".jsonl") or lines[0].startswith("{")):
        for number, line in enumerate(lines, 1):
            check_prompt(line, prompts_file, number)
        return lines, None
    prompts, negatives = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--prompts_file {prompts_file}, prompt {number}: not JSON ({err.msg})") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f'--prompts_file {prompts_file}, prompt {number}: needs a non-empty "prompt" string')
        check_prompt(row["prompt"] + " " + str(row.get("negative_prompt") or ""), prompts_file, number)
        prompts.append(row["prompt"])
        negatives.append(str(row.get("negative_prompt") or ""))
    return prompts, (negatives if any(negatives) else None)


def say_unreadable(unreadable, folder):
    """One line naming the images of `folder` left out because they can't be decoded (the first five)."""
    if unreadable:
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        count = f"{len(unreadable)} image" + ("s" if len(unreadable) > 1 else "")
        print(f"Left out {count} of {folder} that can't be read: {', '.join(unreadable[:5])}{more}")


def read_reference_images(folder):
    """Every image under `folder` (an imagefolder's metadata order when it has a metadata.jsonl; the train split's
    when it was saved with datasets' save_to_disk), decoded as training decodes them, and the ones that can't be,
    as 'file (reason)'."""
    if not os.path.isdir(folder):
        raise UserError(f"--reference_data {folder} is not a folder")
    if saved_with_save_to_disk(folder):
        decoded, unreadable = decode_images(saved_train_split(folder, "--reference_data"))
        images = [image for image in decoded if image is not None]
    else:
        images, unreadable = read_images(reference_paths(folder))
    if len(images) < 2:
        raise UserError(f"--reference_data {folder} needs at least 2 images that can be read, found {len(images)}")
    return images, unreadable


def reference_paths(folder):
    """The image files of a --reference_data folder: its metadata.jsonl's, in order, or else all of them."""
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        return sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(folder)
            for name in names
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
    try:
        with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8-sig") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"--reference_data {folder}: its metadata.jsonl can't be read: {first_line(err)}") from err
    if not all(isinstance(row, dict) and isinstance(row.get("file_name"), str) for row in rows):
        raise UserError(f"--reference_data {folder}: every line of its metadata.jsonl needs a file_name")
    return [os.path.join(folder, row["file_name"]) for row in rows]


# CLIP models, presented to torchmetrics' clip_score as the (model, processor) pair it expects.


class TransformersCLIPFeatures(torch.nn.Module):
    """A transformers CLIPModel whose get_*_features return tensors, as torchmetrics 1.9.0 expects.

    transformers 5 returns an output object from CLIPModel.get_image_features/get_text_features, and
    torchmetrics 1.9.0 then fails with "'BaseModelOutputWithPooling' object has no attribute 'norm'"
    (fixed in torchmetrics PR #3408, unreleased here). The projected embedding is the output's pooler_output.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings to truncate

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class OpenCLIPFeatures(torch.nn.Module):
    """An open_clip model with the two methods torchmetrics' clip_score calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # No text_config: open_clip's tokenizer already truncates to the model's 77-token context.
        self.config = SimpleNamespace()

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


class OpenCLIPProcessor:
    """open_clip's image transform and tokenizer behind the processor call torchmetrics makes."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack([self.preprocess(to_pil_image(image)) for image in images])}
        input_ids = self.tokenizer(text)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def load_clip(backend, name):
    """Load a CLIP model once; returns the (model, processor) pair for torchmetrics' clip_score."""
    offline = " HF_HUB_OFFLINE=1 is set, so it must be a local folder or in the local cache;" * (
        os.environ.get("HF_HUB_OFFLINE") == "1"
    )
    if backend == "transformers":
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise UserError(
                f"could not load the CLIP model '{name}': {first_line(err)} --{offline} to use a local copy, save"
                " it once where the hub is reachable with CLIPModel.from_pretrained(name).save_pretrained(DIR) and"
                " CLIPProcessor.from_pretrained(name).save_pretrained(DIR), then pass --clip_model DIR"
            ) from err
        return TransformersCLIPFeatures(model).eval(), processor

    import open_clip

    if os.path.isdir(name):
        name = "local-dir:" + name
    if name.startswith(("local-dir:", "hf-hub:")):
        arch, pretrained = name, None
    elif "/" in name:
        arch, pretrained = name.split("/", 1)
    else:
        raise UserError(
            f"--clip_model for open_clip must be ARCH/PRETRAINED, local-dir:FOLDER or hf-hub:REPO; got {name}"
        )
    if not name.startswith(("local-dir:", "hf-hub:")) and arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture '{arch}'; open_clip.list_models() lists the known ones")
    try:
        model, preprocess = open_clip.create_model_from_pretrained(arch, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(arch)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"could not load the open_clip model '{name}': {first_line(err)} --{offline} pass a local checkpoint"
            " as ARCH/path/to/weights.safetensors or a folder with open_clip_config.json and its weights"
        ) from err
    return OpenCLIPFeatures(model).eval(), OpenCLIPProcessor(preprocess, tokenizer)


def model_labels(model_paths):
    """A short, distinct name for each model: its folder's name, with as many parent folders as it takes to tell
    two apart (exp1/model, exp2/model), and a number for the same model given twice."""
    parts = [os.path.normpath(path).split(os.sep) for path in model_paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]


def file_label(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def generate_images(pipeline, prompts, negatives, args, clip_skip=1, guidance_rescale=0.0):
    """images[p][j]: image j of prompt p, j running over seeds, then images per seed, with the guidance rescaled by
    `guidance_rescale`.

    Image k of (prompt, seed) comes from a generator seeded with the seed, drawing in order, so the noise a
    picture starts from does not depend on --batch_size or on which model is scored: the models' images are
    paired. Prompts are read as gradio_app.py reads them (see sdtoolkit/clip_windows.py), from the text encoder's
    layer `clip_skip` from the end.
    """
    device = pipeline.device
    images = [[] for _ in prompts]
    generator_device = "cpu" if device.type == "mps" else device
    pipeline.set_progress_bar_config(disable=True)
    guidance = args.guidance_scale > 1
    calls = [(seed, start) for seed in args.seeds for start in range(0, len(prompts), args.batch_size)]
    for seed, start in tqdm(calls, desc="generating", unit="batch"):
        batch = range(start, min(start + args.batch_size, len(prompts)))
        with torch.inference_mode():
            embeddings = {
                p: encode_prompts(pipeline, prompts[p], negatives and negatives[p], guidance, clip_skip) for p in batch
            }
            # Prompts generated together need as many CLIP windows as each other: a batch goes in groups.
            groups = {}
            for p in batch:
                groups.setdefault(embeddings[p][0].shape[1], []).append(p)
            for group in groups.values():
                generators = []
                for _ in group:
                    generator = torch.Generator(generator_device).manual_seed(seed)
                    generators += [generator] * args.num_images_per_prompt
                output = pipeline(
                    prompt_embeds=torch.cat([embeddings[p][0] for p in group]),
                    negative_prompt_embeds=torch.cat([embeddings[p][1] for p in group]) if guidance else None,
                    num_images_per_prompt=args.num_images_per_prompt,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    guidance_rescale=guidance_rescale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generators,
                )
                for i, p in enumerate(group):
                    n = args.num_images_per_prompt
                    images[p] += output.images[i * n : (i + 1) * n]
    return images


def doc_protocol_images(pipeline, generator):
    """The removed page's call: its six prompts in one batch, the generator it carried from model to model,
    the pipeline's own defaults (50 steps, guidance 7.5, its scheduler), images as float arrays."""
    with torch.inference_mode():
        return pipeline(PROMPTS, num_images_per_prompt=1, generator=generator, output_type="np").images


def doc_protocol_score(images, clip):
    """The page's number: (images * 255) truncated to uint8, one clip_score over all six, rounded to 4 places."""
    clip_model, clip_processor = clip
    device = next(clip_model.parameters()).device
    images_int = torch.from_numpy((images * 255).astype("uint8")).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        score = clip_score(images_int, PROMPTS, model_name_or_path=lambda: (clip_model, clip_processor))
    return round(float(score.detach()), 4)


def to_tensor(image):
    """A PIL image as the uint8 (3, H, W) tensor torchmetrics takes."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def score_model(images, prompts, clip, device):
    """Per-image torchmetrics scores grouped by prompt, and torchmetrics' score over all the images. Each image is
    scored against its prompt's words, without the emphasis and BREAKs that instruct the generating model."""
    clip_model, clip_processor = clip

    def loader():
        return clip_model, clip_processor

    per_prompt = []
    all_images, all_texts = [], []
    for prompt, prompt_images in zip(prompts, images):
        prompt = plain_text(prompt)
        tensors = [to_tensor(image).to(device) for image in prompt_images]
        with torch.no_grad():
            per_prompt.append([clip_score(t, prompt, model_name_or_path=loader).item() for t in tensors])
        all_images += tensors
        all_texts += [prompt] * len(tensors)
    with torch.no_grad():
        overall = clip_score(all_images, all_texts, model_name_or_path=loader).item()
    return per_prompt, overall


def write_reports(results, prompts, comparisons, caption_set, reference_images, unreadable, args):
    """scores.json, scores.csv, report.md, and per model an image grid and (with --reference_data) a grid of
    its images closest to the reference set, in args.output_dir; returns the report and the paths written.
    `unreadable`: for --caption_data and --reference_data, the images left out because they can't be read."""
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {
        "doc_protocol": args.doc_protocol,
        "reference_data": args.reference_data,
        "memorisation_threshold": args.memorisation_threshold,
        "caption_data": args.caption_data,
        "caption_images": len(caption_set["labels"]) if caption_set else None,
        "caption_rows": caption_set["rows"] if caption_set else None,
        "caption_candidates": len(caption_set["candidates"]) if caption_set else None,
        "caption_prefix": args.caption_prefix,
        "caption_suffix": args.caption_suffix,
        "caption_from_filename": args.caption_from_filename,
        "unreadable_images": unreadable,
        "weighted_captions": args.weighted_captions,
        "clip_backend": args.clip_backend,
        "clip_model": args.clip_model,
        "seeds": args.seeds,
        "num_images_per_prompt": args.num_images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "guidance_rescale": args.guidance_rescale,
        "resolution": args.resolution,
        "lora_scale": args.lora_scale,
        "embeddings_dir": args.embeddings_dir,
    }
    report = {"settings": settings, "prompts": prompts, "models": []}
    for result in results:
        report["models"].append(
            {
                "model_path": result["model_path"],
                "clip_score": result["overall"],
                "label": result["label"],
                "clip_skip": result["clip_skip"],
                "guidance_rescale": result["guidance_rescale"],
                "caption_accuracy": result.get("caption_accuracy"),
                "caption_hits": result.get("caption_hits"),
                "caption_accuracy_weighted_captions": result.get("weighted_captions"),
                "doc_protocol_clip_score": result.get("doc_protocol_clip_score"),
                "training_set": result.get("training_set"),
                "per_prompt": [
                    {
                        "prompt": prompt,
                        "mean": statistics.fmean(scores),
                        # The spread of one score is no spread: n/a rather than a misleading 0.
                        "std": statistics.pstdev(scores) if len(scores) > 1 else None,
                        "scores": scores,
                    }
                    for prompt, scores in zip(prompts, result["per_prompt"])
                ],
            }
        )
    if len(results) >= 2:
        report["difference"] = {
            "of": results[1]["model_path"],
            "minus": results[0]["model_path"],
            "clip_score": results[1]["overall"] - results[0]["overall"],
        }
    report["comparisons"] = comparisons
    # Caption accuracy image by image: 1 where the model picks the image's own caption, 0 where not.
    report["caption_comparisons"] = compared_with_first(results, lambda r: r["caption_hits"]) if caption_set else []

    paths = []
    json_path = os.path.join(args.output_dir, "scores.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    paths.append(json_path)

    csv_path = os.path.join(args.output_dir, "scores.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model_path", "prompt", "mean", "std", "n"])
        for model in report["models"]:
            for row in model["per_prompt"]:
                std = "" if row["std"] is None else f"{row['std']:.4f}"
                writer.writerow([model["model_path"], row["prompt"], f"{row['mean']:.4f}", std, len(row["scores"])])
            writer.writerow(
                [
                    model["model_path"],
                    "(all)",
                    f"{model['clip_score']:.4f}",
                    "",
                    sum(len(r["scores"]) for r in model["per_prompt"]),
                ]
            )
    paths.append(csv_path)

    grids, nearest_grids = {}, {}
    for result in results:
        grid_path = os.path.join(args.output_dir, f"grid-{file_label(result['label'])}.png")
        columns = len(result["images"][0])
        flat = [image for row in result["images"] for image in row]
        make_image_grid(flat, rows=len(prompts), cols=columns).save(grid_path)
        paths.append(grid_path)
        grids[result["label"]] = os.path.basename(grid_path)
        if result.get("training_set"):
            # The closest pairs first: each generated image beside its nearest reference image.
            pairs = sorted(result["training_set"]["nearest"], key=lambda pair: -pair["similarity"])[:NEAREST_SHOWN]
            tiles = []
            for pair in pairs:
                generated = result["images"][pair["prompt"]][pair["image"]]
                tiles += [generated, reference_images[pair["reference"]].resize(generated.size)]
            nearest_path = os.path.join(args.output_dir, f"nearest-{file_label(result['label'])}.png")
            make_image_grid(tiles, rows=len(pairs), cols=2).save(nearest_path)
            paths.append(nearest_path)
            nearest_grids[result["label"]] = os.path.basename(nearest_path)

    markdown_path = os.path.join(args.output_dir, "report.md")
    with open(markdown_path, "w") as f:
        f.write(report_markdown(report, grids, nearest_grids))
    paths.append(markdown_path)
    return report, paths


# How many of a model's images, closest to the reference set first, its nearest-pair grid shows.
NEAREST_SHOWN = 8


def lora_scales_text(scales):
    """The LoRA strengths for report.md's settings line (", LoRAs at scale 0.7"), or nothing at strength 1."""
    if scales == [1.0]:
        return ""
    return f", LoRAs at scale{'s' * (len(scales) > 1)} {', '.join(f'{scale:g}' for scale in scales)}"


def comparison_table(measure, over, units, comparisons):
    """report.md's lines for the paired comparisons of one measure (see compared_with_first)."""
    lines = ["", f"Paired differences of {measure}, each model against the first, {over} (95% percentile bootstrap"
             " interval, 10,000 resamples, seeded):", "",
             f"| model | minus | {units} | mean difference | 95% interval | verdict |",
             "| --- | --- | ---: | ---: | --- | --- |"]  # fmt: skip
    for c in comparisons:
        low, high = c["ci95"]
        lines.append(f"| {c['model']} | {c['baseline']} | {c['units']} | {c['mean_difference']:+.4f} |"
                     f" {low:+.4f} to {high:+.4f} | {c['verdict']} |")  # fmt: skip
    return lines


def report_markdown(report, grids, nearest_grids):
    """report.md: the scores, the paired comparisons with their intervals, the distances, and the grids."""
    settings, models = report["settings"], report["models"]
    lines = ["# Evaluation", ""]
    if settings["doc_protocol"]:
        lines += ["The protocol of diffusers' removed 'Evaluating Diffusion Models' page: its six prompts, one",
                  "torch.manual_seed(0) generator carried from model to model (so the models' images are not",
                  "paired), 50 steps, guidance 7.5, each model's own scheduler.", ""]  # fmt: skip
    else:
        lines += [f"{len(report['prompts'])} prompts x seeds {settings['seeds']} x {settings['num_images_per_prompt']}"
                  f" image(s), {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
                  + lora_scales_text(settings["lora_scale"]) + ";"
                  f" CLIP: {settings['clip_model']} ({settings['clip_backend']}). Every model starts from the same"
                  " noise for the same prompt and seed.", ""]  # fmt: skip
    header = "| model | CLIP score |"
    rule = "| --- | ---: |"
    if settings["doc_protocol"]:
        header, rule = header + " page's CLIP score |", rule + " ---: |"
    if settings["reference_data"]:
        header += " Fréchet distance | kernel distance | near-copies |"
        rule += " ---: | ---: | ---: |"
    if settings["caption_data"]:
        header, rule = header + " caption accuracy |", rule + " ---: |"
    clip_skips = any(model["clip_skip"] > 1 for model in models)
    if clip_skips:  # the text encoder's layer the prompts were read from, 1 the last
        header, rule = header + " clip skip |", rule + " ---: |"
    rescaled = any(model["guidance_rescale"] > 0 for model in models)
    if rescaled:
        header, rule = header + " guidance rescale |", rule + " ---: |"
    lines += [header, rule]
    for model in models:
        row = f"| {model['label']} | {model['clip_score']:.4f} |"
        if settings["doc_protocol"]:
            row += f" {model['doc_protocol_clip_score']:.4f} |"
        if settings["reference_data"]:
            t = model["training_set"]
            row += (f" {t['frechet_distance']:.4f} | {t['kernel_distance']:.4f} ± {t['kernel_distance_std']:.4f} |"
                    f" {t['near_copies']:.1%} |")  # fmt: skip
        if settings["caption_data"]:
            row += f" {model['caption_accuracy']:.4f} |"
        if clip_skips:
            row += f" {model['clip_skip']} |"
        if rescaled:
            row += f" {model['guidance_rescale']:g} |"
        lines.append(row)
    if report["comparisons"]:
        lines += comparison_table("CLIP score", "over prompt-seed pairs", "pairs", report["comparisons"])
    if settings["caption_data"]:
        drawn = settings["caption_images"] + len(settings["unreadable_images"]["caption_data"])
        sample = (f"a seeded sample of {drawn} of its {settings['caption_rows']} captioned images"
                  if settings["caption_rows"] > drawn else f"its {drawn} captioned images")  # fmt: skip
        lines += ["", f"Caption accuracy on {settings['caption_data']}: {sample}, each tried with the"
                  f" {settings['caption_candidates']} captions among them (chance"
                  f" {1 / settings['caption_candidates']:.4f}); the share whose own caption the model picks as a"
                  " diffusion classifier."]  # fmt: skip
        lines += left_out_lines(settings["unreadable_images"]["caption_data"])
    if report["caption_comparisons"]:
        lines += comparison_table("caption accuracy", "image by image", "images", report["caption_comparisons"])
    if settings["reference_data"]:
        lines += ["", f"Distances to {settings['reference_data']} in CLIP image-feature space (lower is closer);"
                  f" near-copies: images whose nearest reference image has a cosine similarity of at least"
                  f" {settings['memorisation_threshold']}. Fréchet distance is biased upwards for small sets."]  # fmt: skip
        lines += left_out_lines(settings["unreadable_images"]["reference_data"])
    lines += ["", "## Images", ""]
    for label, grid in grids.items():
        lines += [f"{label} (rows are prompts):", "", f"![{label}]({grid})", ""]
        if label in nearest_grids:
            lines += [f"{label}, its images closest to the reference set, each beside its nearest reference image:",
                      "", f"![nearest: {label}]({nearest_grids[label]})", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def left_out_lines(unreadable):
    """report.md's line naming the images left out because they can't be read, if any."""
    return [f"Left out, as they can't be read: {', '.join(unreadable)}."] if unreadable else []


def print_table(report, prompts):
    models = report["models"]
    width = min(max(len(p) for p in prompts), 60)
    header = f"{'prompt':<{width}}" + "".join(f" | {m['label'][-20:]:>20}" for m in models)
    print(header)
    print("-" * len(header))
    for i, prompt in enumerate(prompts):
        short = prompt if len(prompt) <= width else prompt[: width - 3] + "..."
        cells = ""
        for m in models:
            row = m["per_prompt"][i]
            std = "n/a" if row["std"] is None else f"{row['std']:.4f}"
            cells += f" | {row['mean']:>10.4f} ± {std:<7}"
        print(f"{short:<{width}}{cells}")
    print()


def compared_with_first(results, units):
    """Each model after the first against the first, on the same units (units(result): one number per unit): the
    mean paired difference, its bootstrap 95% interval over the units, and a verdict."""
    baseline = units(results[0])
    comparisons = []
    for result in results[1:]:
        differences = [b - a for a, b in zip(baseline, units(result))]
        mean, low, high = paired_bootstrap(differences)
        comparisons.append({"model": result["label"], "baseline": results[0]["label"], "units": len(differences),
                            "mean_difference": mean, "ci95": [low, high], "verdict": verdict(low, high)})  # fmt: skip
    return comparisons


def paired_comparisons(results, args):
    """CLIP scores compared with the first model's on the same (prompt, seed) units, a unit's score being the mean
    over its images (see compared_with_first)."""
    n = args.num_images_per_prompt

    def units(result):
        return [statistics.fmean(scores[k * n : (k + 1) * n]) for scores in result["per_prompt"]
                for k in range(len(args.seeds))]  # fmt: skip

    return compared_with_first(results, units)


def training_set_check(images, reference, clip, device, threshold):
    """Distances of a model's images to the reference set, and each image's nearest reference image."""
    flat = [image for row in images for image in row]
    features = image_features(flat, clip, device)
    fd, kd, kd_std = set_distances(features, reference)
    index, similarity = nearest(features, reference)
    per_image = len(images[0])
    pairs = [{"prompt": i // per_image, "image": i % per_image, "reference": index[i], "similarity": similarity[i]}
             for i in range(len(flat))]  # fmt: skip
    return {"frechet_distance": fd, "kernel_distance": kd, "kernel_distance_std": kd_std,
            "near_copies": sum(s >= threshold for s in similarity) / len(similarity), "nearest": pairs}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    quiet_diffusers_noise()
    read_large_photos()  # --caption_data and --reference_data: the user's own photos, up to 500 megapixels
    try:
        return evaluate(args)
    except torch.OutOfMemoryError as err:
        # What lowers the memory of generation without changing the images, else what does with other images.
        options = []
        if args.batch_size > 1:
            options.append("--batch_size 1 (the same images)")
        if args.dtype == "float32":
            options.append("--dtype float16")
        fix = ", ".join(options) or "a lower --resolution or --num_images_per_prompt (other images)"
        raise UserError(f"out of GPU memory ({first_line(err)}); try {fix}") from None


def evaluate(args):
    """Generate with every model, score, and write the reports; returns the report."""
    if args.doc_protocol:
        prompts, negatives = list(PROMPTS), None
    else:
        prompts, negatives = load_prompts(args.prompts_file)
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    if args.lora_scale != [1.0] and not args.lora and not any(is_lora(path) for path in args.model_path):
        raise UserError("--lora_scale is for LoRAs: give them with --lora, or a LoRA run's folder as a --model_path")
    # Check where the reports go and load the CLIP model first: both should fail before minutes of generation.
    check_output_dir(args.output_dir)
    caption_set = None
    unreadable = {"caption_data": [], "reference_data": []}  # images left out because they can't be decoded
    if args.caption_data is not None:
        # Before the models load, so that a folder it can't read fails at once. Each image's label is its own
        # caption's place among the sample's distinct captions.
        caption_images, captions, rows, uncaptioned, unreadable["caption_data"] = read_caption_data(
            args.caption_data, caption_column=args.caption_column, caption_extension=args.caption_extension,
            caption_prefix=args.caption_prefix, caption_suffix=args.caption_suffix,
            from_filename=args.caption_from_filename, max_images=args.max_caption_images or None,
        )  # fmt: skip
        candidates = sorted(set(captions))
        labels = [candidates.index(caption) for caption in captions]
        caption_set = {"images": caption_images, "labels": labels, "candidates": candidates, "rows": rows}
        drawn = len(caption_images) + len(unreadable["caption_data"])
        sample = f"a sample of {drawn} of its {rows} captioned images" if rows > drawn else "all its images"
        print(
            f"Caption accuracy on {args.caption_data}: {sample}, each tried with {len(candidates)} captions"
            + (f" ({uncaptioned} images with no caption left out)" if uncaptioned else "")
        )
        say_unreadable(unreadable["caption_data"], args.caption_data)
    reference_images = None
    if args.reference_data is not None:
        reference_images, unreadable["reference_data"] = read_reference_images(args.reference_data)
        say_unreadable(unreadable["reference_data"], args.reference_data)
    clip_model, clip_processor = load_clip(args.clip_backend, args.clip_model)
    clip = (clip_model.to(device), clip_processor)
    reference = None
    if reference_images is not None:
        # The reference set's CLIP features, once for all the models.
        print(f"Encoding {len(reference_images)} reference images from {args.reference_data} ...")
        reference = image_features(reference_images, clip, device)

    results = []
    generator = None  # --doc_protocol: one generator for all the models, seeded once, as the page did
    # Each --lora is one more model: the first --model_path with that adapter loaded on top. A LoRA is scored at
    # each --lora_scale, as one model per scale.
    models = [(path, None) for path in args.model_path] + [(args.model_path[0], lora) for lora in args.lora]
    names = [path if lora is None else lora for path, lora in models]
    runs = []
    for (base, lora), label in zip(models, model_labels(names)):
        model_path = base if lora is None else f"{base} + LoRA {lora}"
        scales = args.lora_scale if lora is not None or is_lora(base) else [1.0]
        for scale in scales:
            if len(scales) > 1:
                runs.append((base, lora, scale, f"{label} @{scale:g}", f"{model_path} at {scale:g}"))
            else:
                runs.append((base, lora, scale, label, model_path))
    for number, (base, lora, scale, label, model_path) in enumerate(runs):
        pipeline = load_pipeline(base, device, dtype, config=args.model_config, lora=lora, lora_scale=scale)
        result = {"model_path": model_path, "label": label, "clip_skip": 1, "guidance_rescale": 0.0}
        if args.doc_protocol:
            if generator is None:
                generator = torch.manual_seed(0)
            print(f"Generating the page's 6 images with {model_path} ...")
            arrays = doc_protocol_images(pipeline, generator)
            result["doc_protocol_clip_score"] = doc_protocol_score(arrays, clip)
            images = [[Image.fromarray((array * 255).astype("uint8"))] for array in arrays]
        else:
            # Prompted as the model is meant to be: its clip skip, and the words of --embeddings_dir.
            layers = pipeline.text_encoder.config.num_hidden_layers
            result["clip_skip"], source = pick_clip_skip(args.clip_skip, base, lora, layers)
            if args.embeddings_dir is not None:
                _, skipped = load_embeddings(pipeline, args.embeddings_dir)
                for file_name, reason in skipped if number == 0 else []:
                    print(f"warning: --embeddings_dir: skipped {file_name}: {reason}")
            # Its guidance rescaled as it is meant to be sampled (a zero terminal SNR model's), unless told.
            rescale = args.guidance_rescale
            result["guidance_rescale"] = default_guidance_rescale(pipeline.scheduler) if rescale is None else rescale
            notes = [f"clip skip {result['clip_skip']}, {source}"] if result["clip_skip"] > 1 else []
            if result["guidance_rescale"] > 0:
                notes.append(f"guidance rescale {result['guidance_rescale']:g}")
            print(
                f"Generating {len(prompts) * len(args.seeds) * args.num_images_per_prompt} images with"
                f" {model_path}{''.join(f' ({note})' for note in notes)} ..."
            )
            images = generate_images(
                pipeline, prompts, negatives, args, result["clip_skip"], result["guidance_rescale"]
            )
        result["images"] = images
        if args.caption_data is not None:
            # The captions read as the model's run read them: for emphasis with --weighted_captions, or when the
            # run recorded that it did.
            result["weighted_captions"] = args.weighted_captions or any(
                recorded_weighted_captions(path) for path in (lora, base) if path
            )
            resolution = args.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
            hits = caption_hits(
                pipeline, caption_set["images"], caption_set["labels"], caption_set["candidates"],
                resolution=resolution, clip_skip=result["clip_skip"], weighted=result["weighted_captions"],
            )  # fmt: skip
            result["caption_hits"] = hits.int().tolist()
            result["caption_accuracy"] = hits.float().mean().item()
        del pipeline
        result["per_prompt"], result["overall"] = score_model(images, prompts, clip, device)
        if reference is not None:
            result["training_set"] = training_set_check(images, reference, clip, device, args.memorisation_threshold)
        results.append(result)

    # The page's generator was not reset between models, so its models did not start from the same noise:
    # its images are not paired, and no paired interval is given for them.
    comparisons = paired_comparisons(results, args) if len(results) >= 2 and not args.doc_protocol else []
    try:
        report, paths = write_reports(results, prompts, comparisons, caption_set, reference_images, unreadable, args)
    except OSError as err:
        raise UserError(f"could not write the reports to --output_dir {args.output_dir}: {first_line(err)}") from err
    print()
    print_table(report, prompts)
    if len(results) == 1:
        print(f"CLIP score: {round(results[0]['overall'], 4)}")
    else:
        for result in results:
            print(f"CLIP score ({result['model_path']}): {round(result['overall'], 4)}")
        diff = report["difference"]
        print(f"Difference ({diff['of']} - {diff['minus']}): {diff['clip_score']:+.4f}")
    for c in comparisons:
        low, high = c["ci95"]
        print(f"Paired ({c['model']} - {c['baseline']}, {c['units']} prompt-seed pairs): {c['mean_difference']:+.4f},"
              f" 95% interval {low:+.4f} to {high:+.4f}: {c['verdict']}")  # fmt: skip
    if args.doc_protocol:
        for result in results:
            print(f"Page protocol CLIP score ({result['model_path']}): {result['doc_protocol_clip_score']}")
    if reference is not None:
        print()
        for result in results:
            t = result["training_set"]
            print(f"Against {args.reference_data} ({result['label']}): Fréchet distance {t['frechet_distance']:.4f},"
                  f" kernel distance {t['kernel_distance']:.4f} ± {t['kernel_distance_std']:.4f},"
                  f" near-copies (similarity >= {args.memorisation_threshold}) {t['near_copies']:.1%}")  # fmt: skip
    if caption_set is not None:
        print()
        chance = 1 / len(caption_set["candidates"])
        for result in results:
            print(
                f"Caption accuracy on {args.caption_data} ({result['label']}): {result['caption_accuracy']:.4f}"
                f" ({sum(result['caption_hits'])} of {len(caption_set['labels'])} images; chance {chance:.4f})"
                + ("; captions read for emphasis" if result["weighted_captions"] else "")
            )
        for c in report["caption_comparisons"]:
            low, high = c["ci95"]
            print(f"Paired caption accuracy ({c['model']} - {c['baseline']}, {c['units']} images):"
                  f" {c['mean_difference']:+.4f}, 95% interval {low:+.4f} to {high:+.4f}: {c['verdict']}")  # fmt: skip
    print()
    for path in paths:
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    run_main(main)
