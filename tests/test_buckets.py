"""Aspect-ratio buckets: each image trains at the bucket nearest its ratio, losing less than a step per side;
every batch holds one bucket; the batches of an epoch come from (seed, epoch), so resume stays bitwise."""

import logging
import math
import shutil
from types import SimpleNamespace

import datasets
import pytest
import torch

import train_text_to_image
from sdtoolkit.buckets import BucketBatchSampler, assign_buckets, make_buckets
from sdtoolkit.data import TrainingExamples
from sdtoolkit.errors import UserError
from tests.conftest import MIXED_SHAPES as SHAPES
from tests.conftest import (
    demo_image,
    example_args,
    launched_with,
    logged_losses,
    mixed_aspect_folder,
    train,
    train_args,
    unet_weights,
)

# The tiny pipeline's settings: 64 px, sides multiples of 16 (its UNet halves the 8x smaller latents once).
BUCKETS = ["--resolution", "64", "--aspect_buckets", "--bucket_step", "16", "--min_bucket_side", "32",
           "--max_bucket_side", "128"]  # fmt: skip


def test_buckets_are_about_resolution_squared_with_sides_multiples_of_the_step():
    buckets = make_buckets(resolution=512, step=64, min_side=256, max_side=1024)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(w * h > (512 - 64) ** 2 * 0.75 for w, h in buckets)  # none far below the pixel budget


def test_every_image_lands_in_the_nearest_bucket_and_loses_less_than_a_step_per_side():
    buckets = make_buckets(resolution=64, step=16, min_side=32, max_side=128)
    assigned, too_small = assign_buckets(SHAPES, buckets)
    assert too_small == [4]  # 20x20 is smaller than every bucket
    for (width, height), b in zip(SHAPES[:4], assigned):
        w, h = buckets[b]
        nearest = min(buckets, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(width / height)))
        assert (w, h) == nearest
        # Resized to cover the bucket, the image loses less than one step on each side.
        scale = max(w / width, h / height)
        assert (width * scale - w) / 2 < 16 and (height * scale - h) / 2 < 16
    # --bucket_no_upscale: only buckets inside the image, and the too-small image has none.
    no_upscale, _ = assign_buckets(SHAPES, buckets, no_upscale=True)
    assert no_upscale[4] is None
    assert all(buckets[b][0] <= w and buckets[b][1] <= h for (w, h), b in zip(SHAPES[:4], no_upscale[:4]))


def bucketed_examples(tiny_sd, center_crop):
    from transformers import CLIPTokenizer

    buckets = make_buckets(resolution=64, step=16, min_side=32, max_side=128)
    assigned, _ = assign_buckets(SHAPES, buckets)
    images = [demo_image(i).convert("RGB").resize(size) for i, size in enumerate(SHAPES)]
    rows = datasets.Dataset.from_dict({"image": images, "text": ["a creature"] * len(SHAPES)})
    args = example_args(resolution=64, center_crop=center_crop, random_flip=True, image_interpolation_mode="bilinear",
                        seed=0)  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    examples = TrainingExamples(
        rows, "image", "text", tokenizer, args, latent_shape=(4, 8, 8), num_train_timesteps=1000
    )
    examples.use_buckets([buckets[b] for b in assigned])
    return examples, [buckets[b] for b in assigned]


