"""kohya-ss's loss and noise options: --loss_type (l1, huber, smooth_l1) with --huber_schedule, --huber_c and
--huber_scale, --debiased_estimation_loss, --scale_v_pred_loss_like_noise_pred, --v_pred_like_loss,
--min_timestep/--max_timestep, --multires_noise_iterations and --adaptive_noise_scale."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

import train_text_to_image
from sdtoolkit.data import multires_noise
from sdtoolkit.errors import UserError
from sdtoolkit.losses import debiased_weights, huber_thresholds, loss_per_element
from tests.conftest import DEMO_DATA, logged_losses, train

# SD v1-4's noise schedule.
SCHEDULER = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_huber_losses_are_squared_below_the_threshold_and_linear_above_it():
    # In float64: in float32, sqrt(e^2 + c^2) - c loses an error of 0.001 to rounding (as in kohya-ss's own).
    target, c = torch.zeros(1, 1, 1, 3, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    small = torch.tensor([[[[0.001, -0.002, 0.003]]]], dtype=torch.float64)
    large = torch.tensor([[[[40.0, -50.0, 60.0]]]], dtype=torch.float64)
    # Below c: the squared error (huber), or it over c (smooth_l1).
    torch.testing.assert_close(loss_per_element(small, target, "huber", c), small**2, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss_per_element(small, target, "smooth_l1", c), small**2 / 0.5, rtol=1e-4, atol=0)
    # Far above c: 2c|e| - 2c^2 (huber), 2|e| - 2c (smooth_l1).
    torch.testing.assert_close(loss_per_element(large, target, "huber", c), 2 * 0.5 * large.abs() - 0.5, rtol=1e-4,
                               atol=0)  # fmt: skip
    torch.testing.assert_close(loss_per_element(large, target, "smooth_l1", c), 2 * large.abs() - 1, rtol=1e-4,
                               atol=0)  # fmt: skip
    torch.testing.assert_close(loss_per_element(large, target, "l1"), large.abs())
    torch.testing.assert_close(loss_per_element(large, target, "l2"), large**2)
    # So an outlier pulls on the prediction with a force of at most 2c, where the squared error's grows with it.
    pred = large.clone().requires_grad_()
    loss_per_element(pred, target, "huber", c).sum().backward()
    assert pred.grad.abs().max() < 2 * 0.5 and pred.grad.abs().min() > 0.99 * 2 * 0.5
    # Each example has its own threshold.
    two = loss_per_element(torch.full((2, 1, 1, 1), 3.0), torch.zeros(2, 1, 1, 1), "huber", torch.tensor([0.1, 1.0]))
    assert two.flatten().tolist() == pytest.approx([2 * 0.1 * (math.sqrt(9.01) - 0.1), 2 * (math.sqrt(10) - 1)])


def test_the_huber_threshold_schedules():
    t = torch.tensor([0, 250, 500, 999])
    assert huber_thresholds(SCHEDULER, t, "constant", 0.1).tolist() == pytest.approx([0.1] * 4)
    assert huber_thresholds(SCHEDULER, t, "exponential", 0.1).tolist() == pytest.approx(
        [0.1 ** (step / 1000) for step in t.tolist()]
    )
    # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - alpha_bar) / alpha_bar): near 1 at little noise, near c at
    # pure noise.
    alpha_bar = SCHEDULER.alphas_cumprod[t].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    expected = (0.9 / (1 + sigma) ** 2 + 0.1).tolist()
    got = huber_thresholds(SCHEDULER, t, "snr", 0.1).tolist()
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[0] > 0.9 and got[-1] < 0.11 and got == sorted(got, reverse=True)


def test_debiased_estimation_weighs_by_one_over_the_square_root_of_snr():
    t = torch.tensor([0, 10, 500, 999])
    alpha_bar = SCHEDULER.alphas_cumprod[t].double()
    snr = (alpha_bar / (1 - alpha_bar)).clamp(max=1000)  # timestep 0's SNR (1175) capped at 1000
    assert snr[0] == 1000
    assert debiased_weights(SCHEDULER, t).tolist() == pytest.approx((1 / snr.sqrt()).tolist(), rel=1e-5)
    v = DDPMScheduler.from_config(SCHEDULER.config, prediction_type="v_prediction")
    assert debiased_weights(v, t).tolist() == pytest.approx((1 / (snr + 1)).tolist(), rel=1e-5)


@pytest.fixture
def step_inputs(monkeypatch):
    """The UNet's predictions and the latents, noise and timesteps of every add_noise call, recorded."""
    recorded = {"pred": [], "latents": [], "noise": [], "timesteps": []}
    forward, add_noise = UNet2DConditionModel.forward, DDPMScheduler.add_noise

    def recorded_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        recorded["pred"].append(output[0].detach().clone())
        return output

    def recorded_add_noise(self, samples, noise, timesteps):
        recorded["latents"].append(samples.detach().clone())
        recorded["noise"].append(noise.detach().clone())
        recorded["timesteps"].append(timesteps.clone())
        return add_noise(self, samples, noise, timesteps)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recorded_forward)
    monkeypatch.setattr(DDPMScheduler, "add_noise", recorded_add_noise)
    return recorded


