"""metrics.py and gradio_app.py load what training wrote that is not a whole pipeline: a checkpoint, a LoRA run's
folder, its kohya file, a LoRA checkpoint, each on the base model the run's own records name."""

import json
import logging.handlers
import shutil
import threading

import diffusers
import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gradio_app
import metrics
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.images_api import BadRequest, parse_generation_request
from sdtoolkit.inference import load_lora_dir, load_pipeline, pick_device_and_dtype
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME, tag_frequency
from sdtoolkit.serving import SCHEDULERS, ImageService, LoraMix, RequestQueue, RequestRefused, sampler
from tests.conftest import DEMO_DATA, demo_image, generated_image, image_folder, run_entry_point, train

CPU = torch.device("cpu")
# Two checkpoints of an EMA run: the last one's EMA weights are what the final save holds; the raw weights differ.
RUN = ["--use_ema", "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_prompts", "a red disc"]
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]


def image(path, **kwargs):
    return generated_image(load_pipeline(str(path), CPU, torch.float32, **kwargs), 32)


def test_a_checkpoint_loads_with_the_weights_the_final_save_would_hold(tiny_sd, tmp_path, capsys):
    out = tmp_path / "out"
    train(tiny_sd, out, *RUN, "--learning_rate", "1e-3")
    final, last, earlier = image(out), image(out / "checkpoint-4"), image(out / "checkpoint-2")
    assert abs(final - image(tiny_sd)).max() > 1e-3  # training moved the UNet
    assert abs(last - final).max() == 0  # the checkpoint's unet_ema/ is the saved pipeline's UNet
    assert abs(earlier - final).max() > 1e-4
    assert f"checkpoint-4: a checkpoint, its unet_ema/ on its base model {tiny_sd}" in capsys.readouterr().out


def test_a_lora_loads_from_its_folder_its_kohya_file_and_its_checkpoints(tiny_sd, tmp_path):
    out = tmp_path / "my-lora"
    train(tiny_sd, out, *LORA, *RUN)
    final = image(out)
    assert abs(final - image(tiny_sd)).max() > 1e-3
    assert abs(image(out / KOHYA_WEIGHTS_NAME) - final).max() <= 1e-4
    assert abs(image(out / "checkpoint-4") - final).max() <= 1e-6  # its adapter's EMA weights
    assert abs(image(out / "checkpoint-2") - final).max() > 1e-4

    # The kohya file says what it is, as kohya-ss's trainer would, for AUTOMATIC1111 and Forge.
    with safe_open(out / KOHYA_WEIGHTS_NAME, "pt") as f:
        header = f.metadata()
    assert header["ss_output_name"] == header["modelspec.title"] == "my-lora"  # A1111's <lora:my-lora:1>
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8.0")
    assert (header["ss_steps"], header["ss_resolution"], header["ss_num_train_images"]) == ("4", "(32, 32)", "32")
    assert header["ss_sd_model_name"] == "tiny-sd" and header["sdtoolkit.model"] == str(tiny_sd)
    # A1111's training tags: the captions' comma-separated tags, counted, under the data folder's name.
    captions = [json.loads(line)["text"] for line in (DEMO_DATA / "metadata.jsonl").read_text().splitlines()]
    assert json.loads(header["ss_tag_frequency"]) == {"creatures": tag_frequency(captions)}

    # The page is titled and described after the LoRA, from its model card.
    title, description, examples = gradio_app.describe_model(str(out / "checkpoint-2"))
    assert title == "my-lora/checkpoint-2"
    assert description.startswith("This LoRA adapter was fine-tuned from a local folder `tiny-sd`")
    assert examples == ["a red disc"]


