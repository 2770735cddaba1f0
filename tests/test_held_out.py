"""--validation_split: images held out of training, and the loss on them at fixed timesteps and noise."""

import contextlib
import json
import logging
import random

import pytest
import torch
from accelerate import PartialState
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torchvision.transforms import InterpolationMode

import train_text_to_image
from sdtoolkit.buckets import assign_buckets, make_buckets
from sdtoolkit.errors import UserError
from sdtoolkit.held_out import TIMESTEPS, HeldOutLoss, compare, split_held_out
from tests.conftest import DEMO_DATA, logged_losses, mixed_aspect_folder, reset_accelerate_state, train, train_args

RUN = ["--validation_split", "0.25", "--max_train_steps", "15", "--checkpointing_steps", "10", "--use_ema",
       "--learning_rate", "1e-3", "--train_batch_size", "4"]  # fmt: skip


def held_out_of(tiny_sd, pipeline, batch_size, *flags, data=DEMO_DATA, resolution=32, buckets=None):
    """The held-out images of a `--validation_split 0.25` run (or as `flags` say) on the bundled data (or `data`),
    encoded by the pipeline's VAE and text encoder, as training encodes them: at `resolution`, or at the bucket
    of `buckets` nearest each image's shape."""
    flags = flags or ("--validation_split", "0.25")
    args = train_text_to_image.parse_args(train_args(tiny_sd, "unused", *flags, data=data))
    PartialState()  # for the lines loading a caption folder logs
    held_out_rows, sizes = train_text_to_image.load_training_dataset(args)[-1]
    reset_accelerate_state()
    return HeldOutLoss(
        held_out_rows, image_column="image", caption_column="text", resolution=resolution,
        interpolation=InterpolationMode.LANCZOS, tokenizer=pipeline.tokenizer, vae=pipeline.vae,
        text_encoder=pipeline.text_encoder, batch_size=batch_size, device="cpu", dtype=torch.float32,
        sizes=None if buckets is None else [buckets[b] for b in assign_buckets(sizes, buckets)[0]],
    )  # fmt: skip


def test_the_split_is_the_same_whatever_the_order_and_keeps_copies_together():
    digests = [f"{i:02d}" for i in range(20)] + ["05", "05", "17"]  # three copies of image 05, two of 17
    training, held = split_held_out(digests, 0.2)
    assert sorted({digests[i] for i in held}) == ["00", "01", "02", "03"]  # 20% of the 20 distinct images
    assert len(training) + len(held) == len(digests) and not {digests[i] for i in training} & {
        digests[i] for i in held
    }
    shuffled = random.Random(0).sample(digests, len(digests))
    assert sorted(shuffled[i] for i in split_held_out(shuffled, 0.2)[1]) == sorted(digests[i] for i in held)
    # Copies go together: holding out "05" holds out all three.
    training, held = split_held_out(digests, 0.3)
    assert [digests[i] for i in held].count("05") == 3
    # A small share of a few images still holds one out; all of them is refused.
    assert len(split_held_out(digests[:5], 0.01)[1]) == 1
    with pytest.raises(UserError, match="would hold out all 3 distinct images"):
        split_held_out(["a", "b", "c"], 0.9)


def test_the_held_out_loss_falls_as_the_model_learns_measured_on_the_weights_the_run_saves(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, *RUN)

    # Measured at the start, at the checkpoint and at the end (not a checkpoint: after the loop), into the
    # checkpoint's state and TensorBoard, per timestep too.
    state = json.loads((out / "checkpoint-10" / "training_state.json").read_text())
    assert [step for step, _ in state["validation_losses"]] == [0, 10]
    logged = logged_losses(out, tag="validation_loss")
    assert [step for step, _ in logged] == [0, 10, 15]
    assert [value for _, value in logged[:2]] == pytest.approx([value for _, value in state["validation_losses"]])
    for t in TIMESTEPS:
        assert len(logged_losses(out, tag=f"validation_loss/t={t}")) == 3
    # 8 of the 32 images are held out and never trained on.
    assert state["data_rows"] == 24
    # Training lowers the loss on images it never saw (the tiny random UNet learns the noise's statistics).
    (_, base), (_, final) = logged[0], logged[-1]
    assert final < 0.8 * base
    # Image by image, the change is beyond what another draw of 8 held-out images could give: the card says so.
    card = (out / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("* Held-out loss (0.25 of the images): "))
    assert f": {base:.5f} at step 0, {final:.5f} at step 15 (lowest {final:.5f} at step 15);" in line
    assert line.endswith(": better")

    # The final value, measured in training on the EMA weights, is what the saved UNet measures afterwards,
    # and the measurement gives the same numbers every time.
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    held_out = held_out_of(tiny_sd, pipeline, batch_size=3)
    assert len(held_out) == 8
    again, per_image = held_out(pipeline.unet, pipeline.scheduler, contextlib.nullcontext)
    assert again["validation_loss"] == pytest.approx(final, rel=1e-5) and len(per_image) == 8
    assert held_out(pipeline.unet, pipeline.scheduler, contextlib.nullcontext) == (again, per_image)


