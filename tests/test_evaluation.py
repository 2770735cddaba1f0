"""Evaluation that can tell a better model from noise: paired comparisons with bootstrap intervals, distances
to the training images in CLIP space, near-copies, the page's protocol, and reproducible reports."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import metrics
from sdtoolkit.errors import UserError
from sdtoolkit.evaluation import paired_bootstrap, set_distances, verdict
from tests.conftest import DEMO_DATA

FAST = ["--num_inference_steps", "2", "--resolution", "32", "--device", "cpu"]


def run(tiny_sd, tiny_clip, out, *extra, models=None):
    argv = ["--model_path", *(models or [tiny_sd]), "--clip_model", tiny_clip, "--output_dir", str(out), *FAST]
    return metrics.main(argv + list(extra))


def test_a_model_against_itself_differs_by_exactly_zero(tiny_sd, tiny_clip, tmp_path):
    report = run(tiny_sd, tiny_clip, tmp_path, "--seeds", "0", "1", models=[tiny_sd, tiny_sd])
    (comparison,) = report["comparisons"]
    assert comparison["units"] == 6 * 2  # the seed's six prompts x two seeds
    assert comparison["mean_difference"] == 0.0 and comparison["ci95"] == [0.0, 0.0]
    assert comparison["verdict"] == "no difference this run can detect"
    assert "| no difference this run can detect |" in (tmp_path / "report.md").read_text()


def test_the_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # Paired differences with a known mean, drawn afresh 400 times: the 95% interval must cover it about 95%
    # of the time (a percentile bootstrap over 40 units runs a little under).
    true_mean, covered = 0.3, 0
    for repeat in range(400):
        differences = np.random.default_rng(1000 + repeat).normal(true_mean, 1.0, size=40)
        _, low, high = paired_bootstrap(differences, resamples=2000, seed=repeat)
        covered += low <= true_mean <= high
    assert 0.91 <= covered / 400 <= 0.98
    # Seeded: the same differences give the same interval.
    differences = np.random.default_rng(0).normal(size=30)
    assert paired_bootstrap(differences) == paired_bootstrap(differences)


def test_verdicts():
    assert verdict(0.1, 0.5) == "better" and verdict(-0.5, -0.1) == "worse"
    assert verdict(-0.1, 0.2) == "no difference this run can detect"


def test_set_distances_are_zero_for_the_same_set_and_grow_with_a_shift():
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(200, 16)))
    assert abs(set_distances(features, features)[0]) < 1e-6
    # KID is unbiased: two samples of one distribution are ~0 apart, within its spread over subsets.
    other = torch.from_numpy(np.random.default_rng(1).normal(size=(200, 16)))
    _, kd, kd_std = set_distances(other, features)
    assert abs(kd) < 3 * kd_std
    distances = [set_distances(features + shift, features)[:2] for shift in (0.25, 0.5, 1.0)]
    assert distances[0][0] > 1e-2 and distances[0][1] > 0
    assert distances[0][0] < distances[1][0] < distances[2][0]
    assert distances[0][1] < distances[1][1] < distances[2][1]


def test_a_training_image_fed_back_is_flagged_as_a_near_copy(tiny_clip):
    clip_model, processor = metrics.load_clip("transformers", tiny_clip)
    reference_images, _ = metrics.read_reference_images(str(DEMO_DATA))
    reference = metrics.image_features(reference_images, (clip_model, processor), "cpu")
    generated = [[reference_images[5]], [reference_images[17]]]
    check = metrics.training_set_check(generated, reference, (clip_model, processor), "cpu", threshold=0.95)
    assert [pair["reference"] for pair in check["nearest"]] == [5, 17]
    assert all(pair["similarity"] == pytest.approx(1.0, abs=1e-9) for pair in check["nearest"])
    assert check["near_copies"] == 1.0


def test_reference_data_reports_distances_and_nearest_pairs(tiny_sd, tiny_clip, tmp_path):
    report = run(tiny_sd, tiny_clip, tmp_path, "--reference_data", str(DEMO_DATA))
    check = report["models"][0]["training_set"]
    assert check["frechet_distance"] > 0 and len(check["nearest"]) == 6
    assert (tmp_path / "nearest-tiny-sd.png").exists()
    text = (tmp_path / "report.md").read_text()
    assert "Fréchet distance" in text and "![nearest: tiny-sd](nearest-tiny-sd.png)" in text


def test_two_identical_runs_write_identical_json(tiny_sd, tiny_clip, tmp_path):
    flags = ["--reference_data", str(DEMO_DATA)]
    run(tiny_sd, tiny_clip, tmp_path / "a", *flags, models=[tiny_sd, tiny_sd])
    run(tiny_sd, tiny_clip, tmp_path / "b", *flags, models=[tiny_sd, tiny_sd])
    assert (tmp_path / "a" / "scores.json").read_bytes() == (tmp_path / "b" / "scores.json").read_bytes()


def test_doc_protocol_carries_one_generator_from_model_to_model(tiny_sd, tiny_clip, tmp_path, monkeypatch):
    drawn = []
    prepare_latents = StableDiffusionPipeline.prepare_latents

    def record(self, *args, **kwargs):
        latents = prepare_latents(self, *args, **kwargs)
        drawn.append(latents.clone())
        return latents

    monkeypatch.setattr(StableDiffusionPipeline, "prepare_latents", record)
    # 2 steps instead of the pipeline's 50: the generator is what is under test here.
    steps = functools.partialmethod(StableDiffusionPipeline.__call__, num_inference_steps=2)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", steps)
    argv = ["--doc_protocol", "--model_path", tiny_sd, tiny_sd, "--clip_model", tiny_clip, "--device", "cpu",
            "--output_dir", str(tmp_path)]  # fmt: skip
    report = metrics.main(argv)
    # As the page did: torch.manual_seed(0) once, the first model's six latents, then the second model's six
    # from where the first left off, not from the seed again.
    generator = torch.manual_seed(0)
    first, second = (torch.randn(drawn[0].shape, generator=generator) for _ in range(2))
    assert drawn[0].shape[0] == 6 and torch.equal(drawn[0], first) and torch.equal(drawn[1], second)
    assert report["comparisons"] == []  # not paired, so no paired interval
    scores = [model["doc_protocol_clip_score"] for model in report["models"]]
    assert all(score == round(score, 4) for score in scores)


def test_jsonl_prompts_carry_negative_prompts(tiny_sd, tiny_clip, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "a round green creature"}\n{"prompt": "a tall red creature"}\n')
    negative = tmp_path / "negative.jsonl"
    negative.write_text('{"prompt": "a round green creature", "negative_prompt": "blurry, dark"}\n'
                        '{"prompt": "a tall red creature"}\n')  # fmt: skip
    assert metrics.load_prompts(str(plain)) == (["a round green creature", "a tall red creature"], None)
    assert metrics.load_prompts(str(negative))[1] == ["blurry, dark", ""]
    a = run(tiny_sd, tiny_clip, tmp_path / "a", "--prompts_file", str(plain))
    b = run(tiny_sd, tiny_clip, tmp_path / "b", "--prompts_file", str(negative))
    scores = [[model["per_prompt"][p]["mean"] for p in range(2)] for model in (a["models"][0], b["models"][0])]
    assert scores[0][0] != scores[1][0] and scores[0][1] == scores[1][1]  # only the prompt with a negative changes
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match=r'prompt 2: needs a non-empty "prompt" string'):
        metrics.load_prompts(str(bad))


def test_reports_are_json_with_comparisons(tiny_sd, tiny_clip, tmp_path):
    run(tiny_sd, tiny_clip, tmp_path, models=[tiny_sd, tiny_sd])
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["comparisons"][0]["baseline"].endswith("(1)")