def test_a_v_prediction_run_is_sampled_as_v_prediction_wherever_it_loads(tiny_sd, tmp_path, monkeypatch):
    # tiny_sd's scheduler predicts epsilon. A run trained with --prediction_type v_prediction must sample with
    # v_prediction: its validation images, its saved pipeline, its checkpoints, its exported file and its LoRA.
    import train_text_to_image

    validated = []
    original = train_text_to_image.generate_validation_images

    def spy(pipeline, args, accelerator):
        validated.append(pipeline.scheduler.config.prediction_type)
        return original(pipeline, args, accelerator)

    monkeypatch.setattr(train_text_to_image, "generate_validation_images", spy)
    v = ["--prediction_type", "v_prediction", "--max_train_steps", "2", "--checkpointing_steps", "2"]
    out, lora = tmp_path / "full", tmp_path / "lora"
    train(tiny_sd, out, *v, "--export_single_file", "--validation_prompts", "a red disc")
    train(tiny_sd, lora, *v, *LORA)
    assert validated and set(validated) == {"v_prediction"}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    with safe_open(str(out / "full.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["modelspec.prediction_type"] == "v" and header["sdtoolkit.prediction_type"] == "v_prediction"
    # Beside it, the config AUTOMATIC1111 reads to sample it as v-prediction (tests/test_export.py checks it).
    assert yaml.safe_load((out / "full.yaml").read_text())["model"]["params"]["parameterization"] == "v"
    for path, kwargs in ((out, {}), (out / "checkpoint-2", {}), (out / "full.safetensors", {"config": str(tiny_sd)}),
                         (lora, {}), (lora / KOHYA_WEIGHTS_NAME, {}), (lora / "checkpoint-2", {})):  # fmt: skip
        pipeline = load_pipeline(str(path), CPU, torch.float32, **kwargs)
        assert pipeline.scheduler.config.prediction_type == "v_prediction", path
    # Training goes on from the exported file as a v-prediction model, without being told.
    again = tmp_path / "again"
    train(out / "full.safetensors", again, "--model_config", str(tiny_sd), "--max_train_steps", "1",
          "--checkpointing_steps", "1")  # fmt: skip
    assert (
        json.loads((again / "checkpoint-1" / "training_state.json").read_text())["prediction_type"] == "v_prediction"
    )
    # Another trainer's file that says it in ModelSpec's key alone (as kohya-ss writes it) loads the same way.
    tensors = load_file(out / "full.safetensors")
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"modelspec.prediction_type": "v"})
    pipeline = load_pipeline(str(tmp_path / "theirs.safetensors"), CPU, torch.float32, config=str(tiny_sd))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    # A new run into the same folder deletes the export's .yaml with the rest of the earlier run.
    train(tiny_sd, out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert not (out / "full.safetensors").exists() and not (out / "full.yaml").exists()
    # A run with the base's own prediction type loads as it did.
    train(tiny_sd, tmp_path / "epsilon", "--max_train_steps", "1", "--checkpointing_steps", "1")
    for path in (tmp_path / "epsilon", tmp_path / "epsilon" / "checkpoint-1"):
        assert load_pipeline(str(path), CPU, torch.float32).scheduler.config.prediction_type == "epsilon"


def test_a_lora_trained_for_v_prediction_and_zero_snr_brings_them_to_the_model_it_is_loaded_on(tiny_sd, tmp_path):
    # Given with --lora on the base model, such a LoRA samples as it was trained, from its folder or its file alone
    # (a copy elsewhere, as a user shares it). --lora_dir, whose LoRAs a prompt's tags apply to the one model the
    # server samples, skips it and says why. A LoRA that kept the base's objective leaves the model as it is.
    train(tiny_sd, tmp_path / "zero", "--prediction_type", "v_prediction", "--zero_terminal_snr",
          "--max_train_steps", "1", *LORA)  # fmt: skip
    train(tiny_sd, tmp_path / "plain", "--max_train_steps", "1", *LORA)
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("zero", "plain"):
        shutil.copy(tmp_path / name / KOHYA_WEIGHTS_NAME, folder / f"{name}.safetensors")
    for lora in (tmp_path / "zero", folder / "zero.safetensors"):
        config = load_pipeline(str(tiny_sd), CPU, torch.float32, lora=str(lora)).scheduler.config
        assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr, lora
        assert config.timestep_spacing == "trailing", lora
    for lora in (tmp_path / "plain", folder / "plain.safetensors"):
        config = load_pipeline(str(tiny_sd), CPU, torch.float32, lora=str(lora)).scheduler.config
        assert config.prediction_type == "epsilon" and not config.get("rescale_betas_zero_snr"), lora
    # On a v-prediction model, such a LoRA stays v-prediction: what it records of its epsilon base is not its own.
    v_model = tmp_path / "v-model"
    shutil.copytree(tiny_sd, v_model)
    scheduler = json.loads((v_model / "scheduler" / "scheduler_config.json").read_text())
    (v_model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "prediction_type": "v_prediction"})
    )
    config = load_pipeline(str(v_model), CPU, torch.float32, lora=str(tmp_path / "plain")).scheduler.config
    assert config.prediction_type == "v_prediction"
    loras, skipped = load_lora_dir(load_pipeline(str(tiny_sd), CPU, torch.float32), str(folder))
    assert list(loras) == ["plain"]
    assert skipped == [("zero.safetensors", "it was trained for v_prediction, and this model predicts epsilon; serve"
                                            " it with --lora, which samples as it was trained")]  # fmt: skip
    # On a v-prediction model that does not rescale, it is its zero terminal SNR that --lora_dir can't serve.
    loras, skipped = load_lora_dir(load_pipeline(str(v_model), CPU, torch.float32), str(folder))
    assert list(loras) == ["plain"]
    assert skipped == [("zero.safetensors", "it was trained with zero terminal SNR, and this model samples without"
                                            " it; serve it with --lora, which samples as it was trained")]  # fmt: skip


