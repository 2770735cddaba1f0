"""--lora_rank: adapters trained on a frozen UNet, saved in diffusers' and kohya's keys, resumed bit for bit."""

import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import metrics
import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.inference import load_pipeline
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME
from tests.conftest import DEMO_DATA, generated_image, logged_losses, train, unet_weights

# alpha differs from the rank, so a file that stores the wrong alpha scales the update wrongly.
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]
TEXT_ENCODER = [*LORA, "--train_text_encoder"]


def keep_the_models(monkeypatch):
    """The models training adds adapters to (the UNet, then the text encoder with --train_text_encoder), as they
    are at the end of training."""
    models = []
    add_lora = train_text_to_image.add_lora

    def keep(model, **kwargs):
        models.append(model)
        return add_lora(model, **kwargs)

    monkeypatch.setattr(train_text_to_image, "add_lora", keep)
    return models


def assert_only_the_adapter_moved(model, base):
    """Every base weight is where the base model has it (PEFT keeps a wrapped layer's under base_layer), and the
    adapter moved: its B matrices start at zero."""
    state = model.state_dict()
    for key, value in base.items():
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key] if key in state else state[wrapped], value), key
    lora_b = [value for key, value in state.items() if "lora_B" in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)


def test_only_the_adapter_trains(tiny_sd, tmp_path, monkeypatch):
    models = keep_the_models(monkeypatch)
    train(tiny_sd, tmp_path / "out", *LORA, "--max_train_steps", "3")
    [unet] = models  # the text encoder has no adapter without --train_text_encoder
    assert_only_the_adapter_moved(unet, unet_weights(Path(tiny_sd) / "unet"))
    assert (tmp_path / "out" / WEIGHTS_NAME).exists() and not (tmp_path / "out" / "unet").exists()
    assert not any(key.startswith("text_encoder.") for key in load_file(tmp_path / "out" / WEIGHTS_NAME))


