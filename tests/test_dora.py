"""--use_dora: DoRA adapters (arXiv 2402.09353) trained, saved, loaded by every loader and trained on from a file.

The reference is the paper's formula, worked out here from the saved tensors: each adapted weight W becomes
m * (W + s * B @ A) / ||W + s * B @ A||, the norm taken per output (row), with m the trained magnitudes and s the
adapter's alpha / rank.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import train_text_to_image
from sdtoolkit import extract_lora
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.inference import load_pipeline
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME, kohya_name
from tests.conftest import embeddings, train

# alpha differs from the rank, so a loader that scales B @ A by anything but alpha / rank is caught; the ResNet
# blocks' first 3x3 convolutions get adapters of rank 2 and alpha 1 (LoCon's).
DORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--use_dora", "--train_text_encoder",
        "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "--lora_conv_rank", "2",
        "--lora_conv_alpha", "1"]  # fmt: skip
SCALE = {4: 8 / 4, 2: 1 / 2}  # alpha / rank, by rank


@pytest.fixture(scope="module")
def dora_run(tiny_sd, tmp_path_factory):
    """A DoRA run on the UNet and the text encoder, with EMA, its last step a checkpoint."""
    out = tmp_path_factory.mktemp("dora") / "my-dora"
    train(tiny_sd, out, *DORA, "--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "3")
    return out


def merged_by_hand(base, adapters, prefix):
    """The base model's weights with the DoRA `adapters` (the saved file's tensors) worked into them: the paper's
    formula, per layer of the file under `prefix` ("unet." or "text_encoder."). A convolution's weight is a matrix
    of a row per output channel (out, in x kernel)."""
    weights = {key: value.clone() for key, value in base.state_dict().items()}
    layers = [key for key in adapters if key.startswith(prefix) and key.endswith(".lora_A.weight")]
    assert layers, f"no DoRA layer under {prefix}"
    for key in layers:
        layer = key.removeprefix(prefix).removesuffix(".lora_A.weight")
        down, up = adapters[key], adapters[f"{prefix}{layer}.lora_B.weight"]
        magnitude = adapters.get(f"{prefix}{layer}.lora_magnitude_vector")  # the UNet's name, PEFT's
        if magnitude is None:
            magnitude = adapters[f"{prefix}{layer}.lora_magnitude_vector.weight"]  # the text encoder's
        name = f"{layer}.weight" if f"{layer}.weight" in weights else f"text_model.{layer}.weight"
        weight = weights[name]
        direction = weight.flatten(1) + SCALE[down.shape[0]] * up.flatten(1) @ down.flatten(1)  # (out, in x kernel)
        merged = magnitude.reshape(-1, 1) * direction / direction.norm(dim=1, keepdim=True)
        weights[name] = merged.reshape(weight.shape)
    return weights


def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def by_hand(tiny_sd, dora_run):
    """(UNet output, text embeddings) of the base model with the run's DoRA worked in by hand."""
    adapters = load_file(dora_run / WEIGHTS_NAME)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    base_output = unet_output(unet)
    unet.load_state_dict(merged_by_hand(unet, adapters, "unet."))
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    base_embeddings = embeddings(text_encoder, tokenizer)
    text_encoder.load_state_dict(merged_by_hand(text_encoder, adapters, "text_encoder."))
    output, text = unet_output(unet), embeddings(text_encoder, tokenizer)
    # The run moved both models away from the base (a DoRA starts as the base model).
    assert (output - base_output).abs().max() > 1e-3 and (text - base_embeddings).abs().max() > 1e-3
    return output, text, tokenizer


def assert_as_by_hand(pipeline, by_hand, where):
    output, text, tokenizer = by_hand
    assert (unet_output(pipeline.unet) - output).abs().max() <= 1e-5, where
    assert (embeddings(pipeline.text_encoder, tokenizer) - text).abs().max() <= 1e-5, where