def test_with_buckets_the_held_out_images_are_measured_at_their_buckets(tiny_sd, tmp_path, caplog):
    data = mixed_aspect_folder(tmp_path / "data")  # 10 images of 5 shapes, one smaller than every bucket
    flags = ["--resolution", "64", "--aspect_buckets", "--bucket_step", "16", "--min_bucket_side", "32",
             "--max_bucket_side", "128", "--bucket_no_upscale", "--validation_split", "0.3"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", *flags, "--max_train_steps", "2", data=data)
    # 3 held out, each at its bucket; --bucket_no_upscale leaves no held-out image out.
    assert "--validation_split: held-out images by bucket (width x height: images): " in caplog.text
    final = logged_losses(tmp_path / "out", tag="validation_loss")[-1][1]
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    buckets = make_buckets(resolution=64, step=16, min_side=32, max_side=128)
    at_buckets = held_out_of(tiny_sd, pipeline, 2, *flags, data=data, resolution=64, buckets=buckets)
    shapes = {tuple(group.latents.shape[2:]) for group in at_buckets.groups}
    assert len(at_buckets) == 3 and any(h != w for h, w in shapes)  # a portrait or landscape bucket among them
    losses, per_image = at_buckets(pipeline.unet, pipeline.scheduler, contextlib.nullcontext)
    assert losses["validation_loss"] == pytest.approx(final, rel=1e-5)
    # Each image's loss is its own, whichever shape's batch measured it: recomputed here one image at a time.
    expected = [0.0] * 3
    for rows, latents, embeddings, *_, noise in at_buckets.groups:
        for position, row in enumerate(rows):
            for t, timestep_noise in zip(TIMESTEPS, noise):
                timestep = torch.tensor([t])
                eps = timestep_noise[position : position + 1]
                noisy = pipeline.scheduler.add_noise(latents[position : position + 1], eps, timestep)
                with torch.no_grad():
                    pred = pipeline.unet(noisy, timestep, embeddings[position : position + 1]).sample
                expected[row] += torch.nn.functional.mse_loss(pred, eps).item() / len(TIMESTEPS)
    assert per_image == pytest.approx(expected, rel=1e-4)
    as_squares = held_out_of(tiny_sd, pipeline, 2, *flags, data=data, resolution=64)
    assert (
        abs(as_squares(pipeline.unet, pipeline.scheduler, contextlib.nullcontext)[0]["validation_loss"] - final) > 1e-4
    )


class ProcessOfTwo:
    """What HeldOutLoss uses of an accelerator, as process `index` of two; its reduce keeps the process's own sum."""

    num_processes, device = 2, "cpu"

    def __init__(self, index):
        self.process_index = index

    def reduce(self, tensor, reduction):
        return tensor


def test_processes_share_the_measurement_batch_by_batch_and_call_the_unet_equally_often(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    held_out = held_out_of(tiny_sd, pipeline, batch_size=3)  # 8 images: batches of 3, 3 and 2
    calls = []
    forward = pipeline.unet.forward
    pipeline.unet.forward = lambda *args, **kwargs: calls.append(len(args[0])) or forward(*args, **kwargs)
    alone = held_out(pipeline.unet, pipeline.scheduler, contextlib.nullcontext)[1]
    assert calls == [3, 3, 2] * len(TIMESTEPS)
    shares = []
    for process in (0, 1):
        calls.clear()
        shares.append(held_out(pipeline.unet, pipeline.scheduler, contextlib.nullcontext, ProcessOfTwo(process))[1])
        # Process 0 measures batches 1 and 3, process 1 batch 2 and, to call the UNet as often, batch 1 again.
        assert calls == ([3, 2] if process == 0 else [3, 3]) * len(TIMESTEPS)
    # Each image's loss comes from one process (the others add 0): the sum is the one-process measurement.
    assert [a + b for a, b in zip(*shares)] == pytest.approx(alone, rel=1e-12)
    assert all((a == 0) != (b == 0) for a, b in zip(*shares))


def test_with_v_prediction_every_measurement_is_a_v_prediction_loss(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, "--validation_split", "0.25", "--max_train_steps", "1", "--prediction_type", "v_prediction")
    first = logged_losses(out, tag="validation_loss")[0][1]
    # The base model's loss on the held-out images, measured both ways: the run's first value is the v one.
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    held_out = held_out_of(tiny_sd, base, batch_size=4)
    scheduler = DDPMScheduler.from_config(base.scheduler.config)  # training's scheduler
    epsilon = held_out(base.unet, scheduler, contextlib.nullcontext)[0]["validation_loss"]
    scheduler.register_to_config(prediction_type="v_prediction")
    v = held_out(base.unet, scheduler, contextlib.nullcontext)[0]["validation_loss"]
    assert first == pytest.approx(v, rel=1e-6) and abs(v - epsilon) > 1e-3


def test_a_lora_run_measures_its_adapter(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, *RUN, "--lora_rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "20")
    losses = json.loads((out / "checkpoint-20" / "training_state.json").read_text())["validation_losses"]
    assert [step for step, _ in losses] == [0, 10, 20]
    assert losses[-1][1] < 0.95 * losses[0][1]  # a rank-4 adapter's EMA moves less in 20 steps


@pytest.mark.parametrize("lora", [["--lora_rank", "4"], []], ids=["lora", "whole"])
def test_a_text_encoder_that_trains_is_measured_as_it_is_at_each_measurement(tiny_sd, tmp_path, lora):
    # Only the text encoder (its adapter, or all its weights) moves (the UNet's learning rate is next to nothing):
    # the held-out loss changes only if each measurement encodes the captions with the text encoder as it is then.
    out = tmp_path / "out"
    train(tiny_sd, out, "--validation_split", "0.25", "--max_train_steps", "4", "--checkpointing_steps", "4", *lora,
          "--learning_rate", "1e-12", "--train_text_encoder", "--text_encoder_lr", "1e-1")  # fmt: skip
    losses = json.loads((out / "checkpoint-4" / "training_state.json").read_text())["validation_losses"]
    assert [step for step, _ in losses] == [0, 4]
    assert abs(losses[1][1] - losses[0][1]) > 1e-3, losses


def test_the_comparison_tells_a_change_from_chance():
    before = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.3, 0.7]
    assert compare(before, [b - 0.1 for b in before])[3] == "better"
    assert compare(before, [b + 0.1 for b in before])[3] == "worse"
    # Some images better, some worse by as much: the mean moved, but another draw of images could undo it.
    mixed = [b + (0.3 if i % 2 else -0.32) for i, b in enumerate(before)]
    change, low, high, verdict = compare(before, mixed)
    assert change == pytest.approx(-0.01) and low < 0 < high and verdict == "no difference this run can detect"


@pytest.mark.parametrize("share", ["1", "-0.1"])
def test_a_share_out_of_range_gets_one_line(tiny_sd, tmp_path, share):
    with pytest.raises(UserError, match=f"--validation_split must be at least 0 and less than 1, got {float(share)}"):
        train(tiny_sd, tmp_path / "out", "--validation_split", share)


def test_a_run_resumed_from_a_checkpoint_without_held_out_losses_measures_from_there(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    reset_accelerate_state()
    train(tiny_sd, out, "--max_train_steps", "2", "--validation_split", "0.25", "--resume_from_checkpoint", "latest")
    assert [step for step, _ in logged_losses(out, tag="validation_loss")] == [2]
    assert "* Held-out loss (0.25 of the images): " in (out / "README.md").read_text()
