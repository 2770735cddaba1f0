"""The --cache_latents cache: every row's VAE latent distribution and caption embeddings, encoded once.

The VAE and text encoder are frozen, so they give the same output for the same input at every step. With
center crops the input is the same every epoch, so the script encodes each image (and, with --random_flip,
its mirror image) and each caption once before training, and frees the encoders. The cache holds the mean
and std of each latent distribution, not a sample: every step still draws its own sample, as the uncached
path does, so a cached run trains on the same draws as an uncached one.

The cache lives in RAM, or on disk as .npy files that every process maps into memory: when asked
(--latent_cache_dir), or when it would take more than half of the free memory (about 0.26 MB per 512 px
image with flips, 26 GB for 100k images). A disk cache is keyed by everything its contents depend on -- the
VAE's and text encoder's weights, the training shapes, flips, interpolation, dtype and the data's
fingerprint -- so a second run on the same data and model opens it instead of encoding again.

    arrays = DiskArrays(os.path.join(folder, key)) if on_disk else MemoryArrays()
    latents, text = encode_cache(examples, vae, text_encoder, device, dtype, arrays=arrays)
    examples.use_cache(latents, text)
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from sdtoolkit.buckets import cover_and_crop
from sdtoolkit.clip_windows import caption_windows, emphasize, encode_text, encode_windows, read_caption
from sdtoolkit.data import alpha_channel, latent_mask, square_crop, to_rgb
from sdtoolkit.errors import UserError

# Bump when what the files hold changes, so that a cache written by an older version is not read as new.
FORMAT = 1

# Where a cache too big for memory goes when --latent_cache_dir is not given.
DEFAULT_DISK_FOLDER = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdtoolkit")

# numpy has no bfloat16: its bits are stored as int16.
STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def cache_crop(image, size, interpolation, keep_alpha=False):
    """The image as the uncached path makes it with a center crop, before the flip: an RGB PIL image. With
    keep_alpha (--masked_loss) and an image that has transparency, RGBA: the same RGB, with the alpha channel
    cropped alike as A (see crop_alpha).

    size: the square's side, or a bucket's (width, height).
    """
    crop = cover_and_crop if isinstance(size, tuple) else square_crop
    rgb = crop(to_rgb(image), size, interpolation, center=True)
    alpha = alpha_channel(image) if keep_alpha else None
    if alpha is None:
        return rgb
    return Image.merge("RGBA", (*rgb.split(), crop(alpha, size, interpolation, center=True)))


def crop_pixels(crop, flip):
    """A cache crop as the VAE takes it: maybe mirrored, 3 x height x width in [-1, 1]."""
    if flip:
        crop = TF.hflip(crop)
    return TF.normalize(TF.to_tensor(crop.convert("RGB")), [0.5], [0.5])  # an RGBA crop's alpha is dropped


def crop_alpha(crop, flip):
    """A cache crop's alpha channel, maybe mirrored, or None when it has none."""
    if crop.mode != "RGBA":
        return None
    return TF.hflip(crop.getchannel("A")) if flip else crop.getchannel("A")


class CachedLatents:
    """Each row's latent (mean, std), [orientations, C, h, w] each, from one array per training shape; with
    --masked_loss, its loss mask too ([orientations, 1, h, w], see latent_mask)."""

    def __init__(self, means, stds, where, masks=None):
        self.means, self.stds, self.where = means, stds, where  # where[row] = (shape's array, position in it)
        self.masks = masks

    def __getitem__(self, row):
        array, position = self.where[row]
        return self.means[array][position], self.stds[array][position]

    def loss_mask(self, row):
        array, position = self.where[row]
        return self.masks[array][position]


class MemoryArrays:
    """The cache's arrays in RAM."""

    folder = None

    def exists(self):
        return False

    def new(self, name, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def finish(self):
        pass

    def abandon(self):
        pass


class DiskArrays:
    """The cache's arrays as .npy files in `folder`, mapped into memory.

    They are written into a folder of their own beside it and renamed to `folder` when complete, so a cache
    folder that exists is whole; a later run (or another process) maps it copy-on-write, never writing to it.
    """

    def __init__(self, folder):
        self.folder = folder
        self.partial = f"{folder}.partial-{os.getpid()}"
        self.written = []

    def exists(self):
        return os.path.isdir(self.folder)

    def new(self, name, shape, dtype):
        os.makedirs(self.partial, exist_ok=True)
        path = os.path.join(self.partial, f"{name}.npy")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=STORAGE[dtype], shape=tuple(shape))
        self.written.append(array)
        return torch.from_numpy(array).view(dtype)

    def open(self, name, shape, dtype):
        path = os.path.join(self.folder, f"{name}.npy")
        try:
            array = np.load(path, mmap_mode="c")
        except (OSError, ValueError) as err:
            raise UserError(f"the latent cache {self.folder} can't be read ({err}); delete that folder") from err
        if array.shape != tuple(shape) or array.dtype != STORAGE[dtype]:
            raise UserError(
                f"the latent cache {path} holds {array.dtype} {array.shape}, not the {tuple(shape)} this run needs;"
                " delete that folder"
            )
        return torch.from_numpy(array).view(dtype)

    def finish(self):
        for array in self.written:
            array.flush()
        self.written = []
        try:
            os.rename(self.partial, self.folder)
        except OSError:  # another run wrote the same cache first, and it holds the same numbers
            shutil.rmtree(self.partial, ignore_errors=True)

    def abandon(self):
        self.written = []
        shutil.rmtree(self.partial, ignore_errors=True)