def expected_loss(pred, latents, noise, timesteps, flags):
    """The step's loss, computed here from kohya-ss's formulas, from what the step fed the UNet and got back."""
    alpha_bar = SCHEDULER.alphas_cumprod[timesteps].double()
    target = noise.double()  # epsilon prediction: the target is the noise
    if flags.get("--prediction_type") == "v_prediction":  # v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) latents
        shape = (-1, 1, 1, 1)
        target = alpha_bar.sqrt().view(shape) * target - (1 - alpha_bar).sqrt().view(shape) * latents.double()
    error = (pred.double() - target).flatten(1)
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    c = torch.full_like(alpha_bar, float(flags.get("--huber_c", 0.1)))
    if flags.get("--huber_schedule", "snr") == "snr":
        c = (1 - c) / (1 + sigma) ** 2 + c
    elif flags["--huber_schedule"] == "exponential":
        c = c ** (timesteps.double() / 1000) * float(flags.get("--huber_scale", 1))
    else:
        c = c * float(flags.get("--huber_scale", 1))
    c = c[:, None]
    loss = {
        "l2": error**2,
        "l1": error.abs(),
        "huber": 2 * c * ((error**2 + c**2).sqrt() - c),
        "smooth_l1": 2 * ((error**2 + c**2).sqrt() - c),
    }[flags.get("--loss_type", "l2")].mean(dim=1)
    snr = (1 / sigma**2).clamp(max=1000)
    if "--scale_v_pred_loss_like_noise_pred" in flags:
        loss = loss * snr / (snr + 1)
    if "--v_pred_like_loss" in flags:
        loss = loss + float(flags["--v_pred_like_loss"]) * loss / (snr / (snr + 1))
    if "--debiased_estimation_loss" in flags:
        loss = loss / snr.sqrt()
    return loss.mean().item()


@pytest.mark.parametrize(
    "flags",
    [
        {"--loss_type": "huber"},  # kohya-ss's defaults: the snr schedule, c 0.1
        {"--loss_type": "smooth_l1", "--huber_schedule": "exponential", "--huber_c": "0.3"},
        {
            "--loss_type": "huber",
            "--huber_schedule": "constant",
            "--huber_c": "0.05",
            "--debiased_estimation_loss": "",
        },
        {"--loss_type": "l1"},
        {"--debiased_estimation_loss": ""},
        {"--loss_type": "smooth_l1", "--huber_schedule": "exponential", "--huber_c": "0.3", "--huber_scale": "2"},
        {"--loss_type": "huber", "--huber_schedule": "constant", "--huber_scale": "0.5"},
        {"--prediction_type": "v_prediction", "--scale_v_pred_loss_like_noise_pred": ""},
        {"--v_pred_like_loss": "0.1"},
    ],
    ids=[
        "huber-snr",
        "smooth-l1-exponential",
        "huber-constant-debiased",
        "l1",
        "l2-debiased",
        "smooth-l1-exponential-scaled",
        "huber-constant-scaled",
        "v-scaled-like-noise",
        "plus-v-like-loss",
    ],
)
def test_the_training_step_takes_the_loss_it_is_asked_for(tiny_sd, tmp_path, step_inputs, flags):
    # The logged loss of the first step is the loss of the UNet's predictions against the step's noise, computed
    # here from the formulas, at the step's timesteps.
    argv = [item for flag, value in flags.items() for item in (flag, value) if item]
    train(tiny_sd, tmp_path, "--max_train_steps", "1", "--train_batch_size", "4", "--center_crop", *argv)
    pred, noise, timesteps = step_inputs["pred"][0], step_inputs["noise"][0], step_inputs["timesteps"][0]
    latents = step_inputs["latents"][0]
    assert len(set(timesteps.tolist())) == 4
    (_, logged), *_ = logged_losses(tmp_path)
    assert logged == pytest.approx(expected_loss(pred, latents, noise, timesteps, flags), rel=1e-5)
    # Not the loss without the option (the squared error, or the v-prediction's without its weight).
    without = {key: value for key, value in flags.items() if key == "--prediction_type"}
    assert logged != pytest.approx(expected_loss(pred, latents, noise, timesteps, without), rel=1e-3)
    card = (tmp_path / "README.md").read_text()
    assert "* Loss and noise: " in card