def test_zero_terminal_snr_trains_from_pure_noise_and_samples_as_it_was_trained(tiny_sd, tmp_path, monkeypatch):
    # Lin et al. 2023 (arXiv 2305.08891): at the last timestep the UNet's input is the noise alone. So two runs on
    # different images, with the same seed and only the last timestep drawn, give the UNet the same input; without
    # --zero_terminal_snr SD's schedule leaves a little of each image in.
    first_inputs = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        first_inputs.append(sample.detach().clone())
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    others = image_folder(tmp_path / "others", [(f"{i}.png", ImageOps.invert(demo_image(i)), f"thing {i}")
                                                for i in range(32)])  # fmt: skip
    last = ["--prediction_type", "v_prediction", "--min_timestep", "999", "--max_timestep", "1000",
            "--max_train_steps", "1", "--checkpointing_steps", "1"]  # fmt: skip
    inputs = {}
    for name, flags, data in (("zero", ["--zero_terminal_snr"], DEMO_DATA), ("zero-others", ["--zero_terminal_snr"], others),
                              ("sd", [], DEMO_DATA), ("sd-others", [], others)):  # fmt: skip
        first_inputs.clear()
        train(tiny_sd, tmp_path / name, *last, *flags, "--export_single_file", data=data)
        inputs[name] = first_inputs[0]
    assert torch.equal(inputs["zero"], inputs["zero-others"])
    assert not torch.allclose(inputs["sd"], inputs["sd-others"], atol=1e-3)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)

    # The saved pipeline, its checkpoint and its exported file sample with DDIM (PNDM can't rescale its betas) from
    # the last timestep, rescaled and predicting v; so does the server's default, and PNDM is refused in one line.
    out = tmp_path / "zero"
    assert (
        "* Loss and noise: l2, timesteps from 999 below 1000, zero terminal SNR (sampled with DDIM"
        in (out / "README.md").read_text()
    )
    # The final folder alone (no checkpoint left to say it) exports with it too: its scheduler says so.
    alone = tmp_path / "alone"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns("checkpoint-*"))
    export_single_file(str(alone), str(tmp_path / "alone.safetensors"), half=False)
    exported = (
        (out / "zero.safetensors", {"config": str(tiny_sd)}),
        (tmp_path / "alone.safetensors", {"config": str(tiny_sd)}),
    )
    for path, kwargs in ((out, {}), (out / "checkpoint-1", {}), *exported):
        pipeline = load_pipeline(str(path), CPU, torch.float32, **kwargs)
        config = pipeline.scheduler.config
        assert type(pipeline.scheduler).__name__ == "DDIMScheduler", path
        assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing", path
        assert config.prediction_type == "v_prediction", path
    pipeline.scheduler.set_timesteps(5)
    assert pipeline.scheduler.timesteps[0] == 999
    assert np.isfinite(generated_image(pipeline, 32)).all()
    for name in SCHEDULERS:
        if name != "PNDM":
            made = sampler(name, pipeline.scheduler.config)
            made.set_timesteps(5)
            assert made.alphas_cumprod[-1] < 1e-6 and made.timesteps[0] == 999, name
    with pytest.raises(
        RequestRefused, match="the scheduler PNDM can't sample this model, .* choose one of DPM-Solver"
    ):
        sampler("PNDM", pipeline.scheduler.config)
    # Noise prediction learns nothing at zero SNR: one line.
    with pytest.raises(UserError, match="zero terminal SNR .* needs --prediction_type v_prediction"):
        train(tiny_sd, tmp_path / "epsilon", "--zero_terminal_snr", "--max_train_steps", "1")


