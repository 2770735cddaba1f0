"""The speed and memory options: cached latents and text embeddings, fused AdamW, in-place EMA, 8-bit AdamW."""

import gc
import importlib.util
import logging
import weakref

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

import train_text_to_image
from sdtoolkit.ema import InPlaceEMAModel
from tests.conftest import DEMO_DATA, demo_image, image_folder, logged_losses, train
from tests.conftest import relative_difference_of_updates as relative_update


def caption_list_folder(tmp_path):
    rows = [(f"{i}.png", demo_image(i), [f"creature number {i}", f"a drawing of creature {i}"]) for i in range(8)]
    return image_folder(tmp_path / "data", rows)


def test_training_on_the_cache_gives_the_same_losses_as_encoding_every_step(tiny_sd, tmp_path):
    # Center crops, random flips and lists of captions: both orientations and every caption are cached, and
    # each step draws the same flip, caption, latent sample, noise and timestep with or without the cache.
    data = caption_list_folder(tmp_path)
    flags = ["--max_train_steps", "4", "--center_crop", "--random_flip", "--learning_rate", "1e-3"]
    train(tiny_sd, tmp_path / "cached", *flags, data=data)
    train(tiny_sd, tmp_path / "online", *flags, "--no-cache_latents", data=data)
    cached, online = logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "online")
    assert [s for s, _ in cached] == [s for s, _ in online] == [1, 2, 3, 4]
    # The VAE encodes a batch of 8 when caching and of 2 per step when not: float sums in another order.
    for (_, a), (_, b) in zip(cached, online):
        assert a == pytest.approx(b, rel=1e-5)
    # Adam turns float noise in near-zero gradients into +-lr steps, so compare the updates as a whole (another
    # seed is over 50% apart, see test_distributed.py).
    base = tiny_sd + "/unet"
    assert relative_update(base, tmp_path / "cached" / "unet", tmp_path / "online" / "unet") < 0.01


def test_vae_batch_size_is_how_many_images_the_vae_encodes_at_once(tiny_sd, tmp_path, monkeypatch):
    # kohya-ss's flag: 5 images, each also flipped, in batches of 3 (and the captions the same way).
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    encode, text_forward, images, captions = AutoencoderKL.encode, CLIPTextModel.forward, [], []

    def encode_counted(self, x, *args, **kwargs):
        images.append(len(x))
        return encode(self, x, *args, **kwargs)

    def text_counted(self, input_ids=None, *args, **kwargs):
        captions.append(len(input_ids))
        return text_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode_counted)
    monkeypatch.setattr(CLIPTextModel, "forward", text_counted)
    data = image_folder(tmp_path / "data", [(f"{i}.png", demo_image(i), f"creature {i}") for i in range(5)])
    flags = ["--max_train_steps", "1", "--center_crop", "--random_flip"]
    train(tiny_sd, tmp_path / "three", *flags, "--vae_batch_size", "3", data=data)
    assert images == [3, 3, 2, 2] and captions == [3, 2, 1]  # the last one: the empty caption, for dropout
    images.clear(), captions.clear()
    train(tiny_sd, tmp_path / "default", *flags, data=data)
    assert images == [5, 5] and captions == [5, 1]


def test_cached_losses_differ_with_another_seed(tiny_sd, tmp_path):
    # So the equality above is not the losses being insensitive to what was drawn.
    data = caption_list_folder(tmp_path)
    flags = ["--max_train_steps", "2", "--center_crop", "--random_flip"]
    train(tiny_sd, tmp_path / "a", *flags, data=data)
    train(tiny_sd, tmp_path / "b", *flags, "--seed", "1", data=data)
    assert logged_losses(tmp_path / "a")[0][1] != pytest.approx(logged_losses(tmp_path / "b")[0][1], rel=1e-3)


def encoders_alive_while_training(tiny_sd, output_dir, monkeypatch, *flags):
    """Train one step; whether the VAE and text encoder that were loaded still exist when the UNet first runs."""
    loaded, alive = [], []
    load_models = train_text_to_image.load_models

    def load_and_watch(args, **kwargs):
        models = load_models(args, **kwargs)
        loaded.extend(weakref.ref(model) for model in models[2:4])  # text_encoder, vae
        return models

    forward = UNet2DConditionModel.forward

    def forward_and_check(self, *args, **kwargs):
        if not alive:
            gc.collect()
            alive.extend(ref() is not None for ref in loaded)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(train_text_to_image, "load_models", load_and_watch)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_and_check)
    train(tiny_sd, output_dir, "--max_train_steps", "1", *flags)
    monkeypatch.undo()
    return alive


