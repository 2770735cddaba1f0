#!/usr/bin/env python
"""CLIP score of Stable Diffusion pipelines on a set of prompts, side by side, with the pictures behind it.

The score is torchmetrics' `clip_score` (https://arxiv.org/abs/2104.08718): for each image, 100 times the
cosine between its CLIP image embedding and its prompt's CLIP text embedding; the model's score is the mean
over all images, floored at 0. With no arguments this scores `sd-pokemon-model` on the seed's six prompts
with `openai/clip-vit-base-patch16`:

    python metrics.py
    python metrics.py --model_path CompVis/stable-diffusion-v1-4 sd-pokemon-model --seeds 0 1 2 3

Every model sees the same seeds, so the same starting noise. Per prompt it reports the mean and standard
deviation over seeds and images; it writes scores.json, scores.csv and one image grid per model (rows are
prompts, columns seeds x images) to --output_dir.
"""

import argparse
import csv
import json
import os
import re
import statistics
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.utils import make_image_grid
from torchmetrics.functional.multimodal import clip_score
from torchvision.transforms.functional import to_pil_image

from sdtoolkit.errors import UserError, first_line, run_main
from sdtoolkit.inference import add_device_arguments, add_model_config_argument, load_pipeline, pick_device_and_dtype
from sdtoolkit.learning_check import caption_accuracy, read_imagefolder
from sdtoolkit.output_dir import check_output_dir

# The seed's validation prompts.
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A high tech solarpunk utopia in the Amazon rainforest",
    "A pikachu fine dining with a view to the Eiffel Tower",
    "A mecha robot in a favela in expressionist style",
    "an insect robot preparing a delicious meal",
    "A small cabin on top of a snowy mountain in the style of Disney, artstation",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CLIP score of Stable Diffusion pipelines on a set of prompts.")
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
        "--prompts_file", default=None, help="A text file with one prompt a line (default: the seed's six)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds; every model uses the same ones.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
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
            " pytorch_lora_weights.safetensors, or a .safetensors file in diffusers' or kohya keys)."
        ),
    )
    add_model_config_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--output_dir", default="clip-scores", help="Where scores.json, scores.csv and grids go.")
    parser.add_argument(
        "--caption_data",
        default=None,
        help=(
            "An imagefolder (images and a metadata.jsonl with file_name, text), e.g. the training data: also report"
            " each model's caption accuracy on it, the share of its images whose own caption the model picks among"
            " all the folder's captions when used as a diffusion classifier (see sdtoolkit/learning_check.py)."
        ),
    )
    args = parser.parse_args(argv)

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


