"""--lora_rank: adapters trained on a frozen UNet, saved in diffusers' and kohya's keys, resumed bit for bit."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import metrics
import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.fixtures import PRESETS, text_encoder_config
from sdtoolkit.inference import load_pipeline
from sdtoolkit.lora import (
    DEFAULT_TARGETS,
    KOHYA_WEIGHTS_NAME,
    TEXT_ENCODER_TARGETS,
    WEIGHTS_NAME,
    add_lora,
    max_norm_regularize,
    store_in_float8,
)
from tests.conftest import (
    DEMO_DATA,
    embeddings,
    generated_image,
    launched_with,
    logged_losses,
    reset_accelerate_state,
    train,
    train_whole_and_resumed,
    unet_weights,
)

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
    assert "and the text encoder's k_proj out_proj q_proj v_proj" in (out / "README.md").read_text()


# Beside attention layers, kohya-ss trains proj_in, proj_out and the feed-forward layers by default.
KOHYA_TARGETS = ["--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]


# kohya-ss's LoCon: its LoRA on the ResNet blocks' convolutions too, the 3x3 ones at a rank and alpha of their own.
LOCON_TARGETS = [*KOHYA_TARGETS, "conv1", "conv2", "conv_shortcut", "--lora_conv_rank", "2", "--lora_conv_alpha", "1"]


@pytest.mark.parametrize("targets", [[], KOHYA_TARGETS, LOCON_TARGETS], ids=["attention", "kohya-targets", "locon"])
def test_the_kohya_file_gives_the_same_image_as_the_diffusers_file(tiny_sd, tmp_path, targets):
    # diffusers' own loader, as the model card shows it, reads every layer of either file.
    out = tmp_path / "out"
    train(tiny_sd, out, *LORA, *targets, "--max_train_steps", "3")
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    without = generated_image(base, 32)
    base.load_lora_weights(out, weight_name=WEIGHTS_NAME, adapter_name="peft")
    with_peft = generated_image(base, 32)
    base.unload_lora_weights()
    base.load_lora_weights(out, weight_name=KOHYA_WEIGHTS_NAME, adapter_name="kohya")
    with_kohya = generated_image(base, 32)
    assert abs(with_peft - without).max() > 1e-3  # the adapter changes the image
    assert abs(with_kohya - with_peft).max() <= 1e-4
    if targets:
        # Upstream's LoRA script (and this toolkit before) renamed only the attention layers to diffusers' older keys,
        # a mix that diffusers' loader reads only in part; metrics.py and gradio_app.py read all of it.
        upstream = tmp_path / "upstream" / WEIGHTS_NAME
        upstream.parent.mkdir()
        with safe_open(out / WEIGHTS_NAME, "pt") as f:
            save_file(convert_state_dict_to_diffusers(load_file(out / WEIGHTS_NAME)), upstream, metadata=f.metadata())
        pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(upstream))
        assert abs(generated_image(pipeline, 32) - with_peft).max() <= 1e-4
    kohya = load_file(out / KOHYA_WEIGHTS_NAME)
    convolution = re.compile(r"_conv[12]\.")  # a ResNet block's 3x3 convolutions (conv_shortcut is 1x1)
    ranks = {key: kohya[key].shape[0] for key in kohya if key.endswith(".lora_down.weight")}
    if "--lora_conv_rank" in targets:
        assert {rank for key, rank in ranks.items() if convolution.search(key)} == {2}
        assert all(kohya[key].item() == 1.0 for key in kohya if key.endswith(".alpha") and convolution.search(key))
        with safe_open(str(out / KOHYA_WEIGHTS_NAME), "pt") as f:
            assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
        assert "its 3x3 convolutions at rank 2, alpha 1.0" in (out / "README.md").read_text()
    assert {rank for key, rank in ranks.items() if not convolution.search(key)} == {4}
    assert all(
        value.item() == 8.0 for key, value in kohya.items() if key.endswith(".alpha") and not convolution.search(key)
    )


@pytest.mark.parametrize(
    "ema, text_encoder, extra",
    [
        (False, False, []),
        (True, True, []),
        (False, True, ["--fp8_base", "--gradient_checkpointing"]),
        (True, True, ["--use_dora", "--fp8_base", "--lora_target_modules", "to_q", "to_v", "conv1"]),
    ],
    ids=["no-ema", "ema-text-encoder", "fp8-base", "dora-fp8-base-conv"],
)
def test_resume_is_bitwise(tiny_sd, tmp_path, ema, text_encoder, extra):
    flags = (
        [*LORA, "--checkpointing_steps", "2", *extra] + ["--use_ema"] * ema + ["--train_text_encoder"] * text_encoder
    )
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
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


def test_regional_compilation_compiles_the_unets_transformer_blocks_and_trains_as_without(
    tiny_sd, tmp_path, monkeypatch, caplog
):
    # accelerate's own --dynamo_use_regional_compilation would also compile SD's conv_norm_out on its own, and the
    # UNet's forward then stops at `if self.conv_norm_out:` (found by gpu_check.py's dry run). The script compiles the
    # transformer blocks in place instead: with dynamo's eager backend (no code generation), the same weights,
    # validation images included. (A LoRA's layers inside the blocks trace as in the whole UNet's compile below;
    # each trace costs a CI machine ~10 s.)
    flags = ["--use_ema", "--validation_prompts", "a creature", "--validation_steps", "2"]
    flags += ["--gradient_checkpointing", "--max_train_steps", "2"]
    train(tiny_sd, tmp_path / "plain", *flags)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    launched_with(monkeypatch, "--dynamo_backend=eager", "--dynamo_use_regional_compilation")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "regional", *flags)
    assert "torch.compile (eager) of the UNet's 6 transformer blocks" in caplog.text
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2  # the blocks' forward, traced (and run) by dynamo
    name = "unet/diffusion_pytorch_model.safetensors"
    plain, regional = load_file(tmp_path / "plain" / name), load_file(tmp_path / "regional" / name)
    assert plain.keys() == regional.keys()  # the UNet's own names: nothing compiled it whole
    assert all(torch.equal(plain[key], regional[key]) for key in plain)
    images = sorted((tmp_path / "plain" / "validation").rglob("*.png"))
    assert images  # at step 2 and at the end
    for image in images:
        regional_image = tmp_path / "regional" / image.relative_to(tmp_path / "plain")
        assert image.read_bytes() == regional_image.read_bytes(), image.name


def test_a_compiled_unet_is_saved_and_resumed_under_its_own_names(tiny_sd, tmp_path, monkeypatch, caplog):
    # torch.compile through accelerate (its eager backend: dynamo, without inductor's compiling) wraps the UNet, whose
    # weights are then named _orig_mod.*. What the run writes keeps the UNet's own names, which other tools read.
    # (A LoRA's files are written from the same unwrapped UNet; each trace costs a CI machine ~10 s.)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    flags = ["--use_ema", "--validation_prompts", "a creature", "--validation_steps", "2"]
    # Two steps, then resumed from checkpoint-2 (loaded into a compiled UNet) to 4.
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path, *flags, "--checkpointing_steps", "2", "--max_train_steps", "2")
        train(tiny_sd, tmp_path, *flags, "--checkpointing_steps", "2", "--max_train_steps", "4",
              "--resume_from_checkpoint", "latest")  # fmt: skip
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) >= 4  # the final files and checkpoint-2 and -4's
    for path in files:
        with safe_open(path, "pt") as f:
            assert not any("orig_mod" in key for key in f.keys()), path
    assert "OptimizedModule" not in caplog.text  # validation's and the final pipeline are built on the UNet itself
    name = "unet/diffusion_pytorch_model.safetensors"
    assert load_file(tmp_path / "checkpoint-2" / name).keys() == load_file(tmp_path / "checkpoint-4" / name).keys()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank", "4", "--lora_conv_rank", "2"], "--lora_conv_rank is for the 3x3 convolutions, and"
                                                         " --lora_target_modules names none: add conv1 conv2"),
        (["--lora_rank", "4", "--lora_conv_alpha", "1"], "--lora_conv_alpha is the alpha of --lora_conv_rank's"),
        (["--lora_conv_rank", "2"], "--lora_conv_rank must be at least 1, with --lora_rank; got 2"),
    ],
    ids=["no-convolution", "alpha-alone", "no-lora"],
)  # fmt: skip
def test_a_convolution_rank_that_does_not_fit_is_one_line(tiny_sd, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(tiny_sd, tmp_path / "out", *flags, "--max_train_steps", "1")


def test_a_lora_checkpoint_resumes_only_as_lora(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "out", *LORA, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="is a LoRA checkpoint: resume it with the same --lora_rank"):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match="was trained without --lora_conv_rank; resume it so"):
        train(tiny_sd, tmp_path / "out", *LORA, "--lora_target_modules", "to_q", "conv1", "--lora_conv_rank", "2",
              "--max_train_steps", "4", "--resume_from_checkpoint", "latest")  # fmt: skip
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

    # Several strengths: the LoRA (here a run's folder as a model) once per strength, beside the base. At 0 it is
    # the base model, so its images and score are the base's.
    report = metrics.main(["--model_path", str(tiny_sd), str(out), "--lora_scale", "0", "1", *common])
    assert [model["label"] for model in report["models"]] == ["tiny-sd", "out @0", "out @1"]
    base, at_0, at_1 = (model["clip_score"] for model in report["models"])
    assert at_0 == pytest.approx(base, abs=1e-6) and at_1 == pytest.approx(peft["clip_score"], abs=1e-6)
    assert "LoRAs at scales 0, 1;" in (tmp_path / "scores" / "report.md").read_text()


@pytest.fixture(scope="module")
def a1111_lora(tiny_sd, tmp_path_factory):
    """(a LoRA run's folder, a kohya-ss file as AUTOMATIC1111 users download them). The file holds the run's adapters
    in kohya keys plus what kohya-ss's defaults add: adapters on the text encoder's MLP, here of another rank (2)
    and alpha (1), and a few UNet layers with an alpha of their own (3); its weights are float16."""
    root = tmp_path_factory.mktemp("a1111-lora")
    train(tiny_sd, root / "run", *TEXT_ENCODER, "--max_train_steps", "2",
          "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")  # fmt: skip
    kohya = load_file(root / "run" / KOHYA_WEIGHTS_NAME)
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    generator = torch.Generator().manual_seed(0)
    for name, module in text_encoder.named_modules():
        if name.endswith(("mlp.fc1", "mlp.fc2")):
            key = "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")
            kohya[key + ".lora_down.weight"] = torch.randn(2, module.in_features, generator=generator) / 10
            kohya[key + ".lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator) / 10
            kohya[key + ".alpha"] = torch.tensor(1.0)
    for key in kohya:
        if key.endswith(("proj_in.alpha", "ff_net_2.alpha")):
            kohya[key] = torch.tensor(3.0)
    kohya = {key: value.half() if key.endswith(".weight") else value for key, value in kohya.items()}
    save_file(kohya, root / "a1111.safetensors")
    return root / "run", root / "a1111.safetensors"


def test_init_lora_starts_from_the_adapters_of_the_file_as_they_are(tiny_sd, a1111_lora, tmp_path):
    run, a1111 = a1111_lora
    # A step this small moves no weight: what is saved is what training started from.
    still = ["--learning_rate", "1e-30", "--max_train_steps", "1", "--train_text_encoder"]
    train(tiny_sd, tmp_path / "from-run", "--init_lora", str(run), *still)
    started, source = load_file(tmp_path / "from-run" / WEIGHTS_NAME), load_file(run / WEIGHTS_NAME)
    assert started.keys() == source.keys() and all(torch.equal(started[k], source[k]) for k in source)

    # From the kohya file under mixed precision: every layer, rank and alpha as the file has them, in float32.
    reset_accelerate_state()
    train(tiny_sd, tmp_path / "from-file", "--init_lora", str(a1111), *still, "--mixed_precision", "bf16")
    started, source = load_file(tmp_path / "from-file" / KOHYA_WEIGHTS_NAME), load_file(a1111)
    assert started.keys() == source.keys()
    assert all(started[k].dtype == torch.float32 and torch.equal(started[k], source[k].float()) for k in source)
    card = (tmp_path / "from-file" / "README.md").read_text()
    assert "rank 4, alpha 8.0, on ff.net.2 proj_in to_k to_out.0 to_q to_v and the text encoder's fc1 fc2" in card
    assert "trained on from a local file `a1111.safetensors`" in card

    # From a file without a text encoder adapter, --train_text_encoder starts a new one at the file's rank and alpha.
    unet_only = {key: value for key, value in source.items() if key.startswith("lora_unet_")}
    save_file(unet_only, tmp_path / "unet-only.safetensors")
    reset_accelerate_state()
    train(tiny_sd, tmp_path / "new-te", "--init_lora", str(tmp_path / "unet-only.safetensors"), *still)
    started = load_file(tmp_path / "new-te" / KOHYA_WEIGHTS_NAME)
    text_encoder = {key: value for key, value in started.items() if key.startswith("lora_te_")}
    assert text_encoder and all(value.item() == 8.0 for key, value in text_encoder.items() if key.endswith(".alpha"))
    assert all(value.shape[0] == 4 for key, value in text_encoder.items() if key.endswith(".lora_down.weight"))


def test_init_lora_trains_every_layer_of_the_file_and_resumes_bitwise(tiny_sd, a1111_lora, tmp_path):
    _, a1111 = a1111_lora
    flags = ["--init_lora", str(a1111), "--train_text_encoder", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]  # fmt: skip
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    whole, parts = (
        load_file(tmp_path / "whole" / KOHYA_WEIGHTS_NAME),
        load_file(tmp_path / "parts" / KOHYA_WEIGHTS_NAME),
    )
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    source = load_file(a1111)
    moved = [k for k in source if k.endswith(".weight") and not torch.equal(whole[k], source[k].float())]
    assert len(moved) == sum(k.endswith(".weight") for k in source)  # the text encoder's MLP layers too


def text_encoder_by_hand(tiny_sd, kohya_file):
    """The tiny text encoder with the kohya file's text encoder updates added by hand: alpha / rank * up @ down."""
    by_hand = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    modules = {"lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_"): module
               for name, module in by_hand.named_modules()}  # fmt: skip
    kohya = load_file(kohya_file)
    for key in kohya:
        if key.startswith("lora_te_") and key.endswith(".alpha"):
            name = key.removesuffix(".alpha")
            down, up = kohya[name + ".lora_down.weight"].float(), kohya[name + ".lora_up.weight"].float()
            modules[name].weight.data += kohya[key].item() / down.shape[0] * up @ down
    return by_hand