def own_vae(tiny_sd, folder):
    """Another VAE of tiny_sd's shape (its encoder scaled by 1.1, its decoder by 0.9) as a diffusers folder and as
    one file in the original layout, as AUTOMATIC1111 loads a VAE. Returns (folder, file, its weights)."""
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    with torch.no_grad():
        for name, weight in vae.named_parameters():
            weight.mul_(1.1 if name.startswith("encoder.") else 0.9)
    vae.save_pretrained(folder / "vae-folder")
    pipeline = folder / "pipeline"
    shutil.copytree(tiny_sd, pipeline)
    shutil.rmtree(pipeline / "vae")
    vae.save_pretrained(pipeline / "vae")
    export_single_file(str(pipeline), str(folder / "whole.safetensors"), half=False)
    prefix = "first_stage_model."
    tensors = {k.removeprefix(prefix): v for k, v in load_file(folder / "whole.safetensors").items() if prefix in k}
    save_file(tensors, folder / "vae.safetensors")
    return folder / "vae-folder", folder / "vae.safetensors", vae.state_dict()


def test_a_run_with_its_own_vae_trains_and_is_sampled_with_it_wherever_it_loads(tiny_sd, tmp_path):
    vae_folder, vae_file, weights = own_vae(tiny_sd, tmp_path)

    def same_vae(vae_weights):
        return all(torch.equal(vae_weights[key], weights[key]) for key in weights)

    steps = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--center_crop"]
    train(tiny_sd, tmp_path / "base", *steps)
    train(tiny_sd, tmp_path / "folder", *steps, "--pretrained_vae_model_name_or_path", str(vae_folder),
          "--export_single_file")  # fmt: skip
    train(tiny_sd, tmp_path / "file", *steps, "--pretrained_vae_model_name_or_path", str(vae_file))
    train(tiny_sd, tmp_path / "lora", *steps, *LORA, "--pretrained_vae_model_name_or_path", str(vae_file))
    # Its latents trained the UNet (the VAE file as its folder, bit for bit; the base's VAE otherwise).
    base, folder, file = (UNet2DConditionModel.from_pretrained(tmp_path / run / "unet").conv_in.weight
                          for run in ("base", "folder", "file"))  # fmt: skip
    assert torch.equal(folder, file) and not torch.equal(folder, base)
    # It is saved with the pipeline, and every other output loads with it.
    assert same_vae(AutoencoderKL.from_pretrained(tmp_path / "folder" / "vae").state_dict())
    for path in ("folder/checkpoint-2", "lora", f"lora/{KOHYA_WEIGHTS_NAME}", "lora/checkpoint-2"):
        assert same_vae(load_pipeline(str(tmp_path / path), CPU, torch.float32).vae.state_dict()), path
    assert not same_vae(load_pipeline(str(tmp_path / "base" / "checkpoint-2"), CPU, torch.float32).vae.state_dict())
    for exported in (tmp_path / "folder" / "folder.safetensors", tmp_path / "checkpoint.safetensors"):
        if not exported.exists():
            export_single_file(str(tmp_path / "folder" / "checkpoint-2"), str(exported), half=False)
        pipeline = load_pipeline(str(exported), CPU, torch.float32, config=str(tiny_sd))
        assert all(torch.allclose(pipeline.vae.state_dict()[k], weights[k], rtol=1e-3, atol=1e-5) for k in weights), (
            exported
        )
    with pytest.raises(UserError, match="could not load the VAE '.*nowhere': .* give a diffusers VAE folder"):
        train(tiny_sd, tmp_path / "bad", *steps, "--pretrained_vae_model_name_or_path", str(tmp_path / "nowhere"))