def test_a_dora_is_saved_in_diffusers_keys_with_its_trained_magnitudes(tiny_sd, dora_run):
    adapters = load_file(dora_run / WEIGHTS_NAME)
    magnitudes = {key: value for key, value in adapters.items() if "lora_magnitude_vector" in key}
    assert any(key.startswith("unet.") for key in magnitudes) and any(
        k.startswith("text_encoder.") for k in magnitudes
    )
    # Magnitudes start at the norms of the base's rows: they trained.
    unet = load_file(Path(tiny_sd) / "unet" / "diffusion_pytorch_model.safetensors")
    for layer in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"):
        start = unet[f"{layer}.weight"].flatten(1).norm(dim=1)
        assert (adapters[f"unet.{layer}.lora_magnitude_vector"].flatten() - start).abs().max() > 1e-4, layer
    # No kohya-ss file (AUTOMATIC1111 reads DoRA magnitudes per input); its facts are in the diffusers file's header.
    assert not (dora_run / KOHYA_WEIGHTS_NAME).exists()
    with safe_open(dora_run / WEIGHTS_NAME, "pt") as f:
        header = f.metadata()
    assert header["sdtoolkit.model"] == str(tiny_sd) and json.loads(header["lora_adapter_metadata"])
    assert (
        "* LoRA: DoRA (--use_dora), rank 4, alpha 8.0, on to_q to_k to_v to_out.0 conv1, its 3x3 convolutions"
        in (dora_run / "README.md").read_text()
    )