def test_a_kohya_file_with_an_alpha_per_layer_loads_as_written(tiny_sd, a1111_lora):
    # diffusers names the text encoder's per-layer alphas by transformers 4's paths; they must still apply.
    _, a1111 = a1111_lora
    pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(a1111))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    by_hand = text_encoder_by_hand(tiny_sd, a1111)
    assert (embeddings(pipeline.text_encoder, tokenizer) - embeddings(by_hand, tokenizer)).abs().max() <= 1e-5


def test_a_text_encoder_lora_without_out_proj_loads(tiny_sd, a1111_lora, tmp_path):
    # diffusers infers the kind of a kohya file's text encoder names from an out_proj adapter, and without one
    # refused the file ("Could not automatically infer state dict type"): q_proj alone, as some trainers adapt.
    _, a1111 = a1111_lora
    kohya = {key: value for key, value in load_file(a1111).items() if "lora_te_" not in key or "_q_proj" in key}
    save_file(kohya, tmp_path / "q-only.safetensors")
    pipeline = load_pipeline(
        str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(tmp_path / "q-only.safetensors")
    )
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    by_hand = text_encoder_by_hand(tiny_sd, tmp_path / "q-only.safetensors")
    assert (embeddings(pipeline.text_encoder, tokenizer) - embeddings(by_hand, tokenizer)).abs().max() <= 1e-5
    base = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    assert (embeddings(by_hand, tokenizer) - embeddings(base, tokenizer)).abs().max() > 1e-3  # the adapters show


