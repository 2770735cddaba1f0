"""--masked_loss: the loss weighed by each image's opacity, its mask cropped and flipped with the image, cached alike."""

import logging
from pathlib import Path

import datasets
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from sdtoolkit.data import TrainingExamples
from sdtoolkit.latent_cache import encode_cache
from tests.conftest import DEMO_DATA, cutout, cutout_folder, example_args, logged_losses, train, unet_weights


def opacity_seen(pixel_values, latent_shape):
    """What the mask should be for an example: opaque pixels are black and transparent ones white in its pixels,
    so the opacity is (1 - pixel) / 2, averaged over each latent pixel's block."""
    opacity = ((1 - pixel_values[:1]) / 2)[None]
    return torch.nn.functional.interpolate(opacity, size=latent_shape[1:], mode="area")[0]


def examples_of(tiny_sd, images, **flags):
    rows = datasets.Dataset.from_dict({"image": images, "text": ["a creature"] * len(images)})
    settings = dict(resolution=32, center_crop=False, random_flip=True, image_interpolation_mode="lanczos", seed=0,
                    masked_loss=True)  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    return TrainingExamples(
        rows, "image", "text", tokenizer, example_args(**{**settings, **flags}), latent_shape=(4, 4, 4),
        num_train_timesteps=1000,
    )  # fmt: skip


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
@pytest.mark.parametrize("center_crop", [False, True], ids=["random-crop", "center-crop"])
def test_the_mask_is_cropped_and_flipped_with_its_image(tiny_sd, buckets, center_crop):
    images = [cutout(48, 32, seed=0), cutout(32, 56, seed=1), cutout(40, 40, seed=2)]
    examples = examples_of(tiny_sd, images, center_crop=center_crop)
    if buckets:
        examples.use_buckets([(48, 32), (32, 48), (32, 32)])
    masks = []
    for epoch in range(4):
        examples.epoch = epoch
        for i in range(len(images)):
            example = examples[i]
            latent_shape = example["noise"].shape
            assert example["loss_mask"].shape == (1, *latent_shape[1:])
            assert torch.allclose(example["loss_mask"], opacity_seen(example["pixel_values"], latent_shape), atol=0.01)
            masks.append(example["loss_mask"])
    assert any(mask.min() < 0.1 for mask in masks) and any(mask.max() > 0.9 for mask in masks)
    # Flips (and random crops) change where the opaque part is.
    assert len({tuple(mask.flatten().tolist()) for mask in masks[::3]}) > 1


def test_cached_masks_are_the_masks_of_the_uncached_images(tiny_sd):
    images = [cutout(48, 32, seed=0), cutout(32, 56, seed=1), Image.open(DEMO_DATA / "0000.png")]
    uncached = examples_of(tiny_sd, images, center_crop=True)
    cached = examples_of(tiny_sd, images, center_crop=True)
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    latents, _ = encode_cache(cached, vae, text_encoder, torch.device("cpu"), torch.float32, text=False)
    cached.use_cache(latents, None)
    for epoch in range(3):
        uncached.epoch = cached.epoch = epoch
        for i in range(len(images)):
            assert "pixel_values" not in cached[i]
            assert torch.allclose(cached[i]["loss_mask"], uncached[i]["loss_mask"], atol=1e-6)
    assert torch.equal(cached[2]["loss_mask"], torch.ones(1, 4, 4))  # an image without alpha counts everywhere


def test_transparent_images_teach_nothing(tiny_sd, tmp_path):
    # Nor do they count in the held-out loss, which weighs its images' errors as training does.
    data = cutout_folder(tmp_path / "data", opaque=False)
    flags = ["--max_train_steps", "2", "--adam_weight_decay", "0", "--learning_rate", "1e-3", "--validation_split",
             "0.25"]  # fmt: skip
    train(tiny_sd, tmp_path / "masked", *flags, "--masked_loss", data=data)
    assert [loss for _, loss in logged_losses(tmp_path / "masked")] == [0.0, 0.0]
    assert [loss for _, loss in logged_losses(tmp_path / "masked", "validation_loss")] == [0.0, 0.0]
    base, trained = unet_weights(Path(tiny_sd) / "unet"), unet_weights(tmp_path / "masked" / "unet")
    assert all(torch.equal(base[k], trained[k]) for k in base)
    # Without the mask the white they are laid on is learned.
    train(tiny_sd, tmp_path / "whole", *flags, data=data)
    assert all(loss > 0.1 for _, loss in logged_losses(tmp_path / "whole"))
    assert all(loss > 0.1 for _, loss in logged_losses(tmp_path / "whole", "validation_loss"))


def test_a_cached_masked_run_trains_as_an_uncached_one(tiny_sd, tmp_path):
    data = cutout_folder(tmp_path / "data")
    flags = ["--max_train_steps", "3", "--center_crop", "--random_flip"]
    # A cache on disk from a run without the mask is not the masked run's: that one writes its own, with masks.
    on_disk = ["--latent_cache_dir", str(tmp_path / "cache")]
    train(tiny_sd, tmp_path / "whole", *flags, *on_disk, data=data)
    train(tiny_sd, tmp_path / "cached", *flags, *on_disk, "--masked_loss", data=data)
    train(tiny_sd, tmp_path / "online", *flags, "--masked_loss", "--no-cache_latents", data=data)
    cached, online = logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "online")
    assert [loss for _, loss in cached] == pytest.approx([loss for _, loss in online], rel=1e-5)
    # The same draws without the mask give other losses.
    assert all(a != pytest.approx(b, rel=1e-3) for (_, a), (_, b) in zip(cached, logged_losses(tmp_path / "whole")))
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_masked_loss_on_images_without_alpha_says_so(tiny_sd, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path / "out", "--masked_loss", "--max_train_steps", "1", data=DEMO_DATA)
    assert "--masked_loss: no image has an alpha channel, so every image is learned whole" in caplog.text
