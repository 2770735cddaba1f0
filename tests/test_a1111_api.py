"""gradio_app.py's AUTOMATIC1111-compatible API (/sdapi/v1), through webuiapi (the Python client written for
AUTOMATIC1111's API) and plain HTTP: the same pixels as /v1 for the same request, its fields, errors and login."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from sdtoolkit.a1111_api import a1111_api, sampler_for
from sdtoolkit.images_api import BadRequest
from sdtoolkit.inference import load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("client_downloads")

SOURCE = Image.open(REPO / "data" / "creatures" / "0000.png").convert("RGB").resize((64, 64))


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def png_file(image):
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def v1(server, path="generations", **request):
    """/v1's images for a request (a JSON body, or an edit's form and files)."""
    url = f"{server.local_url}v1/images/{path}"
    if path == "edits":
        files = request.pop("files")
        response = httpx.post(url, files=files, data={k: str(v) for k, v in request.items()}, timeout=120)
    else:
        response = httpx.post(url, json=request, timeout=120)
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


def sdapi(server, path, body):
    return httpx.post(f"{server.local_url}sdapi/v1/{path}", json=body, timeout=120)


def test_webuiapi_gets_the_pixels_v1_gives_for_the_same_request(server):
    api = webuiapi.WebUIApi(baseurl=f"{server.local_url}sdapi/v1")
    result = api.txt2img(prompt="a (red:1.2) creature", negative_prompt="blue", seed=7, steps=3, cfg_scale=7.5,
                         width=64, height=64, sampler_name="DPM++ 2M", scheduler="Uniform", batch_size=2)  # fmt: skip
    same = v1(server, prompt="a (red:1.2) creature", negative_prompt="blue", seed=7, steps=3, guidance_scale=7.5,
              size="64x64", scheduler="DPM-Solver++", n=2)  # fmt: skip
    assert len(result.images) == 2
    for ours, theirs in zip(result.images, same):
        assert np.array_equal(pixels(ours), pixels(theirs))
    assert result.info["all_seeds"] == [7, 8] and result.info["sampler_name"] == "DPM++ 2M"
    assert result.images[1].info["parameters"] == result.info["infotexts"][1] == same[1].info["parameters"]
    # The sampler's own schedule ("Automatic"): Karras for DPM++ 2M, as in AUTOMATIC1111 1.9.
    karras = api.txt2img(prompt="a creature", seed=7, steps=3, width=64, height=64, sampler_name="DPM++ 2M")
    assert np.array_equal(
        pixels(karras.image),
        pixels(
            v1(
                server,
                prompt="a creature",
                seed=7,
                steps=3,
                size="64x64",
                guidance_scale=7,
                scheduler="DPM-Solver++ Karras",
            )[0]
        ),  # fmt: skip
    )


def test_img2img_and_inpainting_get_the_pixels_of_v1_edits(server):
    api = webuiapi.WebUIApi(baseurl=f"{server.local_url}sdapi/v1")
    common = dict(prompt="a creature", seed=3, steps=4, width=64, height=64, sampler_name="DPM++ 2M",
                  scheduler="Uniform")  # fmt: skip
    redrawn = api.img2img(images=[SOURCE], denoising_strength=0.5, cfg_scale=7.5, **common).image
    edit = dict(prompt="a creature", seed=3, steps=4, size="64x64", strength=0.5, scheduler="DPM-Solver++")
    same = v1(server, "edits", files={"image": ("in.png", png_file(SOURCE), "image/png")}, **edit)[0]
    assert np.array_equal(pixels(redrawn), pixels(same))
    # AUTOMATIC1111's mask is white where to redraw; /v1's (OpenAI's) is transparent there.
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    transparent_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    inpainted = api.img2img(images=[SOURCE], mask_image=white_left, mask_blur=0, denoising_strength=1,
                            cfg_scale=7.5, **common).image  # fmt: skip
    files = {
        "image": ("in.png", png_file(SOURCE), "image/png"),
        "mask": ("m.png", png_file(transparent_left), "image/png"),
    }
    same = v1(server, "edits", files=files, **{**edit, "strength": 1})[0]
    assert np.array_equal(pixels(inpainted), pixels(same))
    # inpainting_mask_invert=1 redraws the black part instead: the other half.
    inverted = api.img2img(images=[SOURCE], mask_image=ImageOps.invert(white_left), inpainting_mask_invert=1,
                           mask_blur=0, denoising_strength=1, cfg_scale=7.5, **common).image  # fmt: skip
    assert np.array_equal(pixels(inverted), pixels(inpainted))


def test_a_requests_clip_skip_the_model_the_lists_and_what_this_server_cannot_do(server):
    base = {"prompt": "a creature", "seed": 1, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.5}
    last, skipped = (
        sdapi(server, "txt2img", {**base, "override_settings": {"CLIP_stop_at_last_layers": n}}).json() for n in (1, 2)
    )
    assert last["images"] != skipped["images"] and '"clip_skip": 2' in skipped["info"]
    # n_iter batches of batch_size images; a null field is its default, as clients send them.
    two = sdapi(server, "txt2img", {**base, "n_iter": 2, "batch_size": None}).json()
    assert len(two["images"]) == 2 and '"all_seeds": [1, 2]' in two["info"]
    unsent = sdapi(server, "txt2img", {**base, "send_images": False}).json()  # as AUTOMATIC1111: info, no images
    assert unsent["images"] == [] and '"all_seeds": [1]' in unsent["info"]
    assert "Seed: 2," in Image.open(io.BytesIO(base64.b64decode(two["images"][1]))).info["parameters"]
    assert "Clip skip: 2" in Image.open(io.BytesIO(base64.b64decode(skipped["images"][0]))).info["parameters"]
    models = httpx.get(f"{server.local_url}sdapi/v1/sd-models").json()
    options = httpx.get(f"{server.local_url}sdapi/v1/options").json()
    assert models[0]["title"] == options["sd_model_checkpoint"] == "tiny-sd"
    # Clients pick the model through the options: the served one is accepted, nothing else is.
    set_model = httpx.post(f"{server.local_url}sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"})
    assert set_model.status_code == 200 and set_model.json() is True
    other = httpx.post(f"{server.local_url}sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"})
    assert other.status_code == 400 and "can't be set here" in other.json()["detail"]
    samplers = [s["name"] for s in httpx.get(f"{server.local_url}sdapi/v1/samplers").json()]
    assert "DPM++ 2M Karras" in samplers and "Euler a" in samplers
    for body, message in (
        ({"enable_hr": True}, "'enable_hr' is not supported by this server; leave it at false"),
        ({"restore_faces": True}, "'restore_faces' is not supported"),
        ({"batch_size": 3, "n_iter": 2}, "'batch_size' x 'n_iter' is 6; this server makes at most 4"),
        ({"sampler_name": "LMS"}, "unknown 'sampler_name' 'LMS'; this server has DPM++ 2M, "),
        ({"width": 100}, "'width' must be a multiple of 8"),
        ({"override_settings": {"sd_vae": "x"}}, "'override_settings' 'sd_vae' can't be changed per request"),
        ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "the model 'sdxl' is not served here"),
        ({"prompt": "<lora:style:1> a creature"}, "names no LoRA of this server"),
        ({"prompt": "a creature AND a dragon"}, "composable diffusion (AND), which this toolkit does not read"),
    ):
        response = sdapi(server, "txt2img", {**base, **body})
        assert response.status_code == 400 and message in response.json()["detail"], (body, response.text)
    assert sdapi(server, "img2img", {**base, "init_images": ["bm90IGFuIGltYWdl"]}).status_code == 400
    assert "is not served here" in httpx.post(f"{server.local_url}sdapi/v1/skip").json()["detail"]
    refresh = httpx.post(f"{server.local_url}sdapi/v1/refresh-loras")
    assert refresh.status_code == 400 and "no --lora_dir" in refresh.json()["detail"]


def test_samplers_and_schedule_types_by_automatic1111s_names():
    for sampler, schedule, ours in (
        ("DPM++ 2M", "Automatic", "DPM-Solver++ Karras"), ("DPM++ 2M", "Uniform", "DPM-Solver++"),
        ("DPM++ 2M Karras", None, "DPM-Solver++ Karras"), ("DPM++ 2M SDE", "Karras", "DPM-Solver++ SDE Karras"),
        ("Euler a", "automatic", "Euler ancestral"), ("Euler", None, "Euler"), ("PLMS", None, "PNDM"),
    ):  # fmt: skip
        assert sampler_for(sampler, schedule) == ours, (sampler, schedule)
    for sampler, schedule, message in (
        ("Euler a", "Karras", "'Euler a' has no Karras schedule here"),
        ("DPM++ 2M SDE", None, "has only a Karras schedule here: send 'scheduler': 'Karras'"),
        ("DPM++ 2M", "Exponential", "unknown 'scheduler' 'exponential'"),
    ):
        with pytest.raises(BadRequest, match=message):
            sampler_for(sampler, schedule)


def test_a_login_or_the_key_is_needed_when_the_server_has_one(tiny_sd):
    service = ImageService(load_pipeline(tiny_sd, torch.device("cpu"), torch.float32), model_name="tiny-sd",
                           queue=RequestQueue(concurrency=1, max_queue=1))  # fmt: skip
    app = FastAPI()
    app.include_router(a1111_api(service, auth=("ash", "pikachu"), api_key="s3cret"))
    client = TestClient(app)
    assert client.get("/sdapi/v1/options").status_code == 401
    assert client.get("/sdapi/v1/options", auth=("ash", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/options", auth=("ash", "pikachu")).status_code == 200
    assert client.get("/sdapi/v1/options", auth=("anyone", "s3cret")).status_code == 200
    assert client.get("/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/sdapi/v1/unknown").status_code == 401  # not even what exists is said without a login


def test_every_list_sillytavern_reads_when_it_connects_answers(server):
    # SillyTavern's "SD Web UI" source reads these to fill its menus (its server's stable-diffusion endpoints);
    # one failing breaks its menu. The upscalers it merges with the latent upscale modes.
    for path in ("options", "sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae",
                 "progress"):  # fmt: skip
        response = httpx.get(f"{server.local_url}sdapi/v1/{path}")
        assert response.status_code == 200, (path, response.text)
    assert httpx.get(f"{server.local_url}sdapi/v1/latent-upscale-modes").json() == []