def test_a_kohya_file_whose_attention_layers_have_alphas_of_their_own_applies_each_as_written(
    tiny_sd, a1111_lora, tmp_path
):
    # diffusers names such alphas by its older attention names (...processor.to_q_lora..., ...self_attn.to_q_lora...),
    # which name no layer: those layers were loaded with the file's most common alpha instead.
    _, a1111 = a1111_lora
    kohya = load_file(a1111)
    own = ("_to_q.alpha", "_to_out_0.alpha", "_q_proj.alpha", "_out_proj.alpha")
    kohya.update({key: torch.tensor(2.0) for key in kohya if key.endswith(own)})
    save_file(kohya, tmp_path / "alphas.safetensors")
    pipeline = load_pipeline(
        str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(tmp_path / "alphas.safetensors")
    )
    by_hand = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in by_hand.named_modules()}
    with torch.no_grad():
        for key in (k for k in kohya if k.startswith("lora_unet_") and k.endswith(".alpha")):
            name = key.removesuffix(".alpha")
            down, up = kohya[name + ".lora_down.weight"].float(), kohya[name + ".lora_up.weight"].float()
            module = modules[name]
            module.weight += (kohya[key].item() / down.shape[0] * up.flatten(1) @ down.flatten(1)).reshape(
                module.weight.shape
            )
    latents, text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours, theirs = pipeline.unet(latents, 500, text).sample, by_hand(latents, 500, text).sample
    assert (ours - theirs).abs().max() <= 1e-5
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    text_encoder = text_encoder_by_hand(tiny_sd, tmp_path / "alphas.safetensors")
    assert (embeddings(pipeline.text_encoder, tokenizer) - embeddings(text_encoder, tokenizer)).abs().max() <= 1e-5