def load_prompts(prompts_file):
    if prompts_file is None:
        return list(PROMPTS)
    if not os.path.isfile(prompts_file):
        raise UserError(f"--prompts_file {prompts_file} does not exist")
    with open(prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts_file {prompts_file} has no prompts (one prompt a line; # starts a comment)")
    return prompts


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


def generate_images(pipeline, prompts, args):
    """images[p][j]: image j of prompt p, j running over seeds, then images per seed.

    Image k of (prompt, seed) comes from a generator seeded with the seed, drawing in order, so the noise a
    picture starts from does not depend on --batch_size or on which model is scored.
    """
    device = pipeline.device
    images = [[] for _ in prompts]
    generator_device = "cpu" if device.type == "mps" else device
    for seed in args.seeds:
        for start in range(0, len(prompts), args.batch_size):
            batch = list(range(start, min(start + args.batch_size, len(prompts))))
            generators = []
            for _ in batch:
                generator = torch.Generator(generator_device).manual_seed(seed)
                generators += [generator] * args.num_images_per_prompt
            with torch.inference_mode():
                output = pipeline(
                    [prompts[p] for p in batch],
                    num_images_per_prompt=args.num_images_per_prompt,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generators,
                )
            for i, p in enumerate(batch):
                n = args.num_images_per_prompt
                images[p] += output.images[i * n : (i + 1) * n]
    return images


def to_tensor(image):
    """A PIL image as the uint8 (3, H, W) tensor torchmetrics takes."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def score_model(images, prompts, clip, device):
    """Per-image torchmetrics scores grouped by prompt, and torchmetrics' score over all the images."""
    clip_model, clip_processor = clip

    def loader():
        return clip_model, clip_processor

    per_prompt = []
    all_images, all_texts = [], []
    for prompt, prompt_images in zip(prompts, images):
        tensors = [to_tensor(image).to(device) for image in prompt_images]
        with torch.no_grad():
            per_prompt.append([clip_score(t, prompt, model_name_or_path=loader).item() for t in tensors])
        all_images += tensors
        all_texts += [prompt] * len(tensors)
    with torch.no_grad():
        overall = clip_score(all_images, all_texts, model_name_or_path=loader).item()
    return per_prompt, overall


def write_reports(results, prompts, args):
    """scores.json, scores.csv and one grid PNG per model in args.output_dir; returns the paths written."""
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {
        "caption_data": args.caption_data,
        "clip_backend": args.clip_backend,
        "clip_model": args.clip_model,
        "seeds": args.seeds,
        "num_images_per_prompt": args.num_images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
    }
    report = {"settings": settings, "prompts": prompts, "models": []}
    for result in results:
        report["models"].append(
            {
                "model_path": result["model_path"],
                "clip_score": result["overall"],
                "label": result["label"],
                "caption_accuracy": result.get("caption_accuracy"),
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

    for result in results:
        grid_path = os.path.join(args.output_dir, f"grid-{file_label(result['label'])}.png")
        columns = len(result["images"][0])
        flat = [image for row in result["images"] for image in row]
        make_image_grid(flat, rows=len(prompts), cols=columns).save(grid_path)
        paths.append(grid_path)
    return report, paths


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


def main(argv=None):
    args = parse_args(argv)
    prompts = load_prompts(args.prompts_file)
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    # Check where the reports go and load the CLIP model first: both should fail before minutes of generation.
    check_output_dir(args.output_dir)
    if args.caption_data is not None and not os.path.isfile(os.path.join(args.caption_data, "metadata.jsonl")):
        raise UserError(
            f"--caption_data {args.caption_data} must be a folder of images with a metadata.jsonl (file_name, text)"
        )
    clip = load_clip(args.clip_backend, args.clip_model)
    if args.caption_data is not None:
        caption_images, captions = read_imagefolder(args.caption_data)
        candidates = sorted(set(captions))
        labels = [candidates.index(caption) for caption in captions]

    results = []
    # Each --lora is one more model: the first --model_path with that adapter loaded on top.
    models = [(path, None) for path in args.model_path] + [(args.model_path[0], lora) for lora in args.lora]
    names = [path if lora is None else lora for path, lora in models]
    for (base, lora), label in zip(models, model_labels(names)):
        pipeline = load_pipeline(base, device, dtype, config=args.model_config, lora=lora)
        model_path = base if lora is None else f"{base} + LoRA {lora}"
        print(f"Generating {len(prompts) * len(args.seeds) * args.num_images_per_prompt} images with {model_path} ...")
        images = generate_images(pipeline, prompts, args)
        result = {"model_path": model_path, "label": label, "images": images}
        if args.caption_data is not None:
            resolution = args.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
            result["caption_accuracy"] = caption_accuracy(
                pipeline, caption_images, labels, candidates, resolution=resolution
            )
        del pipeline
        result["per_prompt"], result["overall"] = score_model(images, prompts, clip, device)
        results.append(result)

    try:
        report, paths = write_reports(results, prompts, args)
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
    if args.caption_data is not None:
        print()
        chance = 1 / len(candidates)
        for result in results:
            right = round(result["caption_accuracy"] * len(labels))
            print(
                f"Caption accuracy on {args.caption_data} ({result['label']}): {result['caption_accuracy']:.4f}"
                f" ({right} of {len(labels)} images; chance {chance:.4f})"
            )
    print()
    for path in paths:
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    run_main(main)