@pytest.mark.parametrize("center_crop", [True, False], ids=["center", "random"])
def test_examples_have_their_buckets_shape(tiny_sd, center_crop):
    examples, sizes = bucketed_examples(tiny_sd, center_crop)
    for i, (w, h) in enumerate(sizes):
        example = examples[i]
        assert example["pixel_values"].shape == (3, h, w)
        assert example["noise"].shape == (4, h // 8, w // 8)


def test_every_batch_holds_one_bucket_and_every_row_is_seen():
    rows_of_bucket = [[0, 3, 5], [1], [], [2, 4, 6, 7, 8]]
    bucket_of = {row: b for b, rows in enumerate(rows_of_bucket) for row in rows}
    examples = SimpleNamespace(epoch=0)
    sampler = BucketBatchSampler(rows_of_bucket, batch_size=2, seed=0, examples=examples)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 1 + 3
    assert all(len(batch) == 2 and len({bucket_of[row] for row in batch}) == 1 for batch in first)
    assert {row for batch in first for row in batch} == set(bucket_of)
    assert list(sampler) == first  # the same epoch: the same batches
    examples.epoch = 1
    assert list(sampler) != first  # another epoch: another order


def test_a_bucketed_run_trains_logs_its_buckets_and_notes_them(tiny_sd, tmp_path, caplog):
    data = mixed_aspect_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", *BUCKETS, "--max_train_steps", "3", "--random_flip", data=data)
    assert "Aspect-ratio buckets (width x height: images):" in caplog.text
    assert "2 images are smaller than every bucket and are enlarged to fit" in caplog.text
    assert "* Aspect-ratio buckets: " in (tmp_path / "out" / "README.md").read_text()
    assert [step for step, _ in logged_losses(tmp_path / "out")] == [1, 2, 3]


@pytest.mark.parametrize(
    "launch, warns",
    [(["--dynamo_use_dynamic"], False), ([], True), (None, False)],
    ids=["dynamic-shapes", "dynamic-shapes-off", "without-accelerate-launch"],
)
def test_compiling_several_buckets_with_dynamic_shapes_off_says_each_compiles_anew(tmp_path, monkeypatch, caplog,
                                                                                   launch, warns):  # fmt: skip
    # accelerate launch turns dynamic shapes off unless told --dynamo_use_dynamic; without its launcher, dynamo
    # decides (a second shape makes it compile for any size). The warning comes with the data, before the model
    # (missing here) loads.
    if launch is None:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    else:
        launched_with(monkeypatch, "--dynamo_backend=inductor", *launch)
    data = mixed_aspect_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="no-model"):
        train_text_to_image.main(train_args(tmp_path / "no-model", tmp_path / "out", *BUCKETS, data=data))
    warned = "4 aspect-ratio buckets and dynamic shapes off (accelerate launch without --dynamo_use_dynamic): every"
    assert (warned in caplog.text) == warns


def test_no_upscale_leaves_out_the_images_smaller_than_every_bucket(tiny_sd, tmp_path, caplog):
    data = mixed_aspect_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", *BUCKETS, "--bucket_no_upscale", "--max_train_steps", "1", data=data)
    assert "2 images are smaller than every bucket and are left out (--bucket_no_upscale)" in caplog.text
    assert "Num examples = 8" in caplog.text


def test_resume_with_buckets_is_bitwise_equal_to_an_uninterrupted_run(tiny_sd, tmp_path):
    data = mixed_aspect_folder(tmp_path / "data", copies=3)
    flags = [*BUCKETS, "--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-3",
             "--random_flip", "--use_ema"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_sd, whole, *flags, data=data)
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_sd, resumed, *flags, "--resume_from_checkpoint", "latest", data=data)
    a, b = unet_weights(whole / "unet"), unet_weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_latents_per_bucket_train_like_encoding_every_step(tiny_sd, tmp_path):
    data = mixed_aspect_folder(tmp_path / "data")
    flags = [*BUCKETS, "--max_train_steps", "3", "--center_crop", "--random_flip", "--learning_rate", "1e-3"]
    train(tiny_sd, tmp_path / "cached", *flags, data=data)
    train(tiny_sd, tmp_path / "online", *flags, "--no-cache_latents", data=data)
    for (_, a), (_, b) in zip(logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "online")):
        assert a == pytest.approx(b, rel=1e-5)


def test_bucket_flags_that_cannot_work_are_one_line():
    from sdtoolkit.errors import UserError

    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--aspect_buckets"]
    with pytest.raises(UserError, match="--bucket_step must be a multiple of 8"):
        train_text_to_image.parse_args(base + ["--bucket_step", "20"])
    with pytest.raises(UserError, match="must be positive and at most --max_bucket_side"):
        train_text_to_image.parse_args(base + ["--min_bucket_side", "512", "--max_bucket_side", "256"])