def misfit(a1111, out, change):
    """The kohya file with one change, as another model's LoRA would have it."""
    kohya = load_file(a1111)
    name = next(key for key in kohya if key.startswith("lora_unet_down_blocks_0") and key.endswith("_to_k.alpha"))
    name = name.removesuffix(".alpha")
    if change == "a layer too many":
        for part in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            kohya[name.replace("down_blocks_0", "down_blocks_7") + part] = kohya[name + part].clone()
    else:
        kohya[name + ".lora_down.weight"] = torch.zeros(4, 999, dtype=torch.float16)
    save_file(kohya, out)
    return out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init_lora", "missing.safetensors"], "--init_lora missing.safetensors: no LoRA there"),
        (["--init_lora", "A1111", "--train_text_encoder", "--lora_rank", "8"], "is a LoRA of rank 4; leave --lora_rank out or give 4"),
        (["--init_lora", "A1111", "--train_text_encoder", "--lora_alpha", "4"], "keeps the adapter's own alphas, ranks and layers"),
        (["--init_lora", "A1111", "--train_text_encoder", "--lora_conv_rank", "2"], "leave --lora_alpha, --lora_target_modules and --lora_conv_rank out"),
        (["--init_lora", "A1111"], "holds a LoRA on the text encoder too; add --train_text_encoder"),
        (["--init_lora", "a layer too many", "--train_text_encoder"], "onto this UNet: 1 of its 61 unet adapter layers match no layer"),
        (["--init_lora", "a misshapen layer", "--train_text_encoder"], "onto this UNet: 1 of its layers have other shapes than this model's"),
    ],
    ids=["missing", "rank", "alpha", "conv-rank", "text-encoder", "extra-layer", "shape"],
)  # fmt: skip
def test_init_lora_that_does_not_fit_is_one_line(tiny_sd, a1111_lora, tmp_path, flags, message):
    _, a1111 = a1111_lora
    path = flags[1]
    if path == "A1111":
        path = str(a1111)
    elif path != "missing.safetensors":
        path = str(misfit(a1111, tmp_path / "other.safetensors", path))
    with pytest.raises(UserError, match=message):
        train(tiny_sd, tmp_path / "out", flags[0], path, *flags[2:], "--max_train_steps", "1")
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def assert_two_finite_steps_and_a_float32_adapter_that_moved(out):
    losses = [loss for _, loss in logged_losses(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(out / WEIGHTS_NAME)
    assert all(value.dtype == torch.float32 for value in adapter.values())
    lora_b = [value for key, value in adapter.items() if key.endswith(".lora_B.weight")]  # B starts at zero
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, flags", [("fp16", LORA), ("bf16", LORA), ("fp16", TEXT_ENCODER),
                                              ("fp16", [*TEXT_ENCODER, "--fp8_base"]),
                                              ("fp16", [*TEXT_ENCODER, "--use_dora"])],
                         ids=["fp16", "bf16", "fp16-text-encoder", "fp16-fp8-base", "fp16-dora"])  # fmt: skip
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


