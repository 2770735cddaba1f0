"""LoRAs applied by name from the prompt, as AUTOMATIC1111 applies them (gradio_app.py --lora_dir, <lora:name:weight>
tags): a tag gives the image of that LoRA served alone at that weight, tags mix, and a request without tags is
the base model's again."""

import base64
import collections
import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtoolkit.a1111_api import a1111_api
from sdtoolkit.images_api import ImageFiles, images_api
from sdtoolkit.inference import load_lora_dir, load_pipeline
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME
from sdtoolkit.serving import ImageService, LoraMix, LoraRemoved, RequestQueue
from tests.conftest import start, train

LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--max_train_steps", "4"]


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """A folder as AUTOMATIC1111's models/Lora: a kohya-ss file, a diffusers file with a text encoder adapter in a
    sub-folder, a pickle and a file that is no LoRA; and the two training runs."""
    root = tmp_path_factory.mktemp("loras")
    style, character = root / "style-run", root / "character-run"
    train(tiny_sd, style, *LORA, "--seed", "1")
    train(tiny_sd, character, *LORA, "--train_text_encoder", "--seed", "2")
    folder = root / "Lora"
    (folder / "people").mkdir(parents=True)
    shutil.copy(style / KOHYA_WEIGHTS_NAME, folder / "style.safetensors")
    shutil.copy(character / WEIGHTS_NAME, folder / "people" / "character.safetensors")
    (folder / "old.pt").write_bytes(b"never unpickled")
    (folder / "truncated.safetensors").write_bytes(b"not a safetensors file")
    save_file({"emb_params": torch.zeros(1, 32)}, folder / "not-a-lora.safetensors")
    return folder, style, character


def service(tiny_sd, lora=None, lora_dir=None, lora_scale=1.0):
    pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32, lora=lora, lora_scale=lora_scale)
    names = load_lora_dir(pipeline, str(lora_dir))[0] if lora_dir else {}
    queue = RequestQueue(concurrency=1, max_queue=4)
    return ImageService(
        pipeline, model_name="tiny-sd", lora_scale=lora_scale, queue=queue, loras=names,
        lora_dir=str(lora_dir) if lora_dir else None,
    )  # fmt: skip


def style_only(loras, tmp_path):
    """A --lora_dir of its own, which a test may change: the style LoRA alone."""
    folder = tmp_path / "Lora"
    folder.mkdir()
    shutil.copy(loras[1] / KOHYA_WEIGHTS_NAME, folder / "style.safetensors")
    return folder


def image(service, prompt, negative_prompt=""):
    (result,) = service.generate(
        prompt=prompt, negative_prompt=negative_prompt, steps=3, guidance_scale=7.5, seed=3, scheduler="DPM-Solver++",
        width=64, height=64, num_images=1,
    )  # fmt: skip
    return np.asarray(result)


