"""Telling a better model from noise: paired differences with bootstrap intervals, and distances between
image sets in CLIP's image-feature space (Fréchet and kernel distances, nearest training images).

    mean, low, high = paired_bootstrap(differences)      # the mean paired difference and its 95% interval
    verdict(low, high)                                   # "better", "worse" or "no difference this run can detect"
    features = image_features(images, clip, device)     # L2-normalised CLIP image embeddings, (N, D)
    fd, kd, kd_std = set_distances(features, reference)  # torchmetrics' FID and KID on those features
    nearest(features, reference)                         # each image's most similar reference image
"""

import numpy as np
import torch
from tqdm.auto import tqdm

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def paired_bootstrap(differences, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, confidence=0.95):
    """The mean of `differences` (one per unit: a prompt and a seed) and its percentile bootstrap interval.

    The units are resampled with replacement `resamples` times by a generator seeded with `seed`, so the
    same differences always give the same interval.
    """
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 1000):  # in chunks, so many units do not need one huge index array
        picks = rng.integers(0, len(differences), size=(min(1000, resamples - start), len(differences)))
        means.append(differences[picks].mean(axis=1))
    means = np.concatenate(means)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(differences.mean()), float(low), float(high)


def verdict(low, high):
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no difference this run can detect"


class Precomputed(torch.nn.Module):
    """torchmetrics' FID and KID run their feature extractor on what update() gets; here that is already
    the features, so each image goes through CLIP once for all the distances."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def image_features(images, clip, device, batch_size=32):
    """L2-normalised CLIP image embeddings of PIL images, as a float64 (N, D) CPU tensor."""
    clip_model, clip_processor = clip
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="CLIP image features", unit="batch"):
        batch = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) for image in
                 images[start : start + batch_size]]  # fmt: skip
        pixel_values = clip_processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        with torch.no_grad():
            embedding = clip_model.get_image_features(pixel_values).double().cpu()
        features.append(embedding / embedding.norm(dim=-1, keepdim=True))
    return torch.cat(features)


def set_distances(features, reference, kid_subsets=100, seed=BOOTSTRAP_SEED):
    """Fréchet distance, and kernel distance with its standard deviation over subsets, between two feature
    sets (torchmetrics' FID and KID formulas on CLIP features instead of Inception's)."""
    # Imported here: the training script imports this module for its statistics alone, and torchmetrics took 1.2 s of
    # its start on a GPU machine.
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=Precomputed(features.shape[1]), normalize=False)
    fid.update(reference, real=True)
    fid.update(features, real=False)
    # Subsets of half the smaller set (at most 1,000, torchmetrics' default), so that they differ and their
    # spread says something.
    subset_size = max(2, min(1000, min(len(features), len(reference)) // 2))
    kid = KernelInceptionDistance(feature=Precomputed(features.shape[1]), subsets=kid_subsets, subset_size=subset_size)
    kid.update(reference, real=True)
    kid.update(features, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from torch's global generator
        torch.manual_seed(seed)
        kd, kd_std = kid.compute()
    return float(fid.compute()), float(kd), float(kd_std)


def nearest(features, reference):
    """For each row of `features`, the index of the most similar row of `reference` and that cosine similarity."""
    similarity = features @ reference.T
    best, index = similarity.max(dim=1)
    return index.tolist(), best.tolist()
