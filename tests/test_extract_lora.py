"""A LoRA extracted from a full fine-tune (sdtoolkit/extract_lora.py): loaded on its base model, it gives the
tuned model's outputs back as far as its rank allows, and says what it can't hold.

The tuned models here are the tiny pipeline with known changes: a change of every adapted layer, which a LoRA of
full rank must give back exactly; a change of rank 2, which rank 2 gives back and rank 1 does not; changes that a
LoRA has no place for. One test extracts from a real training run's checkpoint, as a user runs it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from sdtoolkit.errors import UserError
from sdtoolkit.extract_lora import (
    TEXT_ENCODER_BLOCKS,
    UNET_BLOCKS,
    UNET_CONV_BLOCKS,
    dynamic_rank,
    main,
    target_layers,
)
from sdtoolkit.inference import load_pipeline, lora_sampling
from tests.conftest import installed_toolkit_env, lycoris_file, rank_two_change, train, tuned_copy

CPU = torch.device("cpu")


def shift_layers(blocks, size=0.05):
    """A change of every weight of the layers a LoRA adapts in these blocks."""

    def change(model):
        for layer in target_layers(model, blocks).values():
            layer.weight += size * torch.randn_like(layer.weight)

    return change


def outputs(pipeline):
    """The UNet's prediction and the text encoder's hidden states for one fixed input."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipeline.tokenizer(["a red creature"], return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipeline.text_encoder(ids)[0]
        return pipeline.unet(latents, torch.tensor([500]), text).sample, text