def test_every_loader_gives_the_model_of_doras_formula(tiny_sd, dora_run, by_hand, tmp_path):
    # diffusers' own loader, as the model card shows it: the text encoder's magnitudes too.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipeline.load_lora_weights(dora_run)
    assert_as_by_hand(pipeline, by_hand, "load_lora_weights")
    # metrics.py's and gradio_app.py's: the run's folder names its base model, and its checkpoint (the adapter's
    # EMA weights at step 3) is the final save.
    for path in (dora_run, dora_run / WEIGHTS_NAME, dora_run / "checkpoint-3"):
        assert_as_by_hand(load_pipeline(str(path), torch.device("cpu"), torch.float32), by_hand, path)
    # Merged into one file for AUTOMATIC1111 and ComfyUI.
    merged = tmp_path / "merged.safetensors"
    export_single_file(str(dora_run), str(merged), half=False)
    single = StableDiffusionPipeline.from_single_file(str(merged), config=str(tiny_sd), local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    assert_as_by_hand(single, by_hand, "export_single_file")
    # Written again as a LoRA (kohya-ss's keys, for AUTOMATIC1111) at a rank that holds every layer's change whole.
    lora = tmp_path / "as-lora.safetensors"
    extract_lora.main([str(tiny_sd), str(dora_run), str(lora), "--rank", "64", "--conv_rank", "64"])
    assert not any("magnitude" in key for key in load_file(lora))
    assert_as_by_hand(load_pipeline(str(lora), torch.device("cpu"), torch.float32), by_hand, "extract_lora")


def test_init_lora_trains_on_from_a_dora_as_it_is(tiny_sd, dora_run, by_hand, tmp_path, monkeypatch, caplog):
    # The file's kind is kept: --use_dora is implied, and the adapters start as the file has them.
    loaded = []
    add_lora_from_file = train_text_to_image.add_lora_from_file

    def keep(model, lora, **kwargs):
        parameters = add_lora_from_file(model, lora, **kwargs)
        loaded.append(unet_output(model) if kwargs["part"] == "unet" else embeddings(model, by_hand[2]))
        return parameters

    monkeypatch.setattr(train_text_to_image, "add_lora_from_file", keep)
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "on", "--init_lora", str(dora_run), "--train_text_encoder", "--max_train_steps", "1")
    output, text, _ = by_hand
    assert (loaded[0] - output).abs().max() <= 1e-5 and (loaded[1] - text).abs().max() <= 1e-5
    assert "Saved the DoRA adapter" in caplog.text
    assert any("lora_magnitude_vector" in key for key in load_file(tmp_path / "on" / WEIGHTS_NAME))

    # A LoRA's file (the same adapters without their magnitudes) is not a DoRA's.
    lora = tmp_path / "lora.safetensors"
    save_file({k: v for k, v in load_file(dora_run / WEIGHTS_NAME).items() if "magnitude" not in k}, lora)
    with pytest.raises(UserError, match="is a LoRA, not a DoRA: leave --use_dora out"):
        train(tiny_sd, tmp_path / "no", "--init_lora", str(lora), "--use_dora", "--max_train_steps", "1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--use_dora"], "--use_dora trains DoRA adapters of --lora_rank N in place of LoRA ones: give their rank"),
        (["--use_dora", "--lora_rank", "4", "--lora_type", "loha"], "not --lora_type loha's: drop one"),
        (["--use_dora", "--lora_rank", "4", "--scale_weight_norms", "1"], "which DoRA rescales to its trained"),
    ],
)
def test_flags_that_do_not_go_with_dora_are_one_line(tiny_sd, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(tiny_sd, tmp_path / "out", *flags, "--max_train_steps", "1")


def kohya_dora(adapters, per_input=False):
    """The DoRA `adapters` (a run's file) in kohya-ss keys, as LyCORIS writes a DoRA: lora_down, lora_up, alpha and
    dora_scale, one magnitude per output, (out, 1) or (out, 1, 1, 1). per_input: the magnitudes' shape as
    OneTrainer writes them, (1, in), (1, in, 1, 1) (ones: such a file is refused)."""
    state = {}
    for key in [key for key in adapters if key.endswith(".lora_A.weight")]:
        part, _, layer = key.removesuffix(".lora_A.weight").partition(".")
        name = kohya_name("lora_unet_" if part == "unet" else "lora_te_", layer)
        down, up = adapters[key], adapters[f"{part}.{layer}.lora_B.weight"]
        magnitude = adapters.get(f"{part}.{layer}.lora_magnitude_vector")
        if magnitude is None:
            magnitude = adapters[f"{part}.{layer}.lora_magnitude_vector.weight"]
        ones = [1] * (down.ndim - 2)
        shape = (1, down.shape[1], *ones) if per_input else (up.shape[0], 1, *ones)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(SCALE[down.shape[0]] * down.shape[0])
        state[f"{name}.dora_scale"] = torch.ones(shape) if per_input else magnitude.reshape(shape)
    return state


def test_a_lycoris_dora_file_loads_as_its_formula_and_one_per_input_is_one_line(tiny_sd, dora_run, by_hand, tmp_path):
    # diffusers leaves a kohya-ss file's dora_scale out, with a warning, and would load the rest as a plain LoRA.
    adapters = load_file(dora_run / WEIGHTS_NAME)
    save_file(kohya_dora(adapters), tmp_path / "lycoris-dora.safetensors")
    pipeline = load_pipeline(
        str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(tmp_path / "lycoris-dora.safetensors")
    )
    assert_as_by_hand(pipeline, by_hand, "LyCORIS's keys")
    save_file(kohya_dora(adapters, per_input=True), tmp_path / "onetrainer-dora.safetensors")
    with pytest.raises(UserError, match=r"dora_scale, of shape \(1, 32\), is a DoRA magnitude per input"):
        load_pipeline(
            str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(tmp_path / "onetrainer-dora.safetensors")
        )


def test_a_checkpoint_resumes_only_as_the_kind_it_holds(tiny_sd, tmp_path):
    flags = ["--lora_rank", "4", "--checkpointing_steps", "1"]
    for run, trained, resumed, message in (
        ("dora", ["--use_dora"], [], "holds a DoRA adapter; resume it with --use_dora"),
        ("lora", [], ["--use_dora"], "holds a LoRA adapter; resume it without --use_dora"),
    ):
        train(tiny_sd, tmp_path / run, *flags, *trained, "--max_train_steps", "1")
        with pytest.raises(UserError, match=message):
            train(tiny_sd, tmp_path / run, *flags, *resumed, "--max_train_steps", "2", "--resume_from_checkpoint",
                  "latest")  # fmt: skip