def test_a_tag_applies_its_lora_at_its_weight_and_an_untagged_request_is_the_base_model(tiny_sd, loras):
    folder, style, character = loras
    pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    names, skipped = load_lora_dir(pipeline, str(folder))
    assert sorted(names) == ["character", "style"]
    reasons = dict(skipped)
    assert sorted(reasons) == ["not-a-lora.safetensors", "old.pt", "truncated.safetensors"]
    assert "pickle file" in reasons["old.pt"] and "holds no LoRA weights" in reasons["not-a-lora.safetensors"]

    tagged = service(tiny_sd, lora_dir=folder)
    base = image(service(tiny_sd), "a creature")
    for prompt, served in [("<lora:style:1> a creature", service(tiny_sd, lora=style)),
                           ("a creature <lora:style:0.5>", service(tiny_sd, lora=style, lora_scale=0.5)),
                           ("<lora:character> a creature", service(tiny_sd, lora=character))]:  # fmt: skip
        assert np.array_equal(image(tagged, prompt), image(served, "a creature")), prompt
    both = image(tagged, "a creature <lora:style:1> <lora:character:1>")
    assert not np.array_equal(both, image(tagged, "a creature <lora:style:1>"))
    assert not np.array_equal(both, image(tagged, "a creature <lora:character:1>"))
    assert np.array_equal(image(tagged, "a creature"), base)  # the LoRAs of the request before are off again
    assert np.array_equal(image(tagged, "a creature <lora:style:0>"), base)
    # Beside a served LoRA (--lora), which stays applied at its strength, and the tags' LoRAs on top.
    beside = service(tiny_sd, lora=style, lora_dir=folder)
    assert np.array_equal(image(beside, "a creature"), image(service(tiny_sd, lora=style), "a creature"))
    assert np.array_equal(image(beside, "<lora:character:1> a creature"), both)

    for prompt, negative, message in [
        ("<lora:nope:1> a creature", "", "<lora:nope> names no LoRA of this server; it has: character, style"),
        ("a creature", "<lora:style:1>", "tags go in the prompt, not in the negative prompt"),
        ("<lora:style:strong> a creature", "", "the weight must be a number"),
        ("<lora:style:3> a creature", "", "the weight must be from -2 to 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            image(tagged, prompt, negative)


def test_the_server_applies_tags_from_its_lora_dir(tiny_sd, loras, capsys):
    folder, style, _ = loras
    app = start(tiny_sd, "--lora_dir", str(folder))
    try:
        out = capsys.readouterr().out
        assert "LoRAs for <lora:name:weight> (2): character, style" in out
        assert "warning: --lora_dir: skipped old.pt: a pickle file" in out
        assert httpx.get(f"{app.local_url}health").json()["loras"] == ["character", "style"]
        body = {"prompt": "a creature <lora:style:0.5>", "seed": 3, "steps": 3, "size": "64x64"}
        response = httpx.post(f"{app.local_url}v1/images/generations", json=body, timeout=60)
        served = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        expected = image(service(tiny_sd, lora=style, lora_scale=0.5), "a creature")
        assert np.array_equal(np.asarray(served.convert("RGB")), expected)
        assert (
            served.info["parameters"].splitlines()[0] == "a creature <lora:style:0.5>"
        )  # as typed, as A1111 keeps it
        body["prompt"] = "<lora:nope> a creature"
        refused = httpx.post(f"{app.local_url}v1/images/generations", json=body, timeout=60)
        assert refused.status_code == 400 and "names no LoRA of this server" in refused.json()["error"]["message"]
    finally:
        app.close()


def test_a_tag_weighs_the_text_encoder_and_the_unet_apart_as_automatic1111_does(tiny_sd, loras, tmp_path):
    # <lora:name:te:unet> (and te=, unet=): the character LoRA's two parts apart give the images of files holding
    # only one of them.
    _, _, character = loras
    folder = tmp_path / "Lora"
    folder.mkdir()
    state = load_file(character / WEIGHTS_NAME)
    with safe_open(character / WEIGHTS_NAME, "pt") as f:
        metadata = f.metadata()  # each part's alpha
    shutil.copy(character / WEIGHTS_NAME, folder / "character.safetensors")
    for part, prefix in (("te", "text_encoder."), ("unet", "unet.")):
        only = {k: v for k, v in state.items() if k.startswith(prefix)}
        save_file(only, folder / f"character-{part}.safetensors", metadata=metadata)
    tagged = service(tiny_sd, lora_dir=folder)

    def same(prompt, other):
        assert np.abs(image(tagged, prompt).astype(int) - image(tagged, other).astype(int)).max() <= 1, prompt

    same("<lora:character:0:1> a creature", "<lora:character-unet:1> a creature")
    same("<lora:character:1:0> a creature", "<lora:character-te:1> a creature")
    same("<lora:character:te=0.5:unet=1.5> a creature", "<lora:character-te:0.5> <lora:character-unet:1.5> a creature")
    same("<lora:character:0.7> a creature", "<lora:character:0.7:0.7> a creature")
    assert not np.array_equal(
        image(tagged, "<lora:character:1:0> a creature"), image(tagged, "<lora:character:1> a creature")
    )
    for prompt, message in [
        ("<lora:character:1:1:1> a creature", "at most two weights, the text encoder's and the UNet's"),
        ("<lora:character:dyn=4> a creature", "dyn= is not supported here; te= and unet= are"),
        ("<lora:character:1:x> a creature", "<lora:character:x>: the weight must be a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            image(tagged, prompt)


def test_refresh_loras_takes_in_new_files_lets_go_of_removed_ones_and_waits_for_running_requests(
    tiny_sd, loras, tmp_path
):
    _, style, character = loras
    folder = tmp_path / "Lora"
    folder.mkdir()
    shutil.copy(style / KOHYA_WEIGHTS_NAME, folder / "style.safetensors")
    app = start(tiny_sd, "--lora_dir", str(folder))
    try:
        body = {"prompt": "<lora:character:1> a creature", "seed": 3, "steps": 3, "width": 64, "height": 64,
                "cfg_scale": 7.5, "sampler_name": "DPM++ 2M", "scheduler": "Uniform"}  # fmt: skip
        sdapi = f"{app.local_url}sdapi/v1"
        assert httpx.post(f"{sdapi}/txt2img", json=body, timeout=60).status_code == 400  # not there yet
        shutil.copy(character / WEIGHTS_NAME, folder / "character.safetensors")
        (folder / "style.safetensors").unlink()
        (folder / "old.pt").write_bytes(b"never unpickled")
        answer = httpx.post(f"{sdapi}/refresh-loras", timeout=60).json()
        assert (answer["added"], answer["removed"], answer["loras"]) == (["character"], ["style"], ["character"])
        assert "pickle file" in answer["skipped"]["old.pt"]
        assert [lora["name"] for lora in httpx.get(f"{sdapi}/loras").json()] == ["character"]
        response = httpx.post(f"{sdapi}/txt2img", json=body, timeout=60)
        png = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert np.array_equal(np.asarray(png.convert("RGB")), image(service(tiny_sd, lora=character), "a creature"))
        gone = httpx.post(f"{sdapi}/txt2img", json={**body, "prompt": "<lora:style:1> a creature"}, timeout=60)
        assert gone.status_code == 400 and "it has: character" in gone.json()["detail"]
    finally:
        app.close()


def test_a_refresh_waits_until_the_running_request_is_done(tiny_sd, loras, tmp_path):
    _, _, character = loras
    folder = style_only(loras, tmp_path)
    tagged = service(tiny_sd, lora_dir=folder)
    expected = image(tagged, "<lora:style:0.5> a creature")
    reached, go = threading.Event(), threading.Event()

    def hold(module, args):
        reached.set()
        go.wait(30)

    handle = tagged.pipeline.unet.register_forward_pre_hook(hold)
    result, refreshed = [], []
    running = threading.Thread(target=lambda: result.append(image(tagged, "<lora:style:0.5> a creature")))
    running.start()
    try:
        assert reached.wait(30)
        shutil.copy(character / WEIGHTS_NAME, folder / "character.safetensors")
        refresh = threading.Thread(target=lambda: refreshed.append(tagged.refresh_loras()))
        refresh.start()
        refresh.join(1)
        assert refresh.is_alive() and refreshed == []  # the LoRA layers don't change under a running request
    finally:
        handle.remove()
        go.set()
    running.join(30)
    refresh.join(30)
    assert np.array_equal(result[0], expected) and refreshed[0][0] == ["character"]
    assert np.array_equal(
        image(tagged, "<lora:style:0.5> a creature"), expected
    )  # and applied as before, at its weight
    # A file taken away: its LoRA is let go of, weights and all.
    adapter = tagged.loras["style"]
    (folder / "style.safetensors").unlink()
    assert tagged.refresh_loras()[1] == ["style"] and sorted(tagged.loras) == ["character"]
    assert adapter not in {a for names in tagged.pipeline.get_list_adapters().values() for a in names}


def test_a_request_whose_lora_a_refresh_lets_go_of_while_it_waits_is_a_400_naming_its_tag(tiny_sd, loras, tmp_path):
    folder = style_only(loras, tmp_path)
    tagged = service(tiny_sd, lora_dir=folder)
    app = FastAPI()
    app.include_router(images_api(tagged, files=ImageFiles(tmp_path / "files", 3600)))
    app.include_router(a1111_api(tagged))
    client = TestClient(app)
    reached, go = threading.Event(), threading.Event()

    def hold(module, args):
        reached.set()
        go.wait(30)

    handle = tagged.pipeline.unet.register_forward_pre_hook(hold)
    answers = {}

    def post(url, body):
        answers[url] = client.post(url, json={"prompt": "<lora:style:0.5> a creature", "steps": 2, **body})

    running = threading.Thread(target=lambda: image(tagged, "a creature"))
    waiting = [
        threading.Thread(target=post, args=("/sdapi/v1/txt2img", {"width": 64, "height": 64})),
        threading.Thread(target=post, args=("/v1/images/generations", {"size": "64x64"})),
    ]
    running.start()
    try:
        assert reached.wait(30)
        for thread in waiting:
            thread.start()
        deadline = time.time() + 30
        while len(tagged.generations) < 3 and time.time() < deadline:  # both checked, and waiting their turn
            time.sleep(0.05)
        (folder / "style.safetensors").unlink()
        refresh = threading.Thread(target=tagged.refresh_loras)
        refresh.start()
    finally:
        handle.remove()
        go.set()
    for thread in [running, refresh, *waiting]:
        thread.join(60)
    message = "a refresh of --lora_dir let go of <lora:style> while this request waited (its file was removed)"
    assert answers["/sdapi/v1/txt2img"].status_code == 400
    assert answers["/sdapi/v1/txt2img"].json()["detail"] == message
    assert answers["/v1/images/generations"].status_code == 400
    assert answers["/v1/images/generations"].json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "prompt", "code": None,
    }  # fmt: skip
    assert np.array_equal(image(tagged, "a creature"), image(service(tiny_sd), "a creature"))  # and on it goes


class Adapters:
    """What LoraMix uses of a pipeline, without a model: the adapters there are, and the mix set last."""

    def __init__(self, names):
        self.names, self.set = set(names), None

    def get_list_adapters(self):
        return {"unet": sorted(self.names)}

    def enable_lora(self):
        pass

    def disable_lora(self):
        self.set = ()

    def set_adapters(self, names, adapter_weights):
        self.set = tuple(names)


def test_a_request_refused_for_a_removed_lora_lets_the_next_one_in_line_go_on():
    pipeline = Adapters(["a", "b"])
    mixer = LoraMix(pipeline, ())
    release, results = threading.Event(), {}

    def request(name, mix, hold=None):
        try:
            with mixer.at(mix):
                if hold is not None:
                    hold.wait(30)
            results[name] = "ran"
        except LoraRemoved:
            results[name] = "refused"

    def refresh():
        with mixer.alone():
            pipeline.names.discard("b")  # its file is gone
        results["refresh"] = "done"

    def then(target, *args):
        waiting = len(mixer.waiting)
        thread = threading.Thread(target=target, args=args, daemon=True)  # one stuck in line fails, not hangs
        thread.start()
        deadline = time.time() + 10
        while len(mixer.waiting) == waiting and time.time() < deadline:  # in line before the next one comes
            time.sleep(0.01)
        return thread

    running = threading.Thread(target=request, args=("running", (("a", (1.0, 1.0)),), release), daemon=True)
    running.start()
    deadline = time.time() + 10
    while mixer.running == 0 and time.time() < deadline:
        time.sleep(0.01)
    # In line: the refresh, a request with the LoRA it removes, and one with another mix behind them.
    threads = [
        then(refresh),
        then(request, "tagged", (("b", (1.0, 1.0)),)),
        then(request, "next", (("a", (0.5, 0.5)),)),
    ]
    release.set()
    for thread in [running, *threads]:
        thread.join(10)
    assert results == {"running": "ran", "refresh": "done", "tagged": "refused", "next": "ran"}
    assert pipeline.set == ("a",) and mixer.waiting == collections.deque() and mixer.running == 0