def cache_bytes(examples, *, text_dim, dtype, latents=True, text=True):
    """How many bytes the cache of `examples` takes: one entry per image, however often it repeats."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    if latents:
        orientations = 2 if examples.random_flip else 1
        total += sum(
            2 * orientations * int(np.prod(examples.latent_shape_of(row))) for row in range(len(examples.dataset))
        )
    if text:
        captions = examples.dataset[examples.caption_column]
        count = sum(1 if isinstance(caption, str) else len(caption) for caption in captions)
        total += (count + 1) * examples.tokenizer.model_max_length * examples.windows * text_dim
    return total * itemsize


def cache_key(examples, vae, text_encoder, *, data_fingerprint, dtype, latents=True, text=True):
    """A hex digest of everything the cache's contents depend on."""
    key = hashlib.sha256()
    for model in [vae] * latents + [text_encoder] * text:
        for name, tensor in sorted(model.state_dict().items()):
            key.update(name.encode())
            key.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy())
    settings = {
        "format": FORMAT,
        "latents": latents,
        "text": text,
        "data": data_fingerprint,
        "rows": len(examples.dataset),
        "sizes": examples.bucket_sizes or examples.resolution,
        "flip": examples.random_flip,
        "interpolation": str(examples.interpolation),
        "dtype": str(dtype),
        "max_length": examples.tokenizer.model_max_length,
    }
    if examples.masked_loss and latents:  # the cache holds loss masks too (a key that caches without them lack)
        settings["masked_loss"] = True
    if examples.clip_skip > 1 and text:  # another layer's output (keys without --clip_skip stay as they were)
        settings["clip_skip"] = examples.clip_skip
    if examples.windows > 1 and text:  # captions in several windows (keys of one-window caches stay as they were)
        # Named with how windows are cut: caches written when a full window was cut before the next token came (a
        # caption of exactly 75 tokens then had two windows) are not read as this layout.
        settings["windows"] = f"{examples.windows}, cut when the next token comes"
    if examples.weighted_captions and text:  # captions read for emphasis (keys of literal captions stay as they were)
        settings["weighted_captions"] = True
    key.update(json.dumps(settings, sort_keys=True).encode())
    return key.hexdigest()[:32]


