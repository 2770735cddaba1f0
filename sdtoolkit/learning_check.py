"""Did fine-tuning learn the captions? A diffusion classifier, and a two-class data set to ask it on.

A pipeline is used as a classifier (Li et al., 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", arXiv 2303.16203): each image's latents are noised at a few fixed timesteps with fixed noise,
the UNet predicts that noise under every candidate caption, and the caption with the lowest error is the
prediction. A model that ignores its captions picks at chance; one that learned them picks the right one.
No sampling and no CLIP model are involved, so it works on the toolkit's random-weight fixtures.

    caption_accuracy(pipeline, images, labels, candidates, resolution=32)   # share of images classified right
    caption_hits(pipeline, images, labels, candidates, resolution=32)       # which images, one bool each
    write_two_class_dataset(folder, per_class=8)   # red discs and blue squares, captioned by their class
    read_caption_data(folder, max_images=64)       # a training folder's images and captions, or a sample of them
    read_images(paths)                             # image files decoded as training decodes them
"""

import json
import math
import os
import random

import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset
from datasets import Image as ImageFeature
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from torchvision.transforms import functional as TF

from sdtoolkit.caption_folders import has_captioned_images, read_caption_folder
from sdtoolkit.clip_windows import caption_windows, emphasize, encode_text
from sdtoolkit.data import (
    affix_caption,
    has_metadata_file,
    saved_train_split,
    saved_with_save_to_disk,
    scan_images,
    to_rgb,
)
from sdtoolkit.dataset_config import read_dataset_config, read_folders
from sdtoolkit.errors import UserError, first_line

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


def read_caption_data(folder, *, caption_column="text", caption_extension=".txt", caption_prefix=None,
                      caption_suffix=None, from_filename=False, max_images=None, seed=0):  # fmt: skip
    """A training folder's images and captions, read as train_text_to_image.py reads the folder: an imagefolder
    (a metadata.jsonl, .csv or .parquet naming each image's file and caption, in `caption_column`), a dataset saved
    with save_to_disk (its train split's "image" and `caption_column`), or a caption-file folder (kohya-ss's layout: same-named `caption_extension` files, N_name folders; see caption_folders.py); or
    the folders of a kohya-ss dataset config file (.toml or .json; its regularization folders left out), read as
    --dataset_config reads them, with their subsets' caption_prefix and caption_suffix. `caption_prefix` and
    `caption_suffix` are the training run's flags: words put around every caption as training put them (a config's
    subsets' own win). from_filename: the run's --caption_from_filename (see caption_folders.py).

    Returns (images, captions, rows, uncaptioned, unreadable): with more than `max_images` captioned rows, a sample
    of them drawn with `seed` (the same whichever model is scored), in the folder's order. An image is captioned by
    its first caption when it has a list of them. Rows with no caption are left out (a classifier has nothing to
    pick for them); `rows` is the number of captioned rows and `uncaptioned` the number left out. Images that can't
    be decoded are left out too (training refuses them, or with --skip_invalid_images trains without them), named
    in `unreadable` as 'file (reason)'.
    """
    if os.path.isfile(folder) and folder.lower().endswith((".toml", ".json")):
        _, subsets = read_dataset_config(folder, caption_extension=caption_extension)
        dataset, _ = read_folders([subset for subset in subsets if not subset.is_reg], allow_missing_captions=True,
                                  caption_prefix=caption_prefix, caption_suffix=caption_suffix,
                                  from_filename=from_filename)  # fmt: skip
        caption_prefix = caption_suffix = None  # given to each subset that has none of its own
        caption_column = "text"
    elif not os.path.isdir(folder):
        raise UserError(f"--caption_data {folder} is not a folder or a kohya-ss dataset config (.toml, .json)")
    elif saved_with_save_to_disk(folder):
        dataset = saved_train_split(folder, "--caption_data")
    elif has_metadata_file(folder):
        try:
            dataset = load_dataset("imagefolder", data_files={"train": os.path.join(folder, "**")}, split="train")
        except Exception as err:  # datasets raises many types for a folder it can't read
            raise UserError(f"could not read --caption_data {folder}: {first_line(err)}") from err
    elif has_captioned_images(folder, caption_extension, from_filename=from_filename):
        dataset, _ = read_caption_folder(
            folder, caption_extension=caption_extension, allow_missing_captions=True, from_filename=from_filename
        )
        caption_column = "text"
    else:
        raise UserError(
            f"--caption_data {folder} has no metadata file (metadata.jsonl, .csv or .parquet) and no images with"
            f" {caption_extension} caption files (another extension: --caption_extension)"
        )
    if caption_column not in dataset.column_names:
        raise UserError(
            f"--caption_column '{caption_column}' is not a column of --caption_data {folder}; it has:"
            f" {', '.join(name for name in dataset.column_names if name != 'image')}"
        )
    captions = [first_caption(caption) for caption in dataset[caption_column]]
    captioned = [index for index, caption in enumerate(captions) if caption]
    captions = [affix_caption(caption, caption_prefix, caption_suffix) for caption in captions]
    if len(captioned) < 2:
        raise UserError(f"--caption_data {folder} needs at least 2 captioned images, found {len(captioned)}")
    chosen = captioned
    if max_images is not None and len(captioned) > max_images:
        chosen = sorted(random.Random(seed).sample(captioned, max_images))
    decoded, unreadable = decode_images(dataset.select(chosen))
    images = [image for image in decoded if image is not None]
    if len(images) < 2:
        raise UserError(f"--caption_data {folder}: fewer than 2 of its images can be read ({', '.join(unreadable)})")
    kept = [captions[index] for index, image in zip(chosen, decoded) if image is not None]
    return images, kept, len(captioned), len(captions) - len(captioned), unreadable


