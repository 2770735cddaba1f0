"""A held-out loss: the denoising loss on images kept out of training, measured the same way every time.

The training loss of a diffusion model moves with the random timestep and noise of each batch, so a curve of it
says little about whether the model is getting better. `--validation_split F` holds out a share F of the
images, and at the start, at every checkpoint and at the end of training measures the UNet's loss on them
at fixed timesteps with fixed noise (the same numbers every time, whatever --seed is), so two measurements
differ only because the weights did. The loss is kept per timestep too: it is of a different size at each
timestep, so its mean over them can hide one of them getting worse.

    split_held_out(digests, fraction)        which rows train and which are held out
    HeldOutLoss(rows, ...)                   the held-out images' latents and captions, encoded once
    held_out(unet, noise_scheduler, ...)     ({"validation_loss": mean, "validation_loss/t=100": ...}, per image)
    compare(before, after)                   whether the change between two measurements is beyond chance
"""

from collections import namedtuple

import torch
import torch.nn.functional as F

from sdtoolkit.clip_windows import caption_windows, emphasize, encode_windows, token_mask
from sdtoolkit.data import latent_mask, resolve_wildcards
from sdtoolkit.errors import UserError
from sdtoolkit.evaluation import paired_bootstrap, verdict
from sdtoolkit.latent_cache import cache_crop, crop_alpha, crop_pixels

# The timesteps the loss is measured at, out of 1000 (scaled to the scheduler's count): from little noise to
# nearly pure noise.
TIMESTEPS = (100, 300, 500, 700, 900)
NOISE_SEED = 0  # the noise is the same in every run, so runs compare too