# --fp8_base -----------------------------------------------------------------------------------------------------


def test_fp8_base_keeps_the_frozen_weights_in_float8_and_the_adapters_in_float32(tiny_sd, tmp_path, monkeypatch):
    models = keep_the_models(monkeypatch)
    train(tiny_sd, tmp_path, *TEXT_ENCODER, "--fp8_base", "--max_train_steps", "2", "--mixed_precision", "bf16",
          "--gradient_checkpointing", "--use_ema", "--validation_prompts", "a creature")  # fmt: skip
    assert (tmp_path / "val_imgs_grid.png").exists()  # validation draws with the float8 UNet
    for model in models:  # the UNet and the text encoder
        dtypes = {(parameter.requires_grad, parameter.dtype) for parameter in model.parameters()}
        # float8: the linear and convolution layers; bf16: the norms and embeddings (and the UNet's time MLP).
        assert dtypes == {(False, torch.float8_e4m3fn), (False, torch.bfloat16), (True, torch.float32)}
        weights = {
            name: p.dtype for name, p in model.named_parameters() if not re.search("lora_|embed|norm|bias", name)
        }
        assert set(weights.values()) == {torch.float8_e4m3fn}, type(model).__name__
    assert_two_finite_steps_and_a_float32_adapter_that_moved(tmp_path)