def test_timesteps_are_drawn_from_the_range_asked_for(tiny_sd, tmp_path, step_inputs):
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--train_batch_size", "4", "--center_crop",
          "--min_timestep", "200", "--max_timestep", "300")  # fmt: skip
    drawn = torch.cat(step_inputs["timesteps"])
    assert len(drawn) == 16 and drawn.min() >= 200 and drawn.max() < 300 and len(set(drawn.tolist())) > 8
    assert "* Loss and noise: l2, timesteps from 200 below 300" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--huber_c", "0.2"], "--huber_c is for --loss_type huber or smooth_l1, not l2"),
        (["--loss_type", "l1", "--huber_schedule", "snr"], "--huber_schedule is for --loss_type huber or smooth_l1"),
        (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be a number above 0, got 0.0"),
        (["--min_timestep", "500", "--max_timestep", "500"], "must make a range: 0 <= min < max, got 500 and 500"),
        (["--min_timestep", "-1"], "must make a range: 0 <= min < max, got -1 and None"),
        (["--multires_noise_discount", "0.3"], "--multires_noise_discount is for --multires_noise_iterations N"),
        (["--multires_noise_iterations", "6", "--multires_noise_discount", "0"], "must be above 0 and at most 1"),
        (["--huber_scale", "2"], "--huber_scale is for --loss_type huber or smooth_l1, not l2"),
        (
            ["--loss_type", "huber", "--huber_scale", "2"],
            "--huber_scale scales the constant and exponential schedules' threshold (as in kohya-ss), not the snr",
        ),
        (["--loss_type", "huber", "--huber_schedule", "constant", "--huber_scale", "0"], "must be a number above 0"),
        (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale adds to --noise_offset, which is not given"),
        (["--v_pred_like_loss", "0"], "--v_pred_like_loss must be a number above 0, got 0.0"),
    ],
)
def test_loss_flags_that_mean_nothing_or_make_no_range_are_one_line(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        train_text_to_image.parse_args(
            ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(DEMO_DATA), *argv]
        )


def test_the_loss_weights_between_objectives_are_refused_on_the_other_one(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="--scale_v_pred_loss_like_noise_pred weighs a v-prediction loss, and this run"
                                        " predicts epsilon"):  # fmt: skip
        train(tiny_sd, tmp_path / "a", "--max_train_steps", "1", "--scale_v_pred_loss_like_noise_pred")
    with pytest.raises(UserError, match="--v_pred_like_loss adds a v loss to noise prediction, and this run predicts"
                                        " v_prediction"):  # fmt: skip
        train(tiny_sd, tmp_path / "b", "--max_train_steps", "1", "--v_pred_like_loss", "0.1", "--prediction_type",
              "v_prediction")  # fmt: skip


def test_adaptive_noise_scale_adds_the_latents_channel_means_to_the_offset(tiny_sd, tmp_path, step_inputs):
    # kohya-ss: the offset of channel c of an example is --noise_offset + scale * |mean of its latents in c|,
    # floored at 0, times the same offset draw.
    runs = {"none": [], "offset": ["--noise_offset", "0.1"],
            "adaptive": ["--noise_offset", "0.1", "--adaptive_noise_scale", "0.5"],
            "floored": ["--noise_offset", "0.1", "--adaptive_noise_scale", "-1000"],
            "random": ["--noise_offset", "0.1", "--noise_offset_random_strength"]}  # fmt: skip
    noise, latents = {}, {}
    for name, flags in runs.items():
        train(tiny_sd, tmp_path / name, "--max_train_steps", "1", "--train_batch_size", "4", "--center_crop", *flags)
        noise[name], latents[name] = step_inputs["noise"][-1].double(), step_inputs["latents"][-1].double()
    assert all(torch.equal(latents[name], latents["none"]) for name in runs)
    offset_draw = (noise["offset"] - noise["none"]) / 0.1  # [B, C, 1, 1]: one draw per example and channel
    assert torch.allclose(offset_draw, offset_draw[:, :, :1, :1].expand_as(offset_draw), atol=1e-5)
    mean = latents["none"].mean(dim=(2, 3), keepdim=True).abs()
    assert mean.min() > 0.01  # the adaptive part is not negligible
    torch.testing.assert_close(noise["adaptive"] - noise["none"], (0.1 + 0.5 * mean) * offset_draw, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise["floored"], noise["none"], atol=1e-6, rtol=0)
    # --noise_offset_random_strength: each example's offset a share of --noise_offset, the same in every channel.
    share = (noise["random"] - noise["none"]) / (noise["offset"] - noise["none"])
    per_example = share.flatten(1).median(dim=1).values
    torch.testing.assert_close(share, per_example.view(-1, 1, 1, 1).expand_as(share), atol=1e-3, rtol=1e-3)
    assert all(0 <= value < 1 for value in per_example.tolist()) and len(set(per_example.tolist())) == 4
    assert "noise offset 0.1 plus 0.5 of the latents' mean" in (tmp_path / "adaptive" / "README.md").read_text()