def test_the_cache_frees_the_encoders_and_the_pipeline_still_has_them(tiny_sd, tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.INFO):
        alive = encoders_alive_while_training(
            tiny_sd, tmp_path, monkeypatch, "--center_crop", "--validation_prompts", "a creature"
        )
    assert "Cached latents and text embeddings of 32 images" in caplog.text
    # Gone from memory by the first training step (text encoder, VAE); without the cache both stay.
    assert alive == [False, False]
    assert encoders_alive_while_training(tiny_sd, tmp_path / "b", monkeypatch, "--no-cache_latents") == [True, True]
    # Validation and the final pipeline load the frozen encoders again from the base model.
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "validation" / "final" / "00.png").exists()


def test_random_crops_cache_only_the_captions(tiny_sd, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path, "--max_train_steps", "1")
    assert "caching captions only; without --center_crop each step crops anew" in caplog.text
    assert "Cached text embeddings of 32 images" in caplog.text


def test_fused_adamw_by_default_and_the_upstream_loop_on_request(tiny_sd, tmp_path, monkeypatch):
    made = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    train(tiny_sd, tmp_path / "a", "--max_train_steps", "1")
    train(tiny_sd, tmp_path / "b", "--max_train_steps", "1", "--no-fused_adam")
    assert made == [True, None]


def test_in_place_ema_matches_diffusers_ema():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    model[1].weight.requires_grad_(False)  # a frozen tensor is copied, not averaged
    reference, in_place = EMAModel(model.parameters(), foreach=True), InPlaceEMAModel(model.parameters())
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.step(model.parameters())
        in_place.step(model.parameters())
    assert in_place.optimization_step == reference.optimization_step == 6
    for a, b in zip(reference.shadow_params, in_place.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_in_place_ema_averages_half_precision_weights_in_float32():
    # DeepSpeed's fp16 mode trains the model in float16; the EMA, made from the float32 weights, stays float32.
    # foreach_lerp_ refuses the mix, so the GPU check's DeepSpeed row failed at its first EMA step.
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    reference, in_place = EMAModel(model.parameters()), InPlaceEMAModel(model.parameters())
    model.half()
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.step(model.parameters())
        in_place.step(model.parameters())
    for a, b in zip(reference.shadow_params, in_place.shadow_params):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_channels_last_trains_in_that_layout(tiny_sd, tmp_path, monkeypatch):
    layouts = []
    forward = UNet2DConditionModel.forward

    def forward_and_note_layout(self, *args, **kwargs):
        layouts.append(self.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_and_note_layout)
    train(tiny_sd, tmp_path / "a", "--max_train_steps", "2", "--channels_last")
    assert layouts == [True, True]
    layouts.clear()
    train(tiny_sd, tmp_path / "b", "--max_train_steps", "2")
    assert layouts == [False, False]
    assert (tmp_path / "a" / "model_index.json").exists()


def test_step_times_are_logged(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "3")
    seconds = [value for _, value in logged_losses(tmp_path, tag="step_seconds")]
    assert len(seconds) == 3 and all(0 < s < 60 for s in seconds)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (make bench installs it)")
def test_8bit_adamw_runs_on_cpu_and_resumes(tiny_sd, tmp_path):
    flags = ["--checkpointing_steps", "2", "--use_8bit_adam"]
    train(tiny_sd, tmp_path, "--max_train_steps", "2", *flags)
    train(tiny_sd, tmp_path, "--max_train_steps", "3", *flags, "--resume_from_checkpoint", "latest")
    assert [s for s, _ in logged_losses(tmp_path)] == [3]
    # The AdamW states are 8-bit: torchao's quantized tensors hold uint8 codes, a quarter of float32's bytes.
    state = torch.load(tmp_path / "checkpoint-2" / "optimizer.bin", weights_only=False)
    moments = [s[name] for s in state["state"].values() for name in ("exp_avg", "exp_avg_sq") if name in s]
    quantized = [m for m in moments if hasattr(m, "codes")]
    assert quantized and all(m.codes.dtype == torch.uint8 for m in quantized)
    # The rest stay in float32: torchao quantizes tensors of 4096 or more values, in blocks of 256.
    assert all(m.numel() < 4096 or m.numel() % 256 for m in moments if not hasattr(m, "codes"))


def test_cache_flag_is_on_by_default():
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(DEMO_DATA)])
    assert (args.cache_latents, args.fused_adam, args.inplace_ema, args.channels_last) == (True, True, True, False)
