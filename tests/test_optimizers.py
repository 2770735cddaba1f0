"""--optimizer: Adafactor and Prodigy beside AdamW. Each trains, keeps the optimizer state it should, resumes bit
for bit, and a checkpoint resumes only with the optimizer that wrote it. And the learning rate schedules' shapes
(--lr_num_cycles, --lr_power)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from sdtoolkit.errors import UserError
from sdtoolkit.fixtures import PRESETS
from tests.conftest import logged_losses, train, train_whole_and_resumed

UNET = "unet/diffusion_pytorch_model.safetensors"


def expected_state_bytes(weights, optimizer):
    """The float32 optimizer state for these starting weights: AdamW keeps two moments per weight; Prodigy its two
    moments, s, and the starting weights (of a tensor of zeros, one number, not counted); torch's Adafactor a second moment
    alone, factored over a tensor's last two dimensions into a row and a column (a 3x3 convolution keeps 6 values
    per 9 weights). `weights` may be on the meta device, as real weights: none all zeros."""
    if optimizer == "adamw":
        return 8 * sum(w.numel() for w in weights)
    if optimizer == "prodigy":
        return sum(12 * w.numel() + 4 * (w.numel() if w.is_meta or w.any() else 0) for w in weights)
    return 4 * sum(w.numel() // w.shape[-1] + w.numel() // w.shape[-2] if w.dim() >= 2 else w.numel() for w in weights)


@pytest.mark.parametrize(
    "optimizer, extra",
    [("adamw", []), ("adafactor", []), ("prodigy", ["--learning_rate", "1", "--prodigy_beta3", "0.99",
                                                   "--no-prodigy_decouple"])],
)  # fmt: skip
def test_each_optimizer_trains_keeps_its_state_and_resumes_bitwise(tiny_sd, tmp_path, optimizer, extra):
    flags = ["--optimizer", optimizer.capitalize(), "--learning_rate", "1e-4", *extra, "--checkpointing_steps", "2"]
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    base, whole, parts = (
        load_file(Path(folder) / UNET) for folder in (tiny_sd, tmp_path / "whole", tmp_path / "parts")
    )
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert any(not torch.equal(whole[k], base[k]) for k in whole)
    # The state a checkpoint holds (per-weight tensors, not step counters) is what the optimizer should keep.
    state = torch.load(tmp_path / "whole" / "checkpoint-2" / "optimizer.bin", weights_only=True)
    stored = sum(
        t.numel() * t.element_size()
        for s in state["state"].values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    assert stored == expected_state_bytes(base.values(), optimizer)
    if optimizer == "prodigy":  # its own flags reach it
        group = state["param_groups"][0]
        names = ("lr", "beta3", "decouple", "safeguard_warmup", "use_bias_correction")
        assert [group[name] for name in names] == [1, 0.99, False, True, True]  # the last two are off in prodigyopt
    identity = json.loads((tmp_path / "whole" / "checkpoint-2" / "training_state.json").read_text())
    assert identity["optimizer"] == f"--optimizer {optimizer}"


def test_the_optimizer_state_of_sd_v1_4s_unet_as_the_docs_give_it():
    # The figures in docs/speed-and-memory.md, from the rule the test above checks on the tiny UNet's checkpoints.
    with init_empty_weights():
        unet = UNet2DConditionModel(**PRESETS["sd-v1-4"]["unet"])
    weights = list(unet.parameters())
    gigabytes = {
        name: round(expected_state_bytes(weights, name) / 1e9, 2) for name in ("adamw", "adafactor", "prodigy")
    }
    assert gigabytes == {"adamw": 6.88, "adafactor": 1.83, "prodigy": 13.75}


def test_a_checkpoint_resumes_only_with_its_optimizer_and_contradictions_are_one_line(tiny_sd, tmp_path, monkeypatch):
    train(
        tiny_sd, tmp_path / "out", "--optimizer", "adafactor", "--max_train_steps", "2", "--checkpointing_steps", "2"
    )
    with pytest.raises(UserError, match="was trained with --optimizer adafactor, and its optimizer state needs them"):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match="--use_8bit_adam is 8-bit AdamW, and this run asks for --optimizer prodigy"):
        train(tiny_sd, tmp_path / "other", "--optimizer", "prodigy", "--use_8bit_adam")
    with pytest.raises(UserError, match="--optimizer prodigy takes one learning rate .* drop --text_encoder_lr"):
        train(tiny_sd, tmp_path / "other", "--optimizer", "prodigy", "--lora_rank", "4", "--train_text_encoder",
              "--learning_rate", "1", "--text_encoder_lr", "0.5")  # fmt: skip
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "prodigyopt" else real(name))
    with pytest.raises(UserError, match="--optimizer prodigy needs prodigyopt: pip install prodigyopt"):
        train(tiny_sd, tmp_path / "other", "--optimizer", "prodigy")


@pytest.mark.parametrize(
    "flags, factor",
    [
        # Two cosine cycles in 8 steps: from the top down to 0 by step 4, then again from the top.
        (["--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2"],
         lambda k: 0.5 * (1 + math.cos(math.pi * ((2 * k / 8) % 1))) if k < 8 else 0.0),
        # A quadratic decay down to diffusers' floor of 1e-7.
        (["--lr_scheduler", "polynomial", "--lr_power", "2"],
         lambda k: ((1e-3 - 1e-7) * (1 - k / 8) ** 2 + 1e-7) / 1e-3),
    ],
    ids=["cosine-restarts", "polynomial"],
)  # fmt: skip
def test_the_learning_rate_follows_the_schedules_shape(tiny_sd, tmp_path, flags, factor):
    train(tiny_sd, tmp_path, *flags, "--lr_warmup_steps", "0", "--max_train_steps", "8", "--learning_rate", "1e-3")
    logged = [lr for _, lr in logged_losses(tmp_path, tag="lr")]
    assert logged == pytest.approx([1e-3 * factor(k) for k in range(1, 9)], rel=1e-5, abs=1e-12)


def test_a_schedules_shape_flag_for_another_schedule_is_one_line(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="--lr_num_cycles shapes --lr_scheduler cosine_with_restarts, not cosine"):
        train(tiny_sd, tmp_path, "--lr_scheduler", "cosine", "--lr_num_cycles", "3", "--max_train_steps", "1")
    with pytest.raises(UserError, match="--lr_power must be a positive number, got 0.0"):
        train(tiny_sd, tmp_path, "--lr_scheduler", "polynomial", "--lr_power", "0", "--max_train_steps", "1")
