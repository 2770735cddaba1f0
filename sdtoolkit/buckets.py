"""Aspect-ratio buckets: train each image at the shape nearest its own, instead of a square crop.

A square center crop throws away the top and bottom of every portrait and the sides of every landscape.
With buckets (NovelAI's aspect-ratio bucketing, as kohya-ss/sd-scripts does it), the training shapes are
a set of (width, height) pairs of about resolution² pixels, sides multiples of `step`; each image goes to
the bucket nearest its aspect ratio, is resized to cover it and cropped by what is left over; and every
batch holds images of one bucket, so a batch is one tensor.

    buckets = make_buckets(resolution=512, step=64, min_side=256, max_side=1024)
    rows_of_bucket, too_small = assign_buckets(image_sizes, buckets, no_upscale=False)
    sampler = BucketBatchSampler(rows_of_bucket, batch_size=4, seed=0, examples=train_dataset)

The batches of an epoch are made from (seed, epoch) only, so a resumed run skips exactly the batches it had
already trained on, as without buckets.
"""

import math

import numpy as np
import torch
from torchvision.transforms import functional as TF


def make_buckets(*, resolution, step, min_side, max_side):
    """(width, height) pairs with sides multiples of `step` in [min_side, max_side] and at most resolution²
    pixels: for each width, the tallest height that fits. Sorted by aspect ratio."""
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = (resolution * resolution // width) // step * step
        if min_side <= height <= max_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda size: size[0] / size[1])


def assign_buckets(sizes, buckets, *, no_upscale=False):
    """The bucket of each image (width, height): the one nearest its aspect ratio (in log scale).

    With no_upscale, only buckets that fit inside the image are candidates, so no image is enlarged; an image
    smaller than every bucket gets None. Without it, such images are enlarged into their nearest bucket.
    Returns (bucket index per row or None, rows smaller than the smallest bucket).
    """
    log_ratios = np.log([w / h for w, h in buckets])
    assigned, too_small = [], []
    for row, (width, height) in enumerate(sizes):
        candidates = [i for i, (w, h) in enumerate(buckets) if not no_upscale or (w <= width and h <= height)]
        if not any(w <= width and h <= height for w, h in buckets):
            too_small.append(row)
        if not candidates:
            assigned.append(None)
            continue
        distances = np.abs(log_ratios[candidates] - math.log(width / height))
        assigned.append(candidates[int(np.argmin(distances))])
    return assigned, too_small


def cover_and_crop(image, size, interpolation, *, center, generator=None):
    """Resize a PIL image to cover size (width, height) keeping its aspect ratio, then crop it to size: from
    the center, or at a place drawn from `generator` (top, then left, as the square crop draws)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(height, math.ceil(image.height * scale)), max(width, math.ceil(image.width * scale)))
    image = TF.resize(image, list(resized), interpolation=interpolation)
    if center:
        return TF.center_crop(image, [height, width])
    top = int(torch.randint(0, image.height - height + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.width - width + 1, (1,), generator=generator))
    return TF.crop(image, top, left, height, width)


class BucketBatchSampler:
    """Batches of one bucket each. Per epoch, from (seed, epoch) only: each bucket's rows are shuffled and cut
    into batches (the last one filled up with the bucket's first rows, so every batch is full and every row is
    seen), then the batches of all buckets are shuffled together. Reads the epoch from `examples.epoch`."""

    def __init__(self, rows_of_bucket, *, batch_size, seed, examples):
        self.rows_of_bucket = [rows for rows in rows_of_bucket if rows]
        self.batch_size = batch_size
        self.drop_last = False
        self.seed = seed
        self.examples = examples

    def __len__(self):
        return sum(math.ceil(len(rows) / self.batch_size) for rows in self.rows_of_bucket)

    def __iter__(self):
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.examples.epoch, 2**31]).generate_state(1)[0])
        )
        batches = []
        for rows in self.rows_of_bucket:
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            padded = order + order[: (-len(order)) % self.batch_size]
            while len(padded) % self.batch_size:  # a bucket smaller than half a batch
                padded += order[: self.batch_size - len(padded) % self.batch_size]
            batches += [padded[i : i + self.batch_size] for i in range(0, len(padded), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]
