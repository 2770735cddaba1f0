"""Guidance rescale (Lin et al., arXiv 2305.08891, section 3.4): a model that samples with zero terminal SNR has its
classifier-free guidance rescaled by 0.7 wherever it generates (training's validation images, metrics.py, the page,
/v1 and /sdapi/v1), unless told otherwise; other models by 0 (off)."""

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import gradio_app
import metrics
from sdtoolkit.a1111_api import parse_request
from sdtoolkit.errors import UserError
from sdtoolkit.images_api import BadRequest, parse_generation_request
from sdtoolkit.inference import default_guidance_rescale, load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import start, train

CPU = torch.device("cpu")
REQUEST = dict(prompt="a red disc", negative_prompt="", steps=2, guidance_scale=7.5, seed=1, scheduler="DDIM",
               width=32, height=32, num_images=1)  # fmt: skip


@pytest.fixture(scope="module")
def zero_snr_model(tiny_sd, tmp_path_factory):
    """The tiny pipeline with the scheduler a --zero_terminal_snr v-prediction run saves: DDIM, its betas rescaled
    to zero SNR at the last timestep, trailing steps (tests/test_loading.py checks that training saves it)."""
    folder = tmp_path_factory.mktemp("zero-snr") / "model"
    shutil.copytree(tiny_sd, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="DDIMScheduler", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")  # fmt: skip
    config_path.write_text(json.dumps(config))
    return str(folder)


def pixels(image):
    return np.asarray(image, dtype=np.float32)


def service(path, **kwargs):
    pipeline = load_pipeline(path, CPU, torch.float32)
    return ImageService(pipeline, model_name="m", queue=RequestQueue(concurrency=1, max_queue=4), **kwargs)


def test_the_default_is_0_7_at_zero_terminal_snr_and_off_otherwise(tiny_sd, zero_snr_model):
    assert default_guidance_rescale(load_pipeline(zero_snr_model, CPU, torch.float32).scheduler) == 0.7
    assert default_guidance_rescale(load_pipeline(tiny_sd, CPU, torch.float32).scheduler) == 0.0


def test_the_server_rescales_a_zero_snr_models_guidance_and_writes_it_in_the_png(tiny_sd, zero_snr_model):
    zero = service(zero_snr_model)
    (default,) = zero.generate(**REQUEST)
    (rescaled,) = zero.generate(**REQUEST, guidance_rescale=0.7)
    (off,) = zero.generate(**REQUEST, guidance_rescale=0)
    assert np.array_equal(pixels(default), pixels(rescaled)) and not np.array_equal(pixels(default), pixels(off))
    assert default.info["parameters"].endswith("Model: m, Rescale CFG: 0.7")
    assert "Rescale CFG" not in off.info["parameters"]
    # --guidance_rescale sets the server's default; an epsilon model's is off.
    (told,) = service(zero_snr_model, guidance_rescale=0.3).generate(**REQUEST)
    assert told.info["parameters"].endswith("Rescale CFG: 0.3")
    (plain,) = service(tiny_sd).generate(**REQUEST)
    assert "Rescale CFG" not in plain.info["parameters"]

    # Edits have no rescale in diffusers: by default they go without; asked for, it is refused.
    edit = dict(REQUEST, image=Image.new("RGB", (32, 32), "red"), strength=0.5)
    (edited,) = zero.generate(**edit)
    assert "Rescale CFG" not in edited.info["parameters"]
    with pytest.raises(ValueError, match="guidance_rescale is for text to image"):
        zero.generate(**edit, guidance_rescale=0.7)

    # The page: its slider's value is the request's; an edit's note says it ran without.
    generate = gradio_app.make_generate(zero)
    page_args = ("a red disc", "", 2, 7.5, "1", "DDIM", 32, 32, 1, None)
    (image,), _ = generate(*page_args, None, 0.5, None, 0.7)
    assert np.array_equal(pixels(Image.open(image) if isinstance(image, str) else image), pixels(default))
    (image,), _ = generate(*page_args, None, 0.5, None, 0.2)
    assert image.info["parameters"].endswith("Rescale CFG: 0.2")
    _, details = generate(*page_args, Image.new("RGB", (32, 32), "red"), 0.5, None, 0.7)
    assert "Guidance rescale is for text to image only: this edit ran without it." in details
    with pytest.raises(gradio_app.gr.Error, match="guidance rescale must be from 0 to 1"):
        generate(*page_args, None, 0.5, None, 1.5)


def test_the_apis_take_a_rescale_for_generations_and_refuse_it_for_edits(zero_snr_model):
    zero = service(zero_snr_model)
    body = {"prompt": "a red disc"}
    assert parse_generation_request(body, zero)["guidance_rescale"] is None  # the server's default
    assert parse_generation_request({**body, "guidance_rescale": 0.25}, zero)["guidance_rescale"] == 0.25
    for bad in (1.5, -0.1, True, "0.7"):
        with pytest.raises(BadRequest, match="'guidance_rescale' must be a number from 0 to 1") as err:
            parse_generation_request({**body, "guidance_rescale": bad}, zero)
        assert err.value.param == "guidance_rescale"
    # AUTOMATIC1111's API, in the name the Forge web UIs give it; left out, the server's default.
    arguments, _ = parse_request({"prompt": "a red disc", "rescale_cfg": 0.25}, zero)
    assert arguments["guidance_rescale"] == 0.25
    assert "guidance_rescale" not in parse_request({"prompt": "a red disc"}, zero)[0]
    with pytest.raises(BadRequest, match="'rescale_cfg' must be from 0 to 1"):
        parse_request({"prompt": "a red disc", "rescale_cfg": 2}, zero)
    with pytest.raises(BadRequest, match="'rescale_cfg' is for txt2img"):
        parse_request({"prompt": "a red disc", "rescale_cfg": 0.7, "init_images": ["x"]}, zero, edit=True)


def test_metrics_scores_each_model_with_its_own_rescale_unless_told(tiny_sd, tiny_clip, zero_snr_model, tmp_path):
    def scores(*extra):
        report = metrics.main(["--model_path", tiny_sd, zero_snr_model, "--clip_model", tiny_clip, "--output_dir",
                               str(tmp_path / "scores"), "--num_inference_steps", "2", "--resolution", "32",
                               "--device", "cpu", *extra])  # fmt: skip
        table = (tmp_path / "scores" / "report.md").read_text()
        return [m["guidance_rescale"] for m in report["models"]], [m["clip_score"] for m in report["models"]], table

    rescales, (base, zero), table = scores()
    assert rescales == [0.0, 0.7] and "| guidance rescale |" in table
    rescales, (base_off, zero_off), table = scores("--guidance_rescale", "0")
    assert rescales == [0.0, 0.0] and "| guidance rescale |" not in table
    assert base_off == base and zero_off != zero
    for bad in (["--guidance_rescale", "1.5"], ["--doc_protocol", "--guidance_rescale", "0.7"]):
        with pytest.raises(UserError, match="--guidance_rescale"):
            metrics.parse_args(["--model_path", tiny_sd, *bad])
    with pytest.raises(UserError, match="--guidance_rescale must be from 0"):
        gradio_app.parse_args(["--model_path", tiny_sd, "--guidance_rescale", "-1"])


def test_a_zero_terminal_snr_runs_validation_images_are_rescaled(tiny_sd, tmp_path, monkeypatch):
    asked = []
    call = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("guidance_rescale"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    train(tiny_sd, tmp_path / "zero", "--prediction_type", "v_prediction", "--zero_terminal_snr", "--max_train_steps",
          "1", "--validation_prompts", "a red disc")  # fmt: skip
    assert asked == [0.7, 0.7]  # the validation at the last step, and the final one
    assert (tmp_path / "zero" / "validation" / "final").is_dir()


def test_a_server_started_with_guidance_rescale_serves_it_on_every_api(zero_snr_model):
    app = start(zero_snr_model, "--guidance_rescale", "0.3")
    try:
        url = app.local_url

        def parameters(b64):
            return Image.open(io.BytesIO(base64.b64decode(b64))).info["parameters"]

        body = {"prompt": "a red disc", "steps": 2, "size": "64x64", "scheduler": "DDIM", "seed": 1}
        (default,) = httpx.post(f"{url}v1/images/generations", json=body, timeout=60).json()["data"]
        assert parameters(default["b64_json"]).endswith("Rescale CFG: 0.3")
        (off,) = httpx.post(f"{url}v1/images/generations", json={**body, "guidance_rescale": 0}, timeout=60).json()[
            "data"
        ]
        assert "Rescale CFG" not in parameters(off["b64_json"])
        a1111 = {"prompt": "a red disc", "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM", "seed": 1}
        answer = httpx.post(f"{url}sdapi/v1/txt2img", json={**a1111, "rescale_cfg": 0.5}, timeout=60).json()
        assert parameters(answer["images"][0]).endswith("Rescale CFG: 0.5")
    finally:
        app.close()