def split_held_out(digests, fraction):
    """(training rows, held-out rows): indices into the rows whose images have these content digests.

    The held-out images are those whose digests sort first, so the split is the same in every run and on every
    process, does not depend on the order of the rows or on --seed, and mostly stays when images are added.
    Copies of one image (same digest) land on the same side.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"--validation_split must be at least 0 and less than 1, got {fraction}")
    distinct = sorted(set(digests))
    count = max(1, round(fraction * len(distinct)))
    if len(distinct) - count < 1:
        raise UserError(
            f"--validation_split {fraction} would hold out all {len(distinct)} distinct images; use a smaller share"
            " or more images"
        )
    held = set(distinct[:count])
    training = [row for row, digest in enumerate(digests) if digest not in held]
    held_out = [row for row, digest in enumerate(digests) if digest in held]
    return training, held_out


# The held-out images of one training shape: their rows, latents (n, C, h, w) float32, caption embeddings
# (n, 77, dim) and token ids (n, 77), the noise per timestep, and two masks or None. With --max_token_length above
# 75 the captions are read in windows (sdtoolkit/clip_windows.py): embeddings (n, 77 x windows, dim), token ids
# (n, windows, 77), and text_masks (n, 77 x windows) for the UNet. With --weighted_captions, token_weights (shaped
# as token_ids) hold each token's emphasis (see emphasize). With --masked_loss, loss_masks (n, 1, h, w) weigh each
# latent pixel's error by the image's opacity, as training does.
Group = namedtuple("Group", "rows latents embeddings token_ids token_weights text_masks loss_masks noise")


class HeldOutLoss:
    """The held-out rows encoded once (center crops at the shape they would train at, first captions), and the loss
    of a UNet on them. Build it while the VAE and text encoder are still loaded; call it on every process."""

    def __init__(self, rows, *, image_column, caption_column, resolution, interpolation, tokenizer, vae,
                 text_encoder, batch_size, device, dtype, sizes=None, windows=1, masked_loss=False,
                 clip_skip=1, weighted_captions=False, wildcards=False):  # fmt: skip
        """sizes: each row's aspect-ratio bucket (width, height) with --aspect_buckets; None: resolution² squares.
        clip_skip: the text encoder's layer the captions are read from, as in training (see encode_text).
        weighted_captions: captions read for emphasis, as training reads them (--weighted_captions).
        wildcards: each {a|b} wildcard of a caption read as its first option (--enable_wildcard)."""
        self.batch_size, self.count, self.clip_skip = batch_size, len(rows), clip_skip
        # Images of one shape are measured together, in batches of their own.
        shapes = {}
        for row, size in enumerate(sizes or [resolution] * len(rows)):
            shapes.setdefault(size, []).append(row)
        # Noise drawn on the CPU, so that every device gets the same numbers, and kept there (5 times the latents'
        # size) until its batch is used: one tensor per shape and timestep.
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.groups = []  # one Group per shape
        for size, group in shapes.items():
            latents, embeddings, token_ids, token_weights, masks, loss_masks = [], [], [], [], [], []
            for start in range(0, len(group), batch_size):
                batch = rows.select(group[start : start + batch_size])
                # Latents: the VAE's mean (a trained VAE is nearly deterministic), scaled as in training.
                crops = [cache_crop(image, size, interpolation, masked_loss) for image in batch[image_column]]
                pixels = torch.stack([crop_pixels(crop, flip=False) for crop in crops])
                with torch.no_grad():
                    mean = vae.encode(pixels.to(device, dtype=dtype)).latent_dist.mean
                    latents.append((mean * vae.config.scaling_factor).float())
                    if masked_loss:
                        opacity = [latent_mask(crop_alpha(crop, flip=False), mean.shape[1:]) for crop in crops]
                        loss_masks.append(torch.stack(opacity).to(device))
                    # Captions: the first one of a row that has several.
                    captions = [c if isinstance(c, str) else c[0] for c in batch[caption_column]]
                    if wildcards:
                        captions = [resolve_wildcards(caption) for caption in captions]
                    if windows > 1 or weighted_captions:
                        read = [
                            caption_windows(tokenizer, caption, windows, weighted_captions) for caption in captions
                        ]
                        ids = torch.stack([caption_ids for caption_ids, _, _ in read])
                        if weighted_captions:
                            token_weights.append(torch.stack([weights for _, _, weights in read]).to(device))
                        if windows > 1:
                            masks.append(token_mask(torch.stack([mask for _, mask, _ in read])).to(device))
                    else:
                        ids = tokenizer(
                            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt",
                        ).input_ids  # fmt: skip
                    embeddings.append(
                        self.encode(text_encoder, ids.to(device), token_weights[-1] if token_weights else None)
                    )
                    token_ids.append(ids.to(device))
            latents = torch.cat(latents)
            noise = [torch.randn(latents.shape, generator=generator) for _ in TIMESTEPS]
            self.groups.append(
                Group(
                    rows=group, latents=latents, embeddings=torch.cat(embeddings), token_ids=torch.cat(token_ids),
                    token_weights=torch.cat(token_weights) if token_weights else None,
                    text_masks=torch.cat(masks) if masks else None,
                    loss_masks=torch.cat(loss_masks) if loss_masks else None, noise=noise,
                )
            )  # fmt: skip

    def __len__(self):
        return self.count

    def encode(self, text_encoder, ids, weights=None):
        """The embeddings of token ids (n, 77), or of windows (n, windows, 77), a batch at a time; with weights
        (shaped as ids), emphasized by them (see emphasize)."""
        windows = ids if ids.dim() == 3 else ids[:, None]  # one window each: the text encoder's own output
        embeddings = torch.cat(
            [encode_windows(text_encoder, windows[start : start + self.batch_size], self.clip_skip)
             for start in range(0, len(ids), self.batch_size)]
        )  # fmt: skip
        return embeddings if weights is None else emphasize(embeddings, weights)

    def __call__(self, unet, noise_scheduler, autocast, accelerator=None, text_encoder=None):
        """(losses, per_image): {"validation_loss": the mean over timesteps and images, "validation_loss/t=T":
        the mean squared error at T}, and each image's loss (its mean over the timesteps), for compare().

        unet: the model to measure, in the weights to measure (the EMA weights, swapped in by the caller);
        autocast: a context manager for mixed precision (accelerator.autocast); accelerator: with several
        processes, each measures its share of the batches, and all get every image's loss; text_encoder: one
        that trains (--train_text_encoder), which encodes the captions anew, in its weights of now.
        """
        # Batch b is measured by process b % processes. Every process calls the UNet as often as the others
        # (one that has run out of batches measures the first batch again and drops the result), because a
        # sharded model (DeepSpeed ZeRO-3, FSDP) needs every process in each forward pass.
        models = [unet] + [text_encoder] * (text_encoder is not None)
        was_training = [model.training for model in models]
        for model in models:
            model.eval()  # LoRA dropout off
        groups = self.groups
        if text_encoder is not None:
            # The captions encoded once for this measurement, by the text encoder as it is now.
            with autocast():
                groups = [
                    group._replace(embeddings=self.encode(text_encoder, group.token_ids, group.token_weights))
                    for group in groups
                ]
        process, processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        batches = [(group, start) for group in groups for start in range(0, len(group.rows), self.batch_size)]
        mine = batches[process::processes]
        rounds = len(batches[::processes])
        scale = noise_scheduler.config.num_train_timesteps / 1000
        # errors[i, row]: the mean squared error of image `row` at timestep i; 0 where another process measured it.
        errors = torch.zeros(len(TIMESTEPS), len(self), dtype=torch.float64)
        for i, step in enumerate(TIMESTEPS):
            t = int(step * scale)
            for n in range(rounds):
                group, start = mine[n] if n < len(mine) else batches[0]
                end = start + self.batch_size
                latents = group.latents[start:end]
                batch_noise = group.noise[i][start:end].to(latents.device)
                timesteps = torch.full((len(latents),), t, device=latents.device, dtype=torch.long)
                noisy = noise_scheduler.add_noise(latents, batch_noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, batch_noise, timesteps)
                else:
                    target = batch_noise
                text_mask = group.text_masks[start:end] if group.text_masks is not None else None
                with autocast():
                    pred = unet(
                        noisy, timesteps, group.embeddings[start:end], encoder_attention_mask=text_mask,
                        return_dict=False,
                    )[0]  # fmt: skip
                if n < len(mine):
                    error = F.mse_loss(pred.float(), target, reduction="none")
                    if group.loss_masks is not None:  # --masked_loss: weighed as training weighs it
                        error = error * group.loss_masks[start:end]
                    errors[i, group.rows[start:end]] = error.mean(dim=(1, 2, 3)).cpu().double()
        for model, training in zip(models, was_training):
            model.train(training)
        if processes > 1:  # each image was measured by one process: the sum is its error
            errors = accelerator.reduce(errors.to(accelerator.device), reduction="sum").cpu()
        losses = {
            f"validation_loss/t={int(step * scale)}": errors[i].mean().item() for i, step in enumerate(TIMESTEPS)
        }
        per_image = errors.mean(dim=0)
        losses["validation_loss"] = per_image.mean().item()
        return losses, per_image.tolist()


def compare(before, after):
    """A paired comparison of two measurements' per-image losses: (mean change, 95% interval low, high, verdict).

    The images are the units a bootstrap resamples (sdtoolkit/evaluation.py): the interval says how much the
    change could differ on another draw of held-out images, and the verdict is "better" only when all of it
    is a lower loss.
    """
    change, low, high = paired_bootstrap([b - a for a, b in zip(before, after)])
    # verdict() calls a positive difference better; here the loss going down is.
    return change, low, high, verdict(-high, -low)