@torch.no_grad()
def encode_cache(examples, vae, text_encoder, device, dtype, *, arrays=None, crops=None, batch_size=8, latents=True,
                 text=True):  # fmt: skip
    """Encode every row (image) once with the frozen VAE and text encoder, on `device` in `dtype`, into `arrays`
    (MemoryArrays by default); when `arrays` already exists on disk, open it instead of encoding.

    Latents: the mean and std of the VAE's latent distribution of each row's center crop, and of its mirror
    image with --random_flip (and with --masked_loss each one's loss mask). Text: the text encoder's output for every caption of every row, and for the
    empty caption (for caption dropout). crops: each row's `cache_crop`, when the pre-training check kept
    them. Returns (latents, text) in the form TrainingExamples.use_cache takes; either is None when not asked.
    """
    arrays = arrays or MemoryArrays()
    reuse = arrays.exists()
    dataset, rows = examples.dataset, len(examples.dataset)
    latent_cache = text_cache = None
    try:
        if latents:
            orientations = [False, True] if examples.random_flip else [False]
            # One array per training shape: all rows, or with buckets the rows of each bucket.
            sizes = examples.bucket_sizes or [examples.resolution] * rows
            groups = {}
            for row, size in enumerate(sizes):
                groups.setdefault(size, []).append(row)
            where, means, stds, masks = [None] * rows, [], [], [] if examples.masked_loss else None
            for index, (size, group) in enumerate(groups.items()):
                for position, row in enumerate(group):
                    where[row] = (index, position)
                latent_shape = examples.latent_shape_of(group[0])
                shape = (len(group), len(orientations), *latent_shape)
                mask_shape = (len(group), len(orientations), 1, *latent_shape[1:])
                if reuse:
                    means.append(arrays.open(f"latent-mean-{index}", shape, dtype))
                    stds.append(arrays.open(f"latent-std-{index}", shape, dtype))
                    if masks is not None:
                        masks.append(arrays.open(f"loss-mask-{index}", mask_shape, dtype))
                    continue
                mean, std = (
                    arrays.new(f"latent-mean-{index}", shape, dtype),
                    arrays.new(f"latent-std-{index}", shape, dtype),
                )
                mask = arrays.new(f"loss-mask-{index}", mask_shape, dtype) if masks is not None else None
                for start in range(0, len(group), batch_size):
                    batch_rows = group[start : start + batch_size]
                    if crops is not None:  # made by the pre-training check (see scan_images)
                        batch = [crops[row] for row in batch_rows]
                    else:
                        images = dataset.select(batch_rows)[examples.image_column]
                        batch = [
                            cache_crop(image, size, examples.interpolation, examples.masked_loss) for image in images
                        ]
                    for orientation, flip in enumerate(orientations):
                        pixels = torch.stack([crop_pixels(crop, flip) for crop in batch])
                        dist = vae.encode(pixels.to(device, dtype=dtype)).latent_dist
                        mean[start : start + len(batch_rows), orientation] = dist.mean.cpu()
                        std[start : start + len(batch_rows), orientation] = dist.std.cpu()
                        if mask is not None:
                            mask[start : start + len(batch_rows), orientation] = torch.stack(
                                [latent_mask(crop_alpha(crop, flip), latent_shape) for crop in batch]
                            )
                means.append(mean)
                stds.append(std)
                if masks is not None:
                    masks.append(mask)
            latent_cache = CachedLatents(means, stds, where, masks)

        if text:
            captions, first, count, is_list = [], [], [], []
            for caption in dataset[examples.caption_column]:
                options = [caption] if isinstance(caption, str) else list(caption)
                first.append(len(captions))
                count.append(len(options))
                is_list.append(not isinstance(caption, str))
                captions.extend(options)
            tokenizer, windows, weighted = examples.tokenizer, examples.windows, examples.weighted_captions
            shape = (len(captions), tokenizer.model_max_length * windows, text_encoder.config.hidden_size)
            # With windows: how many are each caption's own, for its mask (the others are empty windows).
            own = [] if windows > 1 else None
            if reuse:
                embeddings, empty = arrays.open("text", shape, dtype), arrays.open("text-empty", shape[1:], dtype)
                if own is not None:
                    own = [min(len(read_caption(tokenizer, caption, weighted)), windows) for caption in captions]
            else:
                embeddings, empty = arrays.new("text", shape, dtype), arrays.new("text-empty", shape[1:], dtype)
                for start in range(0, len(captions), batch_size):
                    batch = captions[start : start + batch_size]
                    if windows > 1 or weighted:  # each caption in its windows (see sdtoolkit/clip_windows.py)
                        read = [caption_windows(tokenizer, caption, windows, weighted) for caption in batch]
                        if own is not None:
                            own += [int(mask.sum()) for _, mask, _ in read]
                        ids = torch.stack([caption_ids for caption_ids, _, _ in read])
                        encoded = encode_windows(text_encoder, ids.to(device), examples.clip_skip)
                        if weighted:  # --weighted_captions: the emphasis applied once, here (see emphasize)
                            encoded = emphasize(encoded, torch.stack([weights for _, _, weights in read]).to(device))
                    else:
                        ids = tokenizer(
                            batch, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt",
                        ).input_ids  # fmt: skip
                        encoded = encode_text(text_encoder, ids.to(device), examples.clip_skip)
                    embeddings[start : start + len(batch)] = encoded.cpu()
                # The empty caption too, for caption dropout.
                if windows > 1:
                    ids = caption_windows(tokenizer, "", windows)[0][None]
                    empty[:] = encode_windows(text_encoder, ids.to(device), examples.clip_skip).cpu()[0]
                else:
                    ids = tokenizer(
                        "", max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt"
                    ).input_ids
                    empty[:] = encode_text(text_encoder, ids.to(device), examples.clip_skip).cpu()[0]
            text_cache = (embeddings, first, count, is_list, empty, own)
    except BaseException:
        arrays.abandon()
        raise
    if not reuse:
        arrays.finish()
    return latent_cache, text_cache
