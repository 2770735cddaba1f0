"""kohya-ss's loss options for the training step: robust losses, debiased estimation.

Upstream's loss is the mean squared error between the UNet's prediction and its target. A few badly captioned or
broken images then pull hard on the weights: their errors are large, and squared. --loss_type huber (a pseudo-Huber
loss) and smooth_l1 are squared for small errors and grow linearly past a threshold c, so an outlier pulls with a
bounded force. Scheduled Pseudo-Huber loss (Khrapov et al., 2024, arXiv 2403.16728) lowers c as the noise grows: at
low noise, where the image's detail is learned, the loss stays close to squared; at high noise, where a corrupted
image is hard to tell from noise, it is robust. --debiased_estimation_loss weighs each example by 1/sqrt(SNR) (Yu et
al., 2023, arXiv 2310.08442), against the low-noise timesteps' share of the loss.

A v-prediction model's error in v is its error in the noise over sqrt(alpha_bar): weighing its loss by
alpha_bar = SNR / (SNR + 1) gives the noise prediction's loss (--scale_v_pred_loss_like_noise_pred), and a noise
prediction model's loss over that weight is the v loss it stands for, which --v_pred_like_loss adds in a share.

    loss_per_element(pred, target, loss_type, thresholds)   # [B, C, h, w]: l2, l1, huber or smooth_l1
    huber_thresholds(noise_scheduler, timesteps, schedule, c)   # [B]: each example's c
    debiased_weights(noise_scheduler, timesteps)                # [B]
    snr_scale(noise_scheduler, timesteps)                       # [B]: SNR / (SNR + 1)
"""

import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
THRESHOLD_LOSSES = ("huber", "smooth_l1")  # the loss types with a threshold, which --huber_schedule sets
HUBER_SCHEDULES = ("snr", "exponential", "constant")
MAX_SNR = 1000  # timestep 0's SNR is nearly infinite; debiased estimation caps it, as kohya-ss does


def huber_thresholds(noise_scheduler, timesteps, schedule, c, scale=1.0):
    """Each example's threshold, [B], from its timestep: "constant" c at every timestep; "exponential" from 1 at
    timestep 0 down to c at the last; "snr" (kohya-ss's default) (1 - c) / (1 + sigma)^2 + c, with sigma the
    noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar): nearly 1 at low noise, c at high noise. `scale`
    (--huber_scale) multiplies the constant and exponential thresholds, as kohya-ss applies it."""
    timesteps = timesteps.float()
    if schedule == "constant":
        return torch.full_like(timesteps, c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(c) * timesteps / noise_scheduler.config.num_train_timesteps) * scale
    sigma = compute_snr(noise_scheduler, timesteps.long()) ** -0.5
    return (1 - c) / (1 + sigma) ** 2 + c


def loss_per_element(pred, target, loss_type, thresholds=None):
    """The loss of each element of pred against target ([B, C, h, w] both): squared error (l2), absolute error
    (l1), or with each example's threshold c ([B]) the pseudo-Huber loss 2c(sqrt(e^2 + c^2) - c) (huber) or
    2(sqrt(e^2 + c^2) - c) (smooth_l1). Both are e^2 (huber) or e^2 / c (smooth_l1) for errors e well below c, and
    grow as 2c|e| or 2|e| for errors well above it."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = thresholds.view(-1, *[1] * (pred.dim() - 1))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return c * smooth if loss_type == "huber" else smooth


def debiased_weights(noise_scheduler, timesteps):
    """Each example's weight in debiased estimation, [B]: 1 / sqrt(SNR), the SNR capped at MAX_SNR; for
    v-prediction 1 / (SNR + 1), as kohya-ss weighs it."""
    snr = compute_snr(noise_scheduler, timesteps).clamp(max=MAX_SNR)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / torch.sqrt(snr)


def snr_scale(noise_scheduler, timesteps):
    """Each example's SNR / (SNR + 1) (= alpha_bar), [B], the SNR capped at MAX_SNR as kohya-ss caps it: the weight
    that turns a v-prediction loss into the noise prediction's."""
    snr = compute_snr(noise_scheduler, timesteps).clamp(max=MAX_SNR)
    return snr / (snr + 1)