def header(path):
    with safe_open(path, "pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def test_a_lora_of_full_rank_gives_the_tuned_model_back(tiny_sd, tmp_path, capsys):
    tuned = tuned_copy(
        tiny_sd, tmp_path / "tuned", shift_layers(UNET_BLOCKS + UNET_CONV_BLOCKS), shift_layers(TEXT_ENCODER_BLOCKS)
    )
    out = tmp_path / "extracted.safetensors"
    # 64 is at least the rank of every layer's change in the tiny model (the widest is 64 channels).
    main([str(tiny_sd), str(tuned), str(out), "--rank", "64", "--conv_rank", "64", "--clamp_quantile", "1"])
    printed = capsys.readouterr().out
    assert "the LoRA keeps 100.0% of their change" in printed
    assert "Left out" not in printed

    # Given alone, the file loads on the base model its header names, as metrics.py and gradio_app.py load it.
    (unet, text), (tuned_unet, tuned_text) = (
        outputs(load_pipeline(str(out), CPU, torch.float32)),
        outputs(load_pipeline(str(tuned), CPU, torch.float32)),
    )
    base_unet, base_text = outputs(load_pipeline(str(tiny_sd), CPU, torch.float32))
    assert (base_unet - tuned_unet).abs().max() > 0.1 and (base_text - tuned_text).abs().max() > 0.1
    torch.testing.assert_close(unet, tuned_unet, atol=1e-4, rtol=0)
    torch.testing.assert_close(text, tuned_text, atol=1e-4, rtol=0)
    # And by diffusers' own loader, as a user's script loads it: every layer at scale 1 (see low_rank's padding).
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    plain.load_lora_weights(str(out))
    for ours, theirs in zip(outputs(plain), (tuned_unet, tuned_text)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    metadata, tensors = header(out)
    assert metadata["sdtoolkit.model"] == str(tiny_sd)
    assert metadata["ss_network_dim"] == "64" and metadata["ss_network_alpha"] == "64.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "64", "conv_alpha": "64.0"}
    # Layers named as kohya-ss names them, which AUTOMATIC1111 and ComfyUI look up.
    kohya_names = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
    )
    for name in kohya_names:
        assert f"{name}.lora_down.weight" in tensors and f"{name}.alpha" in tensors
    # Every layer has the file's one rank and alpha, narrower layers padded with zeros (see low_rank).
    assert {tensor.shape[0] for key, tensor in tensors.items() if key.endswith("lora_down.weight")} == {64}
    assert {tensor.item() for key, tensor in tensors.items() if key.endswith(".alpha")} == {64.0}


def test_the_rank_keeps_the_largest_directions_and_says_how_much(tiny_sd, tmp_path, capsys):
    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", rank_two_change)
    tuned_unet = outputs(load_pipeline(str(tuned), CPU, torch.float32))[0]

    for rank, clamp in (("2", "1"), ("1", "1"), ("2", "0.99")):
        out = tmp_path / f"rank{rank}-{clamp}.safetensors"
        main([str(tiny_sd), str(tuned), str(out), "--rank", rank, "--clamp_quantile", clamp])
        kept = float(capsys.readouterr().out.split("the LoRA keeps ")[1].split("%")[0])
        unet = outputs(load_pipeline(str(out), CPU, torch.float32))[0]
        if (rank, clamp) == ("2", "1"):
            assert kept == 100.0
            torch.testing.assert_close(unet, tuned_unet, atol=1e-4, rtol=0)
        else:  # one direction of two, or kohya-ss's clamping, keeps less
            assert 40 < kept < 99.9, (rank, clamp, kept)
            assert (unet - tuned_unet).abs().max() > 1e-3
        assert {t.shape[0] for k, t in header(out)[1].items() if k.endswith("lora_down.weight")} == {int(rank)}


def test_several_loras_merge_into_one_at_their_ratios(tiny_sd, tmp_path, capsys):
    """kohya-ss's svd_merge_lora.py: two LoRAs at ratios 0.7 and 0.5, as one LoRA of the rank their sum needs."""
    loras, tuned_unets = [], []
    for seed in (1, 2):
        tuned = tuned_copy(tiny_sd, tmp_path / f"tuned{seed}", rank_two_change, seed=seed)
        tuned_unets.append(UNet2DConditionModel.from_pretrained(tuned / "unet"))
        loras.append(str(tmp_path / f"lora{seed}.safetensors"))
        main([str(tiny_sd), str(tuned), loras[-1], "--rank", "2", "--clamp_quantile", "1"])
    out = tmp_path / "merged.safetensors"
    main([str(tiny_sd), *loras, str(out), "--rank", "4", "--ratios", "0.7", "0.5"])
    assert "lora1.safetensors at 0.7" in capsys.readouterr().out

    # By hand: the base's weights plus 0.7 and 0.5 of the two changes.
    pipeline = load_pipeline(str(tiny_sd), CPU, torch.float32)
    with torch.no_grad():
        for (name, weight), first, second in zip(
            pipeline.unet.named_parameters(), tuned_unets[0].parameters(), tuned_unets[1].parameters()
        ):
            weight += 0.7 * (first - weight) + 0.5 * (second - weight)
    torch.testing.assert_close(
        outputs(load_pipeline(str(out), CPU, torch.float32))[0], outputs(pipeline)[0], atol=1e-4, rtol=0
    )

    with pytest.raises(UserError, match="--ratios gives 1 strengths for 2 LoRAs"):
        main([str(tiny_sd), *loras, str(out), "--ratios", "0.7"])
    with pytest.raises(UserError, match="is a whole model: several tuned models, and --ratios, are for LoRAs"):
        main([str(tiny_sd), loras[0], str(tmp_path / "tuned1"), str(out)])


def test_dynamic_ranks_follow_each_layers_singular_values(tiny_sd, tmp_path, capsys):
    """--dynamic_method (kohya-ss's resize_lora.py): each layer gets the rank its change needs, --rank at most."""
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def unet_change(unet):
        rank_two_change(unet)
        layer = unet.get_submodule(first)  # one layer changed at rank 6
        layer.weight += torch.randn(layer.weight.shape[0], 4) @ torch.randn(4, layer.weight.shape[1]) / 10

    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", unet_change)
    out = tmp_path / "dynamic.safetensors"
    main([str(tiny_sd), str(tuned), str(out), "--rank", "16", "--dynamic_method", "sv_fro", "--dynamic_param",
          "0.9999", "--clamp_quantile", "1"])  # fmt: skip
    assert "at ranks 2 to 6 (sv_fro 0.9999): the LoRA keeps 100.0%" in capsys.readouterr().out
    metadata, tensors = header(out)
    ranks = {key.removesuffix(".lora_down.weight"): t.shape[0] for key, t in tensors.items() if "lora_down" in key}
    name = "lora_unet_" + first.replace(".", "_")
    assert ranks.pop(name) == 6 and set(ranks.values()) == {2}
    # One alpha for every layer, so that every loader applies each at its own scale (see extract).
    assert {tensors[f"{key}.alpha"].item() for key in ranks} == {1.0} and tensors[f"{name}.alpha"].item() == 1.0
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("Dynamic", "1.0")
    # Each layer at its own rank, loaded as the server loads it: the tuned model's output.
    tuned_unet = outputs(load_pipeline(str(tuned), CPU, torch.float32))[0]
    torch.testing.assert_close(outputs(load_pipeline(str(out), CPU, torch.float32))[0], tuned_unet, atol=1e-4, rtol=0)
    # And by diffusers' own loader, as a user's script loads it.
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    plain.load_lora_weights(str(out))
    torch.testing.assert_close(outputs(plain)[0], tuned_unet, atol=1e-4, rtol=0)

    # The three methods on singular values 3, 2, 1, 1 (squares 9, 4, 1, 1 of 15; sums 3, 5, 6, 7 of 7), by hand:
    S = torch.tensor([3.0, 2.0, 1.0, 1.0])
    assert dynamic_rank(S, "sv_fro", 0.9, 4) == 2  # 13/15 of the squares: a norm of 0.93 of the whole
    assert dynamic_rank(S, "sv_fro", 0.95, 4) == 3  # 14/15: 0.966
    assert dynamic_rank(S, "sv_cumulative", 0.8, 4) == 3  # 6/7 = 0.857
    assert dynamic_rank(S, "sv_ratio", 2.5, 4) == 2  # above 3 / 2.5 = 1.2
    assert dynamic_rank(S, "sv_cumulative", 1.0, 3) == 3  # at most 3

    # --rank is the most any layer gets; sv_ratio keeps the directions within a factor of the largest.
    main(
        [str(tiny_sd), str(tuned), str(out), "--rank", "3", "--dynamic_method", "sv_ratio", "--dynamic_param", "1000"]
    )
    ranks = {key: t.shape[0] for key, t in header(out)[1].items() if "lora_down" in key}
    assert ranks.pop(f"{name}.lora_down.weight") == 3 and set(ranks.values()) == {2}
    with pytest.raises(UserError, match="--dynamic_method and --dynamic_param go together"):
        main([str(tiny_sd), str(tuned), str(out), "--dynamic_method", "sv_fro"])
    with pytest.raises(UserError, match="sv_fro takes a --dynamic_param above 0 and at most 1"):
        main([str(tiny_sd), str(tuned), str(out), "--dynamic_method", "sv_fro", "--dynamic_param", "90"])


def test_what_a_lora_cannot_hold_is_named(tiny_sd, tmp_path, capsys):
    def unet_change(unet):
        rank_two_change(unet)
        unet.conv_in.bias += 0.1  # no LoRA layer has a bias

    def text_encoder_change(text_encoder):
        layer = next(iter(target_layers(text_encoder, TEXT_ENCODER_BLOCKS).values()))
        layer.weight += 0.005  # within --min_diff 0.01

    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", unet_change, text_encoder_change)
    scheduler = tuned / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    out = tmp_path / "lora.safetensors"
    main([str(tiny_sd), str(tuned), str(out)])
    printed = capsys.readouterr().out
    assert "Text encoder: unchanged (its largest change, 0.005, is within --min_diff 0.01)" in printed
    assert "Left out: 2 other changed tensors that a LoRA has no place for (the most changed: conv_in.bias)" in printed
    metadata, tensors = header(out)
    assert not any(key.startswith("lora_te_") for key in tensors)
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.prediction_type"] == "v"
    # Loaded on the base model, it samples as the tuned model does: it predicts v.
    assert lora_sampling(str(out))["prediction_type"] == "v_prediction"

    # A smaller --min_diff takes the text encoder's change in.
    main([str(tiny_sd), str(tuned), str(out), "--min_diff", "0.001"])
    assert "Text encoder: 1 changed layers of" in capsys.readouterr().out
    assert any(key.startswith("lora_te_") for key in header(out)[1])


def test_bad_input_is_one_line(tiny_sd, tmp_path):
    out = str(tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match="same weights .* nothing to extract"):
        main([str(tiny_sd), str(tiny_sd), out])
    assert not os.path.exists(out)
    with pytest.raises(UserError, match="must end in .safetensors"):
        main([str(tiny_sd), str(tiny_sd), str(tmp_path / "lora.pt")])
    with pytest.raises(UserError, match="--rank and --conv_rank must be at least 1"):
        main([str(tiny_sd), str(tiny_sd), out, "--rank", "0"])
    with pytest.raises(UserError, match="--model_org .* the first argument here"):
        main(["--model_org", str(tiny_sd), "--model_tuned", str(tiny_sd), "--save_to", out])

    # A model of another architecture: the tiny UNet with one ResNet block per level, not two.
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    config = UNet2DConditionModel.load_config(other / "unet")
    UNet2DConditionModel.from_config({**config, "layers_per_block": 1}).save_pretrained(other / "unet")
    with pytest.raises(UserError, match="the two models' UNets differ in architecture"):
        main([str(tiny_sd), str(other), out])

    # A LoRA is no base model.
    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", rank_two_change)
    main([str(tiny_sd), str(tuned), out])
    with pytest.raises(UserError, match="the base model .* is a LoRA; give the model it applies to"):
        main([out, str(tuned), str(tmp_path / "again.safetensors")])


def test_a_lora_at_another_rank_and_a_loha_as_a_lora(tiny_sd, tmp_path, capsys):
    """A LoRA (or a LoHa) as the tuned model: merged into the base model and taken apart again."""

    def small_text_encoder_change(text_encoder):  # of rank 1, within --min_diff's 0.01
        layer = next(iter(target_layers(text_encoder, TEXT_ENCODER_BLOCKS).values()))
        layer.weight += 0.005 * torch.outer(torch.rand(layer.weight.shape[0]), torch.rand(layer.weight.shape[1]))

    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", rank_two_change, small_text_encoder_change)
    tuned_outputs = outputs(load_pipeline(str(tuned), CPU, torch.float32))
    wide, narrow = tmp_path / "rank8.safetensors", tmp_path / "rank2.safetensors"
    main([str(tiny_sd), str(tuned), str(wide), "--rank", "8", "--clamp_quantile", "1", "--min_diff", "0.001"])
    capsys.readouterr()
    main([str(tiny_sd), str(wide), str(narrow), "--new_rank", "2"])  # kohya-ss's resize flag; no clamping
    printed = capsys.readouterr().out
    assert "to be taken apart again: " in printed and "rank8.safetensors at 1" in printed
    # The LoRA's text encoder adapter is taken in, though its change is within --min_diff: a LoRA's change is no
    # rounding.
    assert "Text encoder: 1 changed layers of" in printed
    assert {t.shape[0] for k, t in header(narrow)[1].items() if k.endswith("lora_down.weight")} == {2}
    for ours, theirs in zip(outputs(load_pipeline(str(narrow), CPU, torch.float32)), tuned_outputs):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    # A LoHa's update, (w1_a @ w1_b) * (w2_a @ w2_b), has rank up to 16 at rank 4: a LoRA of rank 64 holds it.
    base = load_pipeline(str(tiny_sd), CPU, torch.float32)
    deltas = lycoris_file(base, "LoHa", tmp_path / "loha.safetensors")
    main([str(tiny_sd), str(tmp_path / "loha.safetensors"), str(tmp_path / "from-loha.safetensors"), "--rank", "64",
          "--conv_rank", "64", "--clamp_quantile", "1"])  # fmt: skip
    with torch.no_grad():
        for (part, module_path), delta in deltas.items():
            getattr(base, part).get_submodule(module_path).weight += delta
    converted = load_pipeline(str(tmp_path / "from-loha.safetensors"), CPU, torch.float32)
    for ours, theirs in zip(outputs(converted), outputs(base)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_lora_checkpoint_gives_its_ema_weights(tiny_sd, tmp_path):
    """A LoRA checkpoint as the tuned model: its adapter's EMA weights, as metrics.py and the server load it."""
    run = tmp_path / "run"
    train(tiny_sd, run, "--lora_rank", "4", "--use_ema", "--learning_rate", "1e-2", "--max_train_steps", "2",
          "--checkpointing_steps", "2")  # fmt: skip
    out = tmp_path / "from-checkpoint.safetensors"
    main([str(tiny_sd), str(run / "checkpoint-2"), str(out), "--rank", "4"])
    averaged = outputs(load_pipeline(str(run / "checkpoint-2"), CPU, torch.float32))[0]  # the EMA weights
    trained = outputs(load_pipeline(str(tiny_sd), CPU, torch.float32, lora=str(run / "checkpoint-2")))[0]
    assert (averaged - trained).abs().max() > 1e-3  # the average is not the last step's weights
    torch.testing.assert_close(outputs(load_pipeline(str(out), CPU, torch.float32))[0], averaged, atol=1e-4, rtol=0)


def test_a_full_checkpoint_gives_its_ema_weights_or_with_no_ema_its_trained_ones(tiny_sd, tmp_path):
    run = tmp_path / "run"
    train(tiny_sd, run, "--use_ema", "--train_text_encoder", "--learning_rate", "1e-3", "--max_train_steps", "2",
          "--checkpointing_steps", "2")  # fmt: skip
    # One layer of each model: its LoRA's update is the change of the weights asked for (full rank, no clamping).
    layers = [("unet", "diffusion_pytorch_model", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
              ("text_encoder", "model", "encoder.layers.0.self_attn.q_proj")]  # fmt: skip
    for flags, kind in (([], "_ema"), (["--no-ema"], ""), (["--ema"], "_ema")):
        out = tmp_path / f"lora{kind}.safetensors"
        main([str(tiny_sd), str(run / "checkpoint-2"), str(out), "--rank", "64", "--clamp_quantile", "1",
              "--min_diff", "0", *flags])  # fmt: skip
        tensors = header(out)[1]
        for model, weights, layer in layers:
            name = ("lora_unet_" if model == "unet" else "lora_te_text_model_") + layer.replace(".", "_")
            up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
            tuned = load_file(run / "checkpoint-2" / f"{model}{kind}" / f"{weights}.safetensors")[f"{layer}.weight"]
            change = tuned - load_file(pathlib.Path(tiny_sd) / model / f"{weights}.safetensors")[f"{layer}.weight"]
            torch.testing.assert_close(tensors[f"{name}.alpha"] / len(down) * up @ down, change, atol=1e-6, rtol=0)
    assert not torch.equal(header(tmp_path / "lora.safetensors")[1][f"{name}.lora_up.weight"], up)  # they differ
    with pytest.raises(UserError, match="--ema and --no-ema are for a full fine-tune's checkpoint-N folder"):
        main([str(tiny_sd), str(run), str(out), "--no-ema"])  # the saved pipeline
    with pytest.raises(UserError, match="--ema and --no-ema are for a full fine-tune's checkpoint; a LoRA checkpoint"):
        main([str(tiny_sd), str(out), str(tmp_path / "resized.safetensors"), "--no-ema"])  # a LoRA
    train(tiny_sd, tmp_path / "plain", "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(UserError, match=r"checkpoint-1 has no unet_ema/ \(the run had no --use_ema\): drop --ema"):
        main([str(tiny_sd), str(tmp_path / "plain" / "checkpoint-1"), str(out), "--ema"])


def test_from_a_training_runs_checkpoint_in_the_users_folder(tiny_sd, tmp_path):
    """The user path: a full fine-tune, then the extraction run from the user's own folder as a module of the
    toolkit make setup installed, given relative paths, and its LoRA served as a model of its own."""
    train(tiny_sd, tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "1e-3")
    shutil.copytree(tiny_sd, tmp_path / "base")
    result = subprocess.run(
        [sys.executable, "-m", "sdtoolkit.extract_lora", "base", "run/checkpoint-2", "run-lora.safetensors",
         "--dim", "8"],
        capture_output=True, text=True, cwd=tmp_path, env=installed_toolkit_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "UNet: 72 changed layers of 72 at rank 8" in result.stdout
    assert "Wrote run-lora.safetensors" in result.stdout
    # The header names the base model by its absolute path, so the file loads from anywhere.
    assert header(tmp_path / "run-lora.safetensors")[0]["sdtoolkit.model"] == str(tmp_path / "base")
    pipeline = load_pipeline(str(tmp_path / "run-lora.safetensors"), CPU, torch.float32)
    assert pipeline.get_active_adapters()
