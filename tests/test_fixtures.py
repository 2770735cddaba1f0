"""The offline fixtures: real formats, the real tokenizer, the real SD v1-4 sizes."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from datasets import load_dataset
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from sdtoolkit import fixtures
from sdtoolkit.demo_dataset import write_dataset
from tests.conftest import DEMO_DATA


def test_tokenizer_is_sd_v1_4_clip(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70
    # The BPE files are there too, as in the hub's SD v1-4 folder.
    vocab = json.loads((Path(tiny_sd) / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407


def test_sd_v1_4_preset_has_the_real_parameter_counts():
    with init_empty_weights():  # shapes only, no memory for 1 B parameters
        unet, vae, text_encoder = fixtures.build_models("sd-v1-4")
    assert unet.num_parameters() == 859_520_964
    assert vae.num_parameters() == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert text_encoder.config.hidden_act == "quick_gelu"


def test_scheduler_is_sd_v1_4_pndm(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    config = pipeline.scheduler.config
    assert type(pipeline.scheduler).__name__ == "PNDMScheduler"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000 and config.skip_prk_steps and config.steps_offset == 1


def test_tiny_pipeline_loads_offline_and_generates(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipeline("a cartoon creature", num_inference_steps=2, height=64, width=64, generator=generator).images[0]
    assert image.size == (64, 64)
    for folder in ("unet", "vae", "text_encoder"):
        assert any(p.suffix == ".safetensors" for p in (Path(tiny_sd) / folder).iterdir())


def test_builder_is_deterministic_for_a_seed():
    a, _, _ = fixtures.build_models("tiny", seed=3)
    b, _, _ = fixtures.build_models("tiny", seed=3)
    c, _, _ = fixtures.build_models("tiny", seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)


def test_tiny_clip_loads_with_its_processor(tiny_clip):
    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert processor.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    inputs = processor(text=["a cat"], images=[torch.zeros(3, 64, 64)], return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 1)


def test_bundled_dataset_has_the_pokemon_blip_schema():
    dataset = load_dataset("imagefolder", data_dir=str(DEMO_DATA), split="train")
    assert set(dataset.column_names) == {"image", "text"}
    assert len(dataset) == 32
    assert all(caption.startswith("a cartoon drawing of a") for caption in dataset["text"])
    assert dataset[0]["image"].size == (128, 128)


def test_bundled_dataset_is_what_the_generator_writes(tmp_path):
    rows = write_dataset(tmp_path, num_images=32, seed=0)
    shipped = [json.loads(line) for line in (DEMO_DATA / "metadata.jsonl").read_text().splitlines()]
    assert rows == shipped


def test_the_fixture_vae_is_nearly_deterministic_with_unit_variance_latents(tiny_sd):
    # As a trained VAE: a posterior std far below its mean's spread, and scaling_factor giving the bundled
    # images' latents unit variance (SD's 0.18215 does that for real images).
    from diffusers import AutoencoderKL
    from torchvision.transforms import functional as TF

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    images = [Image.open(DEMO_DATA / f"{i:04d}.png").convert("RGB").resize((64, 64)) for i in range(32)]
    pixels = torch.stack([TF.normalize(TF.to_tensor(image), [0.5], [0.5]) for image in images])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    scaled = posterior.mean * vae.config.scaling_factor
    assert scaled.std().item() == pytest.approx(1.0, abs=0.02)
    assert (posterior.std * vae.config.scaling_factor).max().item() < 0.01