def test_fp8_base_without_gradient_checkpointing_says_what_it_saves(tiny_sd, tmp_path, caplog):
    train(tiny_sd, tmp_path / "without", *LORA, "--fp8_base", "--max_train_steps", "1")
    assert "--fp8_base without --gradient_checkpointing:" in caplog.text
    caplog.clear()
    train(tiny_sd, tmp_path / "with", *LORA, "--fp8_base", "--max_train_steps", "1", "--gradient_checkpointing")
    assert "--fp8_base without" not in caplog.text


def rounded_to_float8(tiny_sd, folder, *, text_encoder):
    """A copy of the tiny pipeline, in float32, with the weights --fp8_base trains on: those of the UNet's linear
    and convolution layers (and with `text_encoder` the text encoder's) rounded to float8, but for embeddings."""
    shutil.copytree(tiny_sd, folder)
    parts = [("unet", UNet2DConditionModel)] + [("text_encoder", CLIPTextModel)] * text_encoder
    for name, cls in parts:
        model = cls.from_pretrained(tiny_sd, subfolder=name)
        for layer_name, layer in model.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and "embed" not in layer_name:
                layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn).float()
        model.save_pretrained(folder / name)
    return folder


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet-and-text-encoder"])
def test_fp8_base_trains_the_adapter_that_a_base_rounded_to_float8_trains(tiny_sd, tmp_path, text_encoder):
    # Each layer computes with its float8 weights cast up, exactly: the run is the same, bit for bit, as a plain
    # LoRA run on the rounded weights, gradient checkpointing's recomputation included.
    flags = [*LORA, "--max_train_steps", "3", "--gradient_checkpointing"] + ["--train_text_encoder"] * text_encoder
    train(tiny_sd, tmp_path / "fp8", *flags, "--fp8_base")
    rounded = rounded_to_float8(tiny_sd, tmp_path / "rounded-sd", text_encoder=text_encoder)
    train(rounded, tmp_path / "rounded", *flags)
    train(tiny_sd, tmp_path / "plain", *flags)
    fp8, on_rounded, plain = (load_file(tmp_path / run / WEIGHTS_NAME) for run in ("fp8", "rounded", "plain"))
    assert fp8.keys() == on_rounded.keys() and all(torch.equal(fp8[k], on_rounded[k]) for k in fp8)
    assert any(not torch.equal(fp8[k], plain[k]) for k in fp8)  # and the rounding does change what is learned
    if text_encoder:
        assert any(key.startswith("text_encoder.") for key in fp8)