def test_timesteps_past_the_schedule_are_one_line(tiny_sd, tmp_path):
    with pytest.raises(
        UserError, match="must lie in the noise schedule's 1000 timesteps .0 to 1000., got None and 1001"
    ):
        train(tiny_sd, tmp_path, "--max_train_steps", "1", "--max_timestep", "1001")


def test_multires_noise_has_unit_variance_and_low_frequencies():
    def draw(seed, **options):
        generator = torch.Generator().manual_seed(seed)
        return multires_noise(torch.randn(4, 64, 64, generator=generator), generator, **options)

    assert torch.equal(draw(0, iterations=6, discount=0.3), draw(0, iterations=6, discount=0.3))  # its own draws
    noises = torch.stack([draw(seed, iterations=6, discount=0.3) for seed in range(100)])
    white = torch.randn(noises.shape, generator=torch.Generator().manual_seed(1))
    assert noises.flatten(1).std(dim=1).tolist() == pytest.approx([1.0] * 100, abs=1e-5)
    # A channel's mean over the image: about 1/64 for white noise (0.017 measured); the coarse draws make it larger,
    # the more so the more they weigh (0.024 at discount 0.3, 0.26 at 0.8).
    heavier = torch.stack([draw(seed, iterations=6, discount=0.8) for seed in range(100)])
    spread = [x.mean(dim=(2, 3)).std().item() for x in (white, noises, heavier)]
    assert spread[0] < 0.02 and spread[1] > 1.2 * spread[0] and spread[2] > 10 * spread[0]


def test_training_adds_multires_noise_after_the_other_draws(tiny_sd, tmp_path, step_inputs):
    common = ["--max_train_steps", "2", "--train_batch_size", "4", "--center_crop", "--resolution", "64"]
    train(tiny_sd, tmp_path / "white", *common)
    white, white_timesteps = list(step_inputs["noise"]), list(step_inputs["timesteps"])
    step_inputs["noise"].clear(), step_inputs["timesteps"].clear()
    train(tiny_sd, tmp_path / "multires", *common, "--multires_noise_iterations", "6")
    for before, after, t_before, t_after in zip(
        white, step_inputs["noise"], white_timesteps, step_inputs["timesteps"]
    ):
        assert torch.equal(t_before, t_after)  # the draws before it are unchanged
        assert not torch.allclose(before, after)
        assert after.flatten(1).std(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert "multi-resolution noise (6 sizes, discount 0.3)" in (tmp_path / "multires" / "README.md").read_text()


def test_multires_noise_is_kohya_sss_pyramid_on_the_examples_own_generator():
    # kohya-ss's loop, written out: at each size a draw of r in [2, 4), noise at (h, w) / r^i enlarged and weighed
    # discount^i, stopping after a size of 1; then unit standard deviation (here per example).
    for shape, iterations, discount in (((4, 8, 8), 6, 0.8), ((4, 16, 12), 3, 0.5)):
        generator = torch.Generator().manual_seed(7)
        got = multires_noise(torch.randn(shape, generator=generator), generator, iterations=iterations,
                             discount=discount)  # fmt: skip
        generator = torch.Generator().manual_seed(7)
        noise = torch.randn(shape, generator=generator)[None]
        _, c, h, w = noise.shape
        for i in range(iterations):
            r = torch.rand(1, generator=generator).item() * 2 + 2
            hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
            noise = noise + F.interpolate(torch.randn(1, c, hn, wn, generator=generator), size=(h, w),
                                          mode="bilinear") * discount**i  # fmt: skip
            if hn == 1 or wn == 1:
                break
        torch.testing.assert_close(got, (noise / noise.std())[0])