def embeddings(text_encoder, tokenizer):
    ids = tokenizer("a creature", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(ids.input_ids, return_dict=False)[0]


def test_the_text_encoder_trains_an_adapter_that_every_loader_finds(tiny_sd, tmp_path, monkeypatch, caplog):
    models = keep_the_models(monkeypatch)
    out = tmp_path / "my-lora"
    with caplog.at_level(logging.INFO):
        train(tiny_sd, out, *TEXT_ENCODER, "--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "3")
    # Its captions are encoded at every step, by the text encoder as it is then (and random crops are too).
    assert "--cache_latents: with --train_text_encoder every step encodes its captions" in caplog.text
    assert "--cache_latents: caching nothing; without --center_crop each step crops anew" in caplog.text
    unet, text_encoder = models
    base = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    assert_only_the_adapter_moved(text_encoder, base.state_dict())
    assert_only_the_adapter_moved(unet, unet_weights(Path(tiny_sd) / "unet"))

    # The run's folder, its kohya file and its checkpoint (with the adapters' EMA weights) all load the text
    # encoder as training left it (with its EMA weights, as the final save holds them).
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    trained = embeddings(text_encoder.eval(), tokenizer)
    assert (trained - embeddings(base, tokenizer)).abs().max() > 1e-3
    for path in (out, out / KOHYA_WEIGHTS_NAME, out / "checkpoint-3"):
        pipeline = load_pipeline(str(path), torch.device("cpu"), torch.float32)
        assert (embeddings(pipeline.text_encoder, tokenizer) - trained).abs().max() <= 1e-5, path
    # --lora_scale (and the server's per-request strength) scales the text encoder's adapter too: 0 is the base.
    pipeline = load_pipeline(str(out), torch.device("cpu"), torch.float32, lora_scale=0)
    assert (embeddings(pipeline.text_encoder, tokenizer) - embeddings(base, tokenizer)).abs().max() <= 1e-6
    # Exported as one file, both adapters merged into their models' weights.
    merged = tmp_path / "merged.safetensors"
    export_single_file(str(out), str(merged), half=False)
    single = StableDiffusionPipeline.from_single_file(str(merged), config=str(tiny_sd), local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    assert (embeddings(single.text_encoder, tokenizer) - trained).abs().max() <= 1e-5
    # AUTOMATIC1111's names for the text encoder's layers.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in load_file(
        out / KOHYA_WEIGHTS_NAME
    )
    assert "and the text encoder's q_proj k_proj v_proj out_proj" in (out / "README.md").read_text()


def test_the_kohya_file_gives_the_same_image_as_the_diffusers_file(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, *LORA, "--max_train_steps", "3")
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    without = generated_image(base, 32)
    base.load_lora_weights(out, weight_name=WEIGHTS_NAME, adapter_name="peft")
    with_peft = generated_image(base, 32)
    base.unload_lora_weights()
    base.load_lora_weights(out, weight_name=KOHYA_WEIGHTS_NAME, adapter_name="kohya")
    with_kohya = generated_image(base, 32)
    assert abs(with_peft - without).max() > 1e-3  # the adapter changes the image
    assert abs(with_kohya - with_peft).max() <= 1e-4
    kohya = load_file(out / KOHYA_WEIGHTS_NAME)
    assert all(value.item() == 8.0 for key, value in kohya.items() if key.endswith(".alpha"))


@pytest.mark.parametrize(
    "ema, text_encoder", [(False, False), (True, False), (True, True)], ids=["no-ema", "ema", "ema-text-encoder"]
)
def test_resume_is_bitwise(tiny_sd, tmp_path, ema, text_encoder):
    flags = [*LORA, "--checkpointing_steps", "2"] + ["--use_ema"] * ema + ["--train_text_encoder"] * text_encoder
    train(tiny_sd, tmp_path / "whole", *flags, "--max_train_steps", "4")
    train(tiny_sd, tmp_path / "parts", *flags, "--max_train_steps", "2")
    train(tiny_sd, tmp_path / "parts", *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    for folder in (".", "checkpoint-4"):
        whole = load_file(tmp_path / "whole" / folder / WEIGHTS_NAME)
        parts = load_file(tmp_path / "parts" / folder / WEIGHTS_NAME)
        assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole), folder
    if ema:  # the final file holds the EMA of the adapter, which differs from its last weights
        final, last = (
            load_file(tmp_path / "whole" / WEIGHTS_NAME),
            load_file(tmp_path / "whole" / "checkpoint-4" / WEIGHTS_NAME),
        )
        assert any(not torch.equal(final[k], last[k]) for k in final)


def test_a_lora_checkpoint_resumes_only_as_lora(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "out", *LORA, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="is a LoRA checkpoint: resume it with the same --lora_rank"):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match="holds a LoRA of rank 4; resume it with --lora_rank 4"):
        train(
            tiny_sd,
            tmp_path / "out",
            "--lora_rank",
            "8",
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        )


def test_validation_images_are_drawn_without_lora_dropout(tiny_sd, tmp_path, monkeypatch):
    models = keep_the_models(monkeypatch)
    modes = []
    call = StableDiffusionPipeline.__call__

    def record_modes(self, *args, **kwargs):
        modes.append((self.unet.training, self.text_encoder.training))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", record_modes)
    train(tiny_sd, tmp_path / "out", *TEXT_ENCODER, "--lora_dropout", "0.5", "--max_train_steps", "2",
          "--validation_prompts", "a creature", "--validation_epochs", "1")  # fmt: skip
    assert modes == [(False, False)] * 2  # after the epoch, and at the end
    assert all(model.training for model in models)  # and back in training mode after each


def test_a_checkpoint_resumes_with_a_text_encoder_adapter_only_if_it_has_one(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "out", *TEXT_ENCODER, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="holds a LoRA on the text encoder; resume it with --train_text_encoder"):
        train(tiny_sd, tmp_path / "out", *LORA, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    train(tiny_sd, tmp_path / "unet-only", *LORA, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="has no LoRA on the text encoder; resume it without --train_text_encoder"):
        train(tiny_sd, tmp_path / "unet-only", *TEXT_ENCODER, "--max_train_steps", "4", "--resume_from_checkpoint",
              "latest")  # fmt: skip


def test_metrics_scores_a_lora_beside_its_base(tiny_sd, tiny_clip, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, *LORA, "--max_train_steps", "3")
    common = ["--clip_model", str(tiny_clip), "--num_inference_steps", "2", "--resolution", "32", "--device", "cpu",
              "--output_dir", str(tmp_path / "scores")]  # fmt: skip
    report = metrics.main(["--model_path", str(tiny_sd), "--lora", str(out), str(out / KOHYA_WEIGHTS_NAME), *common])
    base, peft, kohya = report["models"]
    assert peft["model_path"] == f"{tiny_sd} + LoRA {out}"
    assert peft["clip_score"] != base["clip_score"]
    assert kohya["clip_score"] == pytest.approx(peft["clip_score"], abs=1e-3)
    with pytest.raises(UserError, match="no LoRA there"):
        metrics.main(["--model_path", str(tiny_sd), "--lora", str(tmp_path), *common])


def assert_two_finite_steps_and_a_float32_adapter_that_moved(out):
    losses = [loss for _, loss in logged_losses(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(out / WEIGHTS_NAME)
    assert all(value.dtype == torch.float32 for value in adapter.values())
    # B, which starts at zero (the UNet's lora.up, the text encoder's lora_linear_layer.up)
    lora_up = [value for key, value in adapter.items() if key.endswith(".up.weight")]
    assert lora_up and all(value.abs().sum() > 0 for value in lora_up)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, flags", [("fp16", LORA), ("bf16", LORA), ("fp16", TEXT_ENCODER)],
                         ids=["fp16", "bf16", "fp16-text-encoder"])  # fmt: skip
def test_lora_trains_under_mixed_precision_on_gpu(tiny_sd, tmp_path, precision, flags):
    # The adapters stay float32 under autocast, so fp16's GradScaler can unscale their gradients (upstream's LoRA
    # script failed here: "Attempting to unscale FP16 gradients").
    train(tiny_sd, tmp_path, *flags, "--max_train_steps", "2", "--mixed_precision", precision,
          "--gradient_checkpointing", "--use_ema", "--validation_prompts", "a creature")  # fmt: skip
    assert_two_finite_steps_and_a_float32_adapter_that_moved(tmp_path)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_lora_under_deepspeed_or_fsdp_is_refused_with_a_reason(tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UserError, match="--lora_rank is not supported with DeepSpeed or FSDP yet"):
        train_text_to_image.main(["--pretrained_model_name_or_path", "/nonexistent", "--train_data_dir",
                                  str(DEMO_DATA), "--output_dir", str(tmp_path), "--lora_rank", "4"])  # fmt: skip


def test_under_mixed_precision_the_frozen_models_are_half_and_the_adapters_float32(tiny_sd, tmp_path, monkeypatch):
    # bf16 autocast runs on CPU, so this checks here what the gpu test above checks with fp16's GradScaler.
    models = keep_the_models(monkeypatch)
    train(tiny_sd, tmp_path, *TEXT_ENCODER, "--max_train_steps", "2", "--mixed_precision", "bf16", "--use_ema",
          "--validation_prompts", "a creature", "--validation_split", "0.25")  # fmt: skip
    assert (tmp_path / "val_imgs_grid.png").exists()  # validation runs under bf16 autocast on the CPU too
    for model in models:  # the UNet and the text encoder
        dtypes = {(parameter.requires_grad, parameter.dtype) for parameter in model.parameters()}
        assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, type(model).__name__
    assert_two_finite_steps_and_a_float32_adapter_that_moved(tmp_path)