def read_images(paths):
    """Image files decoded as training decodes them, and the ones that can't be: (images, ['file (reason)'])."""
    decoded, unreadable = decode_images(Dataset.from_dict({"image": paths}).cast_column("image", ImageFeature()))
    return [image for image in decoded if image is not None], unreadable


def decode_images(dataset):
    """Each row's image as training sees it (EXIF orientation applied, 8-bit RGB, transparency on white), None
    for one that can't be decoded; and those, as 'file (reason)'."""
    bad, _, _, decoded, _ = scan_images(dataset, "image", prepare=to_rgb, keep_bytes=math.inf)
    return decoded, [f"{name} ({reason})" for _, name, reason in bad]


def first_caption(caption):
    """A metadata cell as one caption: a list's first, a number's digits, nothing for an empty cell."""
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else None
    return "" if caption is None else str(caption).strip()


@torch.no_grad()
def caption_errors(pipeline, images, candidates, *, resolution, timesteps=TIMESTEPS, seed=0, clip_skip=1,
                   weighted=False, batch_size=16):  # fmt: skip
    """[images, candidates] mean squared error of the UNet's noise prediction, summed over `timesteps`. The VAE and
    the UNet see `batch_size` images at a time (a few dozen images at 512 px at once would not fit a GPU).

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
    latents = torch.cat(
        [
            pipeline.vae.encode(chunk.to(device, dtype)).latent_dist.mean * pipeline.vae.config.scaling_factor
            for chunk in pixels.split(batch_size)
        ]
    )

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
            for start in range(0, len(images), batch_size):
                part = slice(start, start + batch_size)
                chunk = noisy[part]
                states = embeddings[c : c + 1].expand(len(chunk), -1, -1)
                prediction = pipeline.unet(chunk, step[part], states, return_dict=False)[0]
                error = F.mse_loss(prediction.float(), target[part].float(), reduction="none").mean(dim=(1, 2, 3))
                errors[part, c] += error.cpu()
    return errors


def caption_hits(pipeline, images, labels, candidates, **kwargs):
    """For each image, whether its own caption (candidates[label]) has the lowest noise-prediction error; kwargs
    are caption_errors'."""
    return caption_errors(pipeline, images, candidates, **kwargs).argmin(dim=1) == torch.tensor(labels)


def caption_accuracy(pipeline, images, labels, candidates, **kwargs):
    """The share of images whose own caption is picked (caption_hits); kwargs are caption_errors'."""
    return caption_hits(pipeline, images, labels, candidates, **kwargs).float().mean().item()