def test_a_device_that_is_not_there_is_one_error_line(tiny_sd, tiny_clip, monkeypatch, capsys):
    # From metrics.py and gradio_app.py, as their entry points run them: a device torch does not know...
    for main, extra in ((metrics.main, ["--clip_model", tiny_clip]), (gradio_app.main, [])):
        result = run_entry_point(main, "--model_path", tiny_sd, *extra, "--device", "tpu", capsys=capsys)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            "error: --device tpu is no device torch knows; use auto, cpu, cuda or cuda:N"
        )
    # ... CUDA where there is none, and a GPU the machine does not have.
    with pytest.raises(UserError, match=r"^--device cuda:1 was asked for, but no CUDA GPU is available; use --device"):
        pick_device_and_dtype("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        UserError, match=r"^--device cuda:3 was asked for, but this machine has 2 CUDA GPUs \(cuda:0 to"
    ):
        pick_device_and_dtype("cuda:3")
    assert pick_device_and_dtype("cuda:1") == (torch.device("cuda:1"), torch.float16)


def test_tags_are_counted_as_kohya_counts_them():
    captions = ["1girl, red hair, smile", ["1girl, blue hair ", "1girl"], "smile,", "a photo of a cat"]
    tags = tag_frequency(captions)
    assert tags == {"1girl": 3, "smile": 2, "red hair": 1, "blue hair": 1, "a photo of a cat": 1}
    assert list(tags)[:2] == ["1girl", "smile"]  # most frequent first


def test_metrics_scores_checkpoints_and_a_lora_folder_side_by_side(tiny_sd, tiny_clip, tmp_path):
    out = tmp_path / "my-lora"
    train(tiny_sd, out, *LORA, *RUN)
    report = metrics.main([
        "--model_path", str(tiny_sd), str(out / "checkpoint-2"), str(out), "--clip_model", str(tiny_clip),
        "--num_inference_steps", "2", "--resolution", "32", "--seeds", "0", "--device", "cpu",
        "--output_dir", str(tmp_path / "scores"),
    ])  # fmt: skip
    base, earlier, final = report["models"]
    assert [m["model_path"] for m in report["models"]] == [str(tiny_sd), str(out / "checkpoint-2"), str(out)]
    assert len({base["clip_score"], earlier["clip_score"], final["clip_score"]}) == 3


def test_a_lora_that_does_not_name_its_base_model_says_what_to_pass(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, *LORA, "--max_train_steps", "1")
    # The run's diffusers file names its base model in its header: copied alone, it still loads as a model.
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(out / WEIGHTS_NAME, copied / WEIGHTS_NAME)
    assert abs(image(copied) - image(out)).max() <= 1e-6
    # A diffusers LoRA from elsewhere: diffusers' own header only.
    alone = tmp_path / "alone"
    alone.mkdir()
    with safe_open(out / WEIGHTS_NAME, "pt") as f:
        diffusers_header = {key: value for key, value in f.metadata().items() if "." not in key}
    save_file(load_file(out / WEIGHTS_NAME), alone / WEIGHTS_NAME, metadata=diffusers_header)
    assert set(diffusers_header) == {"format", "lora_adapter_metadata"}
    with pytest.raises(UserError, match="does not name its base model; pass the base model as --model_path"):
        load_pipeline(str(alone), CPU, torch.float32)
    with pytest.raises(UserError, match="is already a LoRA or checkpoint on its base model; --lora needs a pipeline"):
        load_pipeline(str(out), CPU, torch.float32, lora=str(out))
    # A base model that has moved away is named, with what to do.
    moved = tmp_path / "moved-sd"
    shutil.copytree(tiny_sd, moved)
    train(moved, tmp_path / "on-moved", *LORA, "--max_train_steps", "1")
    shutil.rmtree(moved)
    with pytest.raises(UserError, match=f"is a LoRA of the base model {moved}, which is no longer there; pass the"):
        load_pipeline(str(tmp_path / "on-moved"), CPU, torch.float32)
    # Given as a --lora on its base, it loads as before.
    assert abs(image(tiny_sd, lora=str(alone)) - image(out)).max() <= 1e-6


def test_a_lora_applies_at_the_scale_asked(tiny_sd, tmp_path):
    out = tmp_path / "my-lora"
    train(tiny_sd, out, *LORA, "--max_train_steps", "2")
    base, full = image(tiny_sd), image(out)
    assert abs(image(out, lora_scale=0) - base).max() <= 1e-6
    assert abs(image(tiny_sd, lora=str(out), lora_scale=0) - base).max() <= 1e-6  # the same through --lora
    half = image(out, lora_scale=0.5)
    assert abs(half - base).max() > 1e-3 and abs(half - full).max() > 1e-3
    # The served PNG's parameters say it, in A1111's key: value list.
    pipeline = load_pipeline(str(tiny_sd), CPU, torch.float32, lora=str(out), lora_scale=0.5)
    service = ImageService(pipeline, model_name="tiny-sd", lora_name="my-lora", lora_scale=0.5,
                           queue=RequestQueue(concurrency=1, max_queue=1))  # fmt: skip
    (png,) = service.generate(prompt="p", negative_prompt="", steps=2, guidance_scale=7.5, seed=1,
                              scheduler="DPM-Solver++", width=32, height=32, num_images=1)  # fmt: skip
    assert png.info["parameters"].endswith("Model: tiny-sd, Lora: my-lora, Lora scale: 0.5")
    # Without a LoRA, the flag is a mistake.
    with pytest.raises(UserError, match="--lora_scale is for a LoRA: give one with --lora"):
        gradio_app.parse_args(["--model_path", str(tiny_sd), "--lora_scale", "0.5"])
    with pytest.raises(UserError, match="--lora_scale is for LoRAs"):
        metrics.main(["--model_path", str(tiny_sd), "--lora_scale", "0.5", "--output_dir", str(tmp_path / "s")])


def test_each_request_sets_the_loras_strength_on_the_page_and_in_v1(tiny_sd, tmp_path):
    out = tmp_path / "my-lora"
    train(tiny_sd, out, *LORA, "--max_train_steps", "2")
    queue = RequestQueue(concurrency=1, max_queue=4)
    served = ImageService(load_pipeline(str(tiny_sd), CPU, torch.float32, lora=str(out), lora_scale=0.5),
                          model_name="tiny-sd", lora_name="my-lora", lora_scale=0.5, queue=queue)  # fmt: skip
    base = ImageService(load_pipeline(str(tiny_sd), CPU, torch.float32), model_name="tiny-sd", queue=queue)
    full = ImageService(load_pipeline(str(out), CPU, torch.float32), model_name="my-lora", queue=queue)

    def request(service, **scale):
        (png,) = service.generate(prompt="a red disc", negative_prompt="", steps=2, guidance_scale=7.5, seed=1,
                                  scheduler="DPM-Solver++", width=32, height=32, num_images=1, **scale)  # fmt: skip
        return png

    def pixels(png):
        return torch.from_numpy(np.asarray(png, dtype=np.float32))

    at_default = pixels(request(served))  # --lora_scale 0.5
    assert abs(pixels(request(served, lora_scale=0)) - pixels(request(base))).max() == 0
    assert abs(pixels(request(served, lora_scale=1)) - pixels(request(full))).max() == 0
    assert abs(pixels(request(served)) - at_default).max() == 0  # a request without one gets the default back
    assert abs(at_default - pixels(request(base))).max() > 0
    assert request(served, lora_scale=0.25).info["parameters"].endswith("Lora: my-lora, Lora scale: 0.25")

    # The page: a "LoRA strength" slider when a LoRA is served, none to see otherwise.
    (images, _) = gradio_app.make_generate(served)("a red disc", "", 2, 7.5, "1", "DPM-Solver++", 32, 32, 1, 0)
    assert abs(pixels(images[0]) - pixels(request(base))).max() == 0
    for service, visible in ((served, True), (base, False)):
        app = gradio_app.build_app(service, title="t", description="d")
        (slider,) = [c for c in app.blocks.values() if getattr(c, "label", None) == "LoRA strength"]
        assert slider.visible == visible and slider.value == service.lora_scale
    with pytest.raises(gradio_app.gr.Error, match="serves no LoRA"):
        gradio_app.make_generate(base)("p", "", 2, 7.5, "1", "DPM-Solver++", 32, 32, 1, 0.5)
    with pytest.raises(gradio_app.gr.Error, match="from 0 to 2"):
        gradio_app.make_generate(served)("p", "", 2, 7.5, "1", "DPM-Solver++", 32, 32, 1, 3)

    # /v1: the lora_scale field (its refusal by a server without a LoRA is in tests/test_images_api.py).
    assert parse_generation_request({"prompt": "p", "lora_scale": 0.25}, served)["lora_scale"] == 0.25
    assert parse_generation_request({"prompt": "p"}, served)["lora_scale"] is None
    for bad in (3, -0.5, "1", True):
        with pytest.raises(BadRequest, match="'lora_scale' must be a number from 0 to 2"):
            parse_generation_request({"prompt": "p", "lora_scale": bad}, served)


class RecordingPipeline:
    """What LoraMix uses of a pipeline, recording the scales set."""

    def __init__(self):
        self.scales = []

    def enable_lora(self):
        pass

    def get_list_adapters(self):
        return {"unet": ["default_0"]}

    def set_adapters(self, adapters, adapter_weights):
        self.scales.append(adapter_weights[0])


def test_requests_at_one_lora_scale_run_together_and_another_scale_waits_its_turn():
    pipeline = RecordingPipeline()
    gate = LoraMix(pipeline, (("default_0", (1.0, 1.0)),))
    inside, mixed = [], []
    entered = {name: threading.Event() for name in "abcde"}
    release = {name: threading.Event() for name in "abcde"}

    def request(name, scale):
        with gate.at((("default_0", (scale, scale)),)):
            inside.append(scale)
            mixed.append(len(set(inside)) > 1)
            entered[name].set()
            release[name].wait(10)
            inside.remove(scale)

    threads = {name: threading.Thread(target=request, args=(name, scale))
               for name, scale in (("a", 0.5), ("b", 0.5), ("c", 1.0), ("d", 0.5), ("e", 0.5))}  # fmt: skip
    for name in "ab":
        threads[name].start()
        assert entered[name].wait(5)  # b at a's scale runs beside it
    threads["c"].start()
    assert not entered["c"].wait(0.3)  # another scale waits for both
    for name in "de":
        threads[name].start()
        assert not entered[name].wait(0.3)  # a's scale again, but after c: their turn comes after c's
    release["a"].set()
    release["b"].set()
    assert entered["c"].wait(5) and not entered["d"].wait(0.3)
    release["c"].set()
    assert entered["d"].wait(5) and entered["e"].wait(5)  # the two waiting at one scale run together
    release["d"].set()
    release["e"].set()
    for thread in threads.values():
        thread.join(10)
    assert not any(mixed) and pipeline.scales == [1.0, 0.5, 1.0, 0.5]  # the first, as the server starts


def test_an_ema_unets_settings_in_its_config_load_without_diffusers_warning_and_other_keys_still_warn(
    tiny_sd, tmp_path
):
    # EMAModel.save_pretrained writes decay, optimization_step, ... into the averaged UNet's config.json, and
    # diffusers warns at each load that they "are not expected ... Please verify your config.json".
    from diffusers.training_utils import EMAModel

    from sdtoolkit.inference import quiet_diffusers_noise

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config).save_pretrained(
        tmp_path / "unet_ema"
    )
    quiet_diffusers_noise()
    logger = diffusers.utils.logging.get_logger("diffusers.configuration_utils")
    warned = logging.handlers.BufferingHandler(capacity=100)  # sees what the logger's filters let through
    logger.addHandler(warned)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    try:
        UNet2DConditionModel.from_pretrained(tmp_path / "unet_ema")
        assert not any("were passed to" in record.getMessage() for record in warned.buffer)
        config = json.loads((tmp_path / "unet_ema" / "config.json").read_text())
        (tmp_path / "unet_ema" / "config.json").write_text(json.dumps({**config, "not_a_setting": 1}))
        UNet2DConditionModel.from_pretrained(tmp_path / "unet_ema")
        assert any("'not_a_setting': 1} were passed to" in record.getMessage() for record in warned.buffer)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        logger.removeHandler(warned)