def test_fp8_base_halves_the_memory_of_sd_v1_4s_frozen_unet_under_fp16():
    # SD v1-4's architecture built on the meta device: its shapes and dtypes, without the memory. The numbers are
    # the ones docs/lora.md gives, in MB, the float32 adapter included.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS["sd-v1-4"]["unet"]).to(torch.float16)
        text_encoder = CLIPTextModel(text_encoder_config("sd-v1-4")).to(torch.float16)
    for model, targets, before, after in [
        (unet, DEFAULT_TARGETS, 1722, 865),
        (text_encoder, TEXT_ENCODER_TARGETS, 247, 162),
    ]:
        add_lora(model, rank=4, alpha=4, dropout=0.0, target_modules=targets)
        assert round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6) == before
        store_in_float8(model, torch.float16)
        assert round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6) == after


def kohya_max_norm(down, up, scale, max_norm):
    """kohya-ss's max-norm step for one adapter, written out: (new down, new up, scaled?, norm after)."""
    norm = ((up @ down) * scale).norm()
    floored = max(norm.item(), max_norm / 2)
    ratio = min(floored, max_norm) / floored
    return down * ratio**0.5, up * ratio**0.5, ratio != 1, norm.item() * ratio


def test_scale_weight_norms_holds_each_adapters_update_to_the_bound_as_kohya_ss_does(tiny_sd, tmp_path):
    # The function: every adapter of a UNet, some of them pushed past the bound, against kohya-ss's formula.
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    add_lora(unet, rank=4, alpha=8, dropout=0.0, target_modules=DEFAULT_TARGETS)
    layers = [module for module in unet.modules() if hasattr(module, "lora_A") and "default" in module.lora_A]
    torch.manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(layers[1:]):  # the first keeps its B of zeros, as a new adapter has it
            layer.lora_B["default"].weight.normal_(std=0.2 if i % 2 else 0.001)  # big and small updates
    expected = [kohya_max_norm(layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone(), 2.0,
                               0.5) for layer in layers]  # fmt: skip
    scaled, mean, largest = max_norm_regularize([unet], 0.5)
    for layer, (down, up, _, _) in zip(layers, expected):
        torch.testing.assert_close(layer.lora_A["default"].weight, down, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, up, rtol=1e-6, atol=0)
    assert scaled.item() == sum(was for _, _, was, _ in expected) and 0 < scaled.item() < len(layers)
    norms = [after for _, _, _, after in expected]
    assert largest.item() == pytest.approx(max(norms), rel=1e-5) and largest.item() <= 0.5 * (1 + 1e-6)
    assert mean.item() == pytest.approx(sum(norms) / len(norms), rel=1e-5)

    # Training: with a learning rate that grows the updates past the bound, the saved adapter stays within it.
    def update_norms(folder):
        state = load_file(folder / WEIGHTS_NAME)
        return [((state[key.replace("lora_A", "lora_B")] @ value) * 2).norm().item()
                for key, value in state.items() if "lora_A" in key]  # fmt: skip

    steep = [*LORA, "--learning_rate", "0.1", "--max_train_steps", "3", "--train_text_encoder"]
    train(tiny_sd, tmp_path / "free", *steep)
    train(tiny_sd, tmp_path / "bounded", *steep, "--scale_weight_norms", "0.02")
    assert max(update_norms(tmp_path / "free")) > 0.02
    assert max(update_norms(tmp_path / "bounded")) <= 0.02 * (1 + 1e-5)
    assert len(update_norms(tmp_path / "bounded")) == len(update_norms(tmp_path / "free"))
    scaled = [value for _, value in logged_losses(tmp_path / "bounded", "lora_keys_scaled")]
    assert len(scaled) == 3 and scaled[-1] > 0
    assert "each update's norm held to at most 0.02" in (tmp_path / "bounded" / "README.md").read_text()
    with pytest.raises(UserError, match="--scale_weight_norms bounds the norms of LoRA adapters, so it needs"):
        train(tiny_sd, tmp_path / "full", "--scale_weight_norms", "1")
