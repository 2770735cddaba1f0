"""gradio_app.py: the UI builds without side effects, the API answers, bad input is refused, the server holds."""

import os
import shutil

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, AuthenticationError
from PIL import Image

import gradio_app
from sdtoolkit.inference import load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import DEMO_DATA, free_port, generate, run_entry_point, start

pytestmark = pytest.mark.usefixtures("client_downloads")


@pytest.fixture(scope="module")
def client(server):
    return Client(server.local_url, verbose=False)


def test_build_app_builds_without_launching(tiny_sd):
    pipeline = load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    service = ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=1))
    app = gradio_app.build_app(service, title="Tiny", description="A tiny model.")
    api_names = [dep.get("api_name") for dep in app.config["dependencies"]]
    assert "generate" in api_names
    assert not app.is_running


def test_defaults_listen_on_localhost_without_a_public_link(server):
    args = gradio_app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.model_path == "sd-pokemon-model"
    assert server.server_name == "127.0.0.1" and server.local_url.startswith("http://127.0.0.1:")
    assert server.share_url is None


def test_api_returns_images_of_the_requested_size(client):
    images, info = generate(client, width=64, height=96, num_images=2)
    assert [image.size for image in images] == [(64, 96), (64, 96)]
    assert info.startswith("Seed: 7")


def test_api_needs_only_a_prompt(client):
    # The README's client snippet: everything but the prompt has a default (25 DPM-Solver++ steps, random seed).
    gallery, info = client.predict(prompt="pikachu", api_name="/generate")
    assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (64, 64)
    assert info.startswith("Seed: ")


@pytest.mark.parametrize("scheduler", list(gradio_app.SCHEDULERS))
def test_same_seed_gives_the_same_image(client, scheduler):
    first, _ = generate(client, seed="7", scheduler=scheduler)
    again, _ = generate(client, seed="7", scheduler=scheduler)
    other, _ = generate(client, seed="8", scheduler=scheduler)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_blank_seed_is_random_and_shown_so_it_can_be_reused(client):
    image, info = generate(client, seed="")
    seed = info.splitlines()[0].removeprefix("Seed: ")
    _, info_again = generate(client, seed="")
    assert info_again != info
    reused, _ = generate(client, seed=seed)
    assert np.array_equal(np.asarray(image[0]), np.asarray(reused[0]))


def test_eight_concurrent_calls_all_complete(client):
    # Eight seeds: eight identical images at once race in Gradio's cache, which writes each image to a path named
    # by its content (save_pil_to_cache truncates and rewrites it while another download reads it).
    jobs = [client.submit("creature", "", 3, 7.5, str(seed), "DPM-Solver++", 64, 64, 1, api_name="/generate")
            for seed in range(8)]  # fmt: skip
    results = [job.result(timeout=120) for job in jobs]
    assert len(results) == 8 and all(len(gallery) == 1 for gallery, _ in results)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt="  "), "Please type a prompt"),
        # Gradio's sliders check their own range first, with their own clear message.
        (dict(steps=0), "Value 0 is less than minimum value 1"),
        (dict(steps=1000), "Value 1000 is greater than maximum value 150"),
        (dict(steps=2.5), "Steps must be a whole number"),
        (dict(guidance=-1), "Value -1 is less than minimum value 0"),
        (dict(seed="abc"), "The seed must be a whole number or blank"),
        (dict(seed="1.5"), "The seed must be a whole number or blank"),
        (dict(width=100), "Width must be divisible by 8"),
        (dict(height=2048), "Value 2048 is greater than maximum value 1024"),
        (dict(scheduler="Nope"), "Nope is not in the list of choices"),
        (
            dict(prompt="a [creature|dragon]"),
            "is AUTOMATIC1111's alternation .* which this toolkit does not read",
        ),
        # Image to image runs the last `strength` of the steps: here none.
        (
            dict(steps=3, image=handle_file(str(DEMO_DATA / "0000.png")), strength=0.2),
            "A strength of 0.2 with 3 steps runs no step",
        ),
    ],
)
def test_bad_input_is_refused_and_the_server_keeps_serving(client, change, message):
    with pytest.raises(AppError, match=message):
        generate(client, **change)
    images, _ = generate(client)
    assert len(images) == 1


def test_a_prompt_longer_than_clip_is_read_in_windows_and_says_so(client):
    long_prompt = " ".join(["a very detailed and colourful pokemon"] * 20)
    images, info = generate(client, prompt=long_prompt)
    assert len(images) == 1
    assert "The prompt was read in 2 windows of 75 tokens" in info
    # BREAK starts a window of its own; emphasis adds none.
    _, info = generate(client, prompt="(a red:1.3) creature BREAK [big eyes] BREAK blue")
    assert "The prompt was read in 3 windows of 75 tokens" in info
    _, info = generate(client, prompt="((a red creature)), [big eyes]")
    assert "windows" not in info


def test_auth_requires_the_login(tiny_sd):
    app = start(tiny_sd, "--auth", "ash:pikachu")
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(app.local_url, verbose=False)
        images, _ = generate(Client(app.local_url, auth=("ash", "pikachu"), verbose=False))
        assert len(images) == 1
    finally:
        app.close()


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    # In this process, as the script's entry point runs it (its own command line: tests/test_images_api.py's server
    # run from the user's folder).
    result = run_entry_point(gradio_app.main, "--model_path", tmp_path / "nope", capsys=capsys)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no model folder") and "make demo" in last and "bash train.sh" in last


def test_incomplete_model_folder_is_one_clear_line(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(gradio_app.UserError, match="not a complete diffusers pipeline folder"):
        gradio_app.main(["--model_path", str(tmp_path)])


def test_bad_auth_format():
    with pytest.raises(gradio_app.UserError, match="user:password"):
        gradio_app.parse_args(["--auth", "nocolon"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package 'chromium'); .ci/run installs it")
def test_a_person_generates_an_image_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    screenshot = os.environ.get("DEMO_SCREENSHOT") or str(tmp_path / "screenshot.png")
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.local_url, wait_until="domcontentloaded")
        page.get_by_label("Prompt", exact=True).fill("pikachu")
        page.get_by_label("Seed (blank = random)").fill("42")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_label("Details")).to_have_value("Seed: 42", timeout=60_000)
        thumbnail = page.get_by_role("button", name="Thumbnail 1 of 1").locator("img")
        expect(thumbnail).to_be_visible()
        assert thumbnail.evaluate("img => img.complete && img.naturalWidth") == 64  # the image itself arrived
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    assert Image.open(screenshot).size[0] == 1280


def test_a_port_out_of_range_is_one_line(capsys):
    result = run_entry_point(gradio_app.main, "--port", "99999", capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --port must be between 1 and 65535, got 99999"


def test_a_model_folder_missing_a_part_names_it(tiny_sd, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "unet")
    result = run_entry_point(gradio_app.main, "--model_path", broken, "--port", free_port(), capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the pipeline folder '{broken}' lacks unet/")


def test_served_images_leave_gradios_cache_after_cache_max_age(tiny_sd):
    import time

    app = start(tiny_sd, "--cache_max_age", "2")
    try:
        generate(Client(app.local_url, verbose=False))
        cached = [path for files in app.temp_file_sets for path in files]
        assert cached and all(os.path.exists(path) for path in cached)
        deadline = time.time() + 20
        while any(os.path.exists(path) for path in cached) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(os.path.exists(path) for path in cached)
    finally:
        app.close()
