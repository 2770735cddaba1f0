"""Did fine-tuning learn the captions? A diffusion classifier, and a two-class data set to ask it on.

A pipeline is used as a classifier (Li et al., 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", arXiv 2303.16203): each image's latents are noised at a few fixed timesteps with fixed noise,
the UNet predicts that noise under every candidate caption, and the caption with the lowest error is the
prediction. A model that ignores its captions picks at chance; one that learned them picks the right one.
No sampling and no CLIP model are involved, so it works on the toolkit's random-weight fixtures.

    caption_accuracy(pipeline, images, labels, candidates, resolution=32)   # share of images classified right
    write_two_class_dataset(folder, per_class=8)   # red discs and blue squares, captioned by their class
"""

import json
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from torchvision.transforms import functional as TF

from sdtoolkit.clip_windows import caption_windows, emphasize, encode_text

# The two classes of the learning check: visibly different, captioned by what they show.
TWO_CLASSES = ["a red disc on a white background", "a blue square on a white background"]

# Timesteps spread over the schedule: small ones test detail, large ones the overall layout and colour.
TIMESTEPS = (100, 300, 500, 700, 900)


def write_two_class_dataset(folder, *, per_class=8, size=64, seed=0):
    """An imagefolder of `per_class` red discs and blue squares of random size and place, captioned by class."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(2 * per_class):
        label = i % 2
        image = Image.new("RGB", (size, size), "white")
        side = int(torch.randint(size // 3, size // 2 + 1, (1,), generator=generator))
        left, top = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        box = (left, top, left + side, top + side)
        draw = ImageDraw.Draw(image)
        if label == 0:
            draw.ellipse(box, fill=(220, 30, 30))
        else:
            draw.rectangle(box, fill=(30, 60, 220))
        name = f"{i:03d}.png"
        image.save(os.path.join(folder, name))
        rows.append({"file_name": name, "text": TWO_CLASSES[label]})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def read_imagefolder(folder):
    """(images, captions) of an imagefolder with a metadata.jsonl, in its order."""
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Image.open(os.path.join(folder, row["file_name"])).convert("RGB") for row in rows], [
        row["text"] for row in rows
    ]


@torch.no_grad()
def caption_errors(pipeline, images, candidates, *, resolution, timesteps=TIMESTEPS, seed=0, clip_skip=1,
                   weighted=False):  # fmt: skip
    """[images, candidates] mean squared error of the UNet's noise prediction, summed over `timesteps`.

    Every image gets the same noise for every candidate, so the candidates are compared on equal terms. The
    captions are read from the text encoder's layer `clip_skip` from the end, and with `weighted` for emphasis
    (in their first window, see caption_windows), as the model was trained.
    """
    device, dtype = pipeline.device, pipeline.unet.dtype
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    # Latents: the VAE's posterior mean of each image, center-cropped to `resolution`, scaled as in training.
    pixels = torch.stack(
        [
            TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(im, resolution), resolution)), [0.5], [0.5])
            for im in images
        ]
    )
    latents = pipeline.vae.encode(pixels.to(device, dtype)).latent_dist.mean * pipeline.vae.config.scaling_factor

    if weighted:  # --weighted_captions: read as training read them
        read = [caption_windows(pipeline.tokenizer, candidate, 1, weighted=True) for candidate in candidates]
        ids = torch.stack([caption_ids[0] for caption_ids, _, _ in read])
        weights = torch.stack([caption_weights[0] for _, _, caption_weights in read])
        embeddings = emphasize(encode_text(pipeline.text_encoder, ids.to(device), clip_skip), weights.to(device))
    else:
        ids = pipeline.tokenizer(
            candidates, max_length=pipeline.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        embeddings = encode_text(pipeline.text_encoder, ids.to(device), clip_skip)  # (C, 77, dim)

    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(len(images), len(candidates))
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        step = torch.full((len(images),), t, dtype=torch.long, device=device)
        noisy = scheduler.add_noise(latents, noise, step)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, step)
        else:
            target = noise
        for c in range(len(candidates)):
            states = embeddings[c : c + 1].expand(len(images), -1, -1)
            prediction = pipeline.unet(noisy, step, states, return_dict=False)[0]
            errors[:, c] += F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).cpu()
    return errors


def caption_accuracy(pipeline, images, labels, candidates, *, resolution, timesteps=TIMESTEPS, seed=0, clip_skip=1,
                     weighted=False):  # fmt: skip
    """The share of images whose own caption (candidates[label]) has the lowest noise-prediction error."""
    errors = caption_errors(
        pipeline, images, candidates, resolution=resolution, timesteps=timesteps, seed=seed, clip_skip=clip_skip,
        weighted=weighted,
    )  # fmt: skip
    predictions = errors.argmin(dim=1)
    return (predictions == torch.tensor(labels)).float().mean().item()
