"""Watching and stopping a generation: the page's progress bar and Stop button, AUTOMATIC1111's /sdapi/v1/progress,
interrupt and png-info, and what a stopped request gives back."""

import base64
import io
import re
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from diffusers import UNet2DConditionModel
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gradio_client import Client
from PIL import Image

import gradio_app
from sdtoolkit.a1111_api import a1111_api
from sdtoolkit.inference import load_pipeline
from sdtoolkit.serving import Generation, ImageService, RequestQueue, parameters_text, read_parameters
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.usefixtures("client_downloads")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

REQUEST = dict(prompt="a creature", negative_prompt="", guidance_scale=7.5, seed=1, scheduler="DPM-Solver++",
               width=64, height=64, num_images=1)  # fmt: skip


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


class Hold:
    """Holds the UNet's `at`-th call (the step after `at - 1` are done) until release(); reached is set there."""

    def __init__(self, pipeline, at=2):
        self.calls, self.at = 0, at
        self.reached, self.go = threading.Event(), threading.Event()
        self.handle = pipeline.unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.go.wait(60), "the test never released the held step"

    def release(self):
        self.go.set()
        self.handle.remove()


@pytest.fixture
def service(tiny_sd):
    pipeline = load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    return ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=4))


def in_thread(function, **arguments):
    """Run function(**arguments) in a thread; the thread, and a list that gets its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(**arguments)))
    thread.start()
    return thread, result


def test_a_stopped_run_ends_after_its_step_and_its_images_say_so(service):
    seen = []

    def stop_after_two(step, steps):
        seen.append((step, steps))
        if step == 2:
            generation.stop.set()

    generation = Generation(on_step=stop_after_two)
    stopped = service.generate(**REQUEST, steps=6, generation=generation)
    assert seen == [(1, 6), (2, 6)] and generation.stopped_at == 2
    assert stopped[0].info["parameters"].endswith("Model: tiny-sd, Interrupted at step: 2")
    finished = service.generate(**REQUEST, steps=6)
    assert "Interrupted" not in finished[0].info["parameters"]
    assert not np.array_equal(pixels(stopped[0]), pixels(finished[0]))  # the latents as they stood, still noisy
    # An edit runs only its strength's share of the steps, and counts those.
    edit = Generation()
    service.generate(**REQUEST, steps=6, image=Image.new("RGB", (64, 64)), strength=0.5, generation=edit)
    assert (edit.step, edit.steps, edit.stopped_at) == (3, 3, None)


def test_a_stop_reaches_only_its_own_source_and_a_waiting_request_leaves_the_queue(service):
    hold = Hold(service.pipeline)
    first = Generation(source="page:a")
    running, result = in_thread(service.generate, **REQUEST, steps=4, generation=first)
    try:
        assert hold.reached.wait(60)
        waiting = Generation(source="page:b")
        queued, queued_result = in_thread(service.generate, **REQUEST, steps=4, generation=waiting)
        while len(service.generations) < 2:
            time.sleep(0.01)
        assert [g.source for g in service.in_queue("page:b")] == ["page:b"]
        # Another source's stop, and page:b's stop for running requests only, leave both alone.
        assert service.stop("sdapi") == 0 and service.stop("page:b") == 0 and not waiting.stop.is_set()
        assert service.stop("page:b", waiting=True) == 1
        queued.join(10)
        assert not queued.is_alive(), "the stopped request still waits for a turn"
        assert queued_result == [[]] and waiting.stopped_at == 0 and not first.stop.is_set()
    finally:
        hold.release()
        running.join(60)
    assert len(result[0]) == 1 and first.stopped_at is None and service.generations == []


def test_sdapi_progress_follows_a_request_and_interrupt_stops_it(service):
    app = FastAPI()
    app.include_router(a1111_api(service))
    client = TestClient(app)
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    api.session = client  # webuiapi's calls, through the app in this process
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)  # returns at once on an idle server

    hold = Hold(service.pipeline, at=3)
    body = {"prompt": "a creature", "seed": 5, "steps": 8, "width": 64, "height": 64}
    thread, answer = in_thread(client.post, url="/sdapi/v1/txt2img", json=body)
    try:
        assert hold.reached.wait(60)
        busy = api.get_progress()
        assert busy["progress"] == 2 / 8 and busy["eta_relative"] > 0 and busy["current_image"] is None
        assert {k: busy["state"][k] for k in ("job_count", "sampling_step", "sampling_steps", "interrupted")} == {
            "job_count": 1, "sampling_step": 2, "sampling_steps": 8, "interrupted": False,
        }  # fmt: skip
        assert api.interrupt() == {}
        assert api.get_progress()["state"]["interrupted"] is True
    finally:
        hold.release()
        thread.join(60)
    response = answer[0]
    assert response.status_code == 200, response.text  # as AUTOMATIC1111: the images as they stood
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert "Interrupted at step: 3" in image.info["parameters"]
    assert api.get_progress()["state"]["job_count"] == 0


@pytest.mark.parametrize(
    "path, body",
    [
        ("v1/images/generations", {"prompt": "a creature", "size": "64x64", "steps": 20}),
        ("sdapi/v1/txt2img", {"prompt": "a creature", "width": 64, "height": 64, "steps": 20}),
    ],
)
def test_a_client_that_hangs_up_frees_its_turn(server, path, body):
    # Every UNet call of the server (it runs in this process) is counted, and the second is held until the client
    # has given up and the server has had time to see it (it looks every half second).
    calls, go = [], threading.Event()

    def hold(module, args):
        if isinstance(module, UNet2DConditionModel):
            calls.append(1)
            if len(calls) == 2:
                go.wait(60)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hold)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.local_url}{path}", json=body, timeout=3)
        time.sleep(1.5)
        go.set()
        deadline = time.time() + 60
        while httpx.get(f"{server.local_url}health").json()["queue"]["running"] and time.time() < deadline:
            time.sleep(0.1)
    finally:
        go.set()
        handle.remove()
    assert len(calls) == 2  # stopped after the held step, not run to its 20th


def test_png_info_reads_txt2imgs_parameters_and_they_make_the_image_again(server):
    api = webuiapi.WebUIApi(baseurl=f"{server.local_url}sdapi/v1")
    made = api.txt2img(prompt="a red, round creature", negative_prompt="blue: square", seed=11, steps=3, width=64,
                       height=72, sampler_name="Euler a", batch_size=2, cfg_scale=6.5,
                       override_settings={"CLIP_stop_at_last_layers": 2})  # fmt: skip
    info = api.png_info(made.images[1]).json
    fields = info["parameters"]
    assert info["info"] == made.images[1].info["parameters"]
    assert (fields["Prompt"], fields["Negative prompt"], fields["Seed"], fields["Clip skip"]) == (
        "a red, round creature", "blue: square", "12", "2",
    )  # fmt: skip
    # A1111's "send to txt2img": the image's own fields as a request give its pixels (up to 1 in 255: it was made
    # in a batch of two, this one alone).
    again = api.txt2img(prompt=fields["Prompt"], negative_prompt=fields["Negative prompt"], seed=int(fields["Seed"]),
                        steps=int(fields["Steps"]), cfg_scale=float(fields["CFG scale"]), width=int(fields["Size-1"]),
                        height=int(fields["Size-2"]), sampler_name=fields["Sampler"],
                        override_settings={"CLIP_stop_at_last_layers": int(fields["Clip skip"])})  # fmt: skip
    assert np.abs(pixels(again.image) - pixels(made.images[1])).max() <= 1
    plain = api.png_info(Image.open(REPO / "data" / "creatures" / "0000.png")).json
    assert plain["info"] == "" and plain["parameters"]["Prompt"] == ""
    # AUTOMATIC1111 writes a JPEG's or WebP's parameters in its EXIF comment, as piexif's UTF-16 "UNICODE" one.
    text = "a crëature\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    for kind in ("jpeg", "webp"):
        buffer = io.BytesIO()
        made.images[0].save(buffer, kind, exif=exif.tobytes())
        body = {"image": base64.b64encode(buffer.getvalue()).decode()}
        info = httpx.post(f"{server.local_url}sdapi/v1/png-info", json=body).json()
        assert info["info"] == text and info["parameters"]["Prompt"] == "a crëature", kind


def test_parameters_read_back_as_automatic1111_reads_them():
    text = parameters_text(prompt="a cat, (red:1.2)\nBREAK on a mat", negative_prompt="blurry", steps=25,
                           scheduler="DPM-Solver++ Karras", guidance_scale=7.5, seed=3, width=512, height=768,
                           model="my, model", lora="style: v2", clip_skip=2)  # fmt: skip
    assert read_parameters(text) == {
        "Prompt": "a cat, (red:1.2)\nBREAK on a mat", "Negative prompt": "blurry", "Steps": "25",
        "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "3", "Size-1": "512", "Size-2": "768",
        "Model": "my, model", "Clip skip": "2", "Lora": "style: v2",
    }  # fmt: skip
    # AUTOMATIC1111's own, with a hash and a schedule type; a text with no settings line is all prompt.
    theirs = read_parameters("a dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 9, Model hash: ab12")
    assert theirs["Schedule type"] == "Karras" and theirs["Model hash"] == "ab12" and theirs["Clip skip"] == "1"
    assert read_parameters("just a prompt: with a colon") == {
        "Prompt": "just a prompt: with a colon", "Negative prompt": "", "Clip skip": "1",
    }  # fmt: skip


def test_the_pages_bar_follows_the_steps_and_stop_stops_only_the_callers_own(service):
    app = gradio_app.build_app(service, title="Tiny", description="A tiny model.")
    app.queue(max_size=None, default_concurrency_limit=None)
    app.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    hold = Hold(service.pipeline, at=3)
    try:
        mine, theirs = Client(app.local_url, verbose=False), Client(app.local_url, verbose=False)
        job = mine.submit("a creature", "", 8, 7.5, "4", "DPM-Solver++", 64, 64, 1, api_name="/generate")
        assert hold.reached.wait(60)
        # The bar's updates come as Gradio sends them: "Waiting for a turn", then a step at a time.
        deadline, shown = time.time() + 20, None
        while shown != (2, 8, "steps", "Generating") and time.time() < deadline:
            time.sleep(0.05)
            bar = (job.status().progress_data or [None])[0]
            shown = bar and (bar.index, bar.length, bar.unit, bar.desc)
        assert shown == (2, 8, "steps", "Generating")
        theirs.predict(api_name="/stop")
        assert not service.in_queue(f"page:{mine.session_hash}")[0].stop.is_set()
        mine.predict(api_name="/stop")
        assert service.in_queue(f"page:{mine.session_hash}")[0].stop.is_set()
        hold.release()
        gallery, details = job.result(timeout=60)
        assert len(gallery) == 1 and "Stopped at step 3 of 8: the images are as they stood" in details
    finally:
        hold.release()
        app.close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package 'chromium'); .ci/run installs it")
def test_in_a_browser_stop_ends_the_visitors_request(service):
    from playwright.sync_api import expect, sync_playwright

    app = gradio_app.build_app(service, title="Tiny", description="A tiny model.")
    app.queue(max_size=None, default_concurrency_limit=None)
    app.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    hold = Hold(service.pipeline, at=3)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
            page = browser.new_page()
            page.goto(app.local_url, wait_until="domcontentloaded")
            page.get_by_label("Prompt", exact=True).fill("a creature")
            page.get_by_label("Seed (blank = random)").fill("4")
            page.get_by_role("button", name="Generate").click()
            assert hold.reached.wait(60)
            page.get_by_role("button", name="Stop").click()
            deadline = time.time() + 20
            while not service.generations[0].stop.is_set() and time.time() < deadline:
                time.sleep(0.05)
            hold.release()
            expect(page.get_by_label("Details")).to_have_value(re.compile("Stopped at step 3 of 25"), timeout=60_000)
            browser.close()
    finally:
        hold.release()
        app.close()
