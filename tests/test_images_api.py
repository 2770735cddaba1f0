"""gradio_app.py's OpenAI-compatible API, /health and the PNG parameters, through real clients: the openai SDK,
gradio_client, plain HTTP, and sd-parsers (a third-party reader of AUTOMATIC1111's PNG metadata)."""

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from diffusers import StableDiffusionPipeline
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from sd_parsers import ParserManager
from transformers import CLIPTokenizer

import gradio_app
from sdtoolkit.clip_windows import encode_prompts, parse_emphasis, token_windows, unsupported_syntax
from sdtoolkit.images_api import edit_size
from sdtoolkit.inference import load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import REPO, example_args, free_port, generate, literal_windows, run_entry_point, start, train

pytestmark = pytest.mark.usefixtures("client_downloads")

FAST = {"steps": 3, "size": "64x64"}  # the tiny model's own size; 3 steps keep each call well under a second


def sdk(server, api_key="unused", **options):
    return openai.OpenAI(base_url=f"{server.local_url}v1", api_key=api_key, **options)


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image):
    return np.asarray(image.convert("RGB"))


def post(server, body, **headers):
    return httpx.post(f"{server.local_url}v1/images/generations", json=body, headers=headers, timeout=120)


def read_parameters(image):
    """What an AUTOMATIC1111 metadata reader finds in the image: prompt, negative prompt and sampler fields."""
    info = ParserManager().parse(image)
    assert info is not None and info.generator.name == "AUTOMATIC1111", image.info
    sampler = info.samplers[0]
    return {
        "prompt": sampler.prompts[0].value,
        "negative": sampler.negative_prompts[0].value if sampler.negative_prompts else "",
        "sampler": sampler.name,
        "model": sampler.model.name,
        **sampler.parameters,
        **info.metadata,
    }


def test_openai_sdk_gets_images_of_the_requested_size(server):
    result = sdk(server).images.generate(
        prompt="pikachu", size="64x96", n=2, response_format="b64_json", extra_body={"steps": 3, "seed": 7}
    )
    assert [decode(item.b64_json).size for item in result.data] == [(64, 96), (64, 96)]
    assert result.size == "64x96" and result.output_format == "png"
    assert [item.seed for item in result.data] == [7, 8]  # image i uses seed + i


def png_file(image):
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


SOURCE = Image.open(REPO / "data" / "creatures" / "0000.png").convert("RGB")


def test_openai_sdk_edits_an_image_and_its_png_says_how(server):
    edit = sdk(server).images.edit(
        image=("creature.png", png_file(SOURCE.resize((128, 96))), "image/png"), prompt="a red creature", n=2,
        size="96x64", extra_body={"steps": 3, "seed": 5, "strength": 0.6},
    )  # fmt: skip
    assert [decode(item.b64_json).size for item in edit.data] == [(96, 64), (96, 64)] and edit.size == "96x64"
    assert [item.seed for item in edit.data] == [5, 6]
    # No size given: the image's shape, its longer side the model's own size (512 px for SD v1-4), sides in
    # multiples of 8 and at least 64.
    assert edit_size(Image.new("RGB", (1024, 770)), 512) == (512, 384)
    assert edit_size(Image.new("RGB", (100, 1000)), 512) == (64, 512)
    first = decode(edit.data[0].b64_json)
    assert "Denoising strength: 0.6" in first.info["parameters"] and read_parameters(first)["seed"] == "5"
    # The image is what it starts from: the same seed without it, or at another strength, is another image.
    generated = sdk(server).images.generate(prompt="a red creature", size="96x64", extra_body={"steps": 3, "seed": 5})
    stronger = sdk(server).images.edit(
        image=("creature.png", png_file(SOURCE.resize((128, 96))), "image/png"), prompt="a red creature",
        size="96x64", extra_body={"steps": 3, "seed": 5, "strength": 1.0},
    )  # fmt: skip
    for other in (generated, stronger):
        assert np.abs(pixels(decode(other.data[0].b64_json)).astype(int) - pixels(first).astype(int)).mean() > 1


def test_the_page_starts_from_an_image_as_v1_edits_does(server, tmp_path):
    # The page's "Start from an image" and /generate's image and strength: the same pixels as /v1's edit.
    path = tmp_path / "creature.png"
    SOURCE.resize((128, 96)).save(path)
    ui, _ = generate(Client(server.local_url, verbose=False), prompt="a red creature", seed="5", width=96, height=64,
                     image=handle_file(str(path)), strength=0.6)  # fmt: skip
    api = sdk(server).images.edit(image=("creature.png", path.read_bytes(), "image/png"), prompt="a red creature",
                                  size="96x64", extra_body={"steps": 3, "seed": 5, "strength": 0.6})  # fmt: skip
    assert np.array_equal(pixels(ui[0]), pixels(decode(api.data[0].b64_json)))
    assert "Denoising strength: 0.6" in ui[0].info["parameters"]


def inpaint(server, transparent, seed):
    """An edit of the 64x64 creature whose mask is transparent on one half ("left" or "right")."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64) if transparent == "left" else (32, 0, 64, 64))
    files = {"image": ("in.png", png_file(SOURCE.resize((64, 64))), "image/png"),
             "mask": ("mask.png", png_file(mask), "image/png")}  # fmt: skip
    data = {"prompt": "a creature", "steps": "4", "seed": str(seed), "strength": "1"}
    response = httpx.post(f"{server.local_url}v1/images/edits", files=files, data=data, timeout=120)
    assert response.status_code == 200, response.text
    return pixels(decode(response.json()["data"][0]["b64_json"])).astype(int)


def test_the_pages_mask_inpaints_as_v1_edits_does(server, tmp_path):
    # The page's mask is white where to redraw (AUTOMATIC1111's "inpaint upload"); /v1's is transparent there.
    SOURCE.resize((64, 64)).save(tmp_path / "in.png")
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    white_left.save(tmp_path / "mask.png")
    client = Client(server.local_url, verbose=False)
    ui, _ = generate(client, prompt="a creature", steps=4, seed="3", image=handle_file(str(tmp_path / "in.png")),
                     mask=handle_file(str(tmp_path / "mask.png")), strength=1)  # fmt: skip
    assert np.array_equal(pixels(ui[0]).astype(int), inpaint(server, "left", 3))
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    for files, message in (
        (dict(mask=handle_file(str(tmp_path / "mask.png"))), "A mask says which part of an image to redraw"),
        (dict(image=handle_file(str(tmp_path / "in.png")), mask=handle_file(str(tmp_path / "small.png"))),
         "The mask is 32x32 and the image 64x64"),
    ):  # fmt: skip
        with pytest.raises(AppError, match=message):
            generate(client, **files)


def test_an_edit_with_a_mask_redraws_its_transparent_part(server):
    # Two seeds redraw the transparent half differently; the other half is kept from the image (up to what the
    # decoder mixes in from its neighbours), as OpenAI's edits read a mask.
    for transparent, redrawn, kept in (("left", slice(0, 16), slice(48, 64)), ("right", slice(48, 64), slice(0, 16))):
        a, b = inpaint(server, transparent, 3), inpaint(server, transparent, 4)
        assert np.abs(a[:, redrawn] - b[:, redrawn]).mean() > 3 * np.abs(a[:, kept] - b[:, kept]).mean(), transparent


@pytest.mark.parametrize(
    "files, data, param, message",
    [
        ({}, {"prompt": "x"}, "image", "send one image to edit as the file 'image'"),
        ({"image": ("a.png", b"not a png", "image/png")}, {"prompt": "x"}, "image", "is not an image"),
        ({"image": ("a.png", png_file(SOURCE), "image/png")}, {"prompt": "x", "strength": "0"}, "strength",
         "'strength' must be a number above 0 and at most 1"),
        ({"image": ("a.png", png_file(SOURCE), "image/png"), "mask": ("m.png", png_file(SOURCE), "image/png")},
         {"prompt": "x"}, "mask", "'mask' has no transparency"),
        ({"image": ("a.png", png_file(SOURCE), "image/png"),
          "mask": ("m.png", png_file(Image.new("RGBA", (8, 8))), "image/png")}, {"prompt": "x"}, "mask",
         "'mask' is 8x8, the image 128x128; they must be the same size"),
        ({"image": ("a.png", png_file(SOURCE), "image/png")}, {"prompt": "x", "steps": "many"}, "steps",
         "'steps' must be a whole number"),
        ({"image": ("a.png", png_file(SOURCE), "image/png")}, {"prompt": "x", "steps": "1", "strength": "0.5"},
         "strength", "'strength' 0.5 of 1 'steps' runs no step"),
        ({"image": ("a.png", png_file(SOURCE), "image/png")}, {"prompt": "x", "guidance_rescale": "0.7"},
         "guidance_rescale", "'guidance_rescale' is for generations: diffusers' image to image and inpainting"),
    ],
    ids=["no-image", "not-an-image", "strength", "mask-without-alpha", "mask-size", "steps", "no-step", "rescale"],
)  # fmt: skip
def test_a_bad_edit_is_a_400_naming_the_field(server, files, data, param, message):
    response = httpx.post(f"{server.local_url}v1/images/edits", files=files or None, data=data, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_url_responses_link_to_the_png_without_the_key_until_it_expires(tiny_sd):
    app = start(tiny_sd, "--api_key", "s3cret", "--cache_max_age", "2")
    try:
        result = sdk(app, api_key="s3cret").images.generate(
            prompt="pikachu", n=2, response_format="url", extra_body={**FAST, "seed": 4}
        )
        urls = [item.url for item in result.data]
        assert all(url.startswith(f"{app.local_url}v1/files/") for url in urls) and len(set(urls)) == 2
        image = Image.open(io.BytesIO(httpx.get(urls[1]).content))  # no key: the link's name is its secret
        assert image.size == (64, 64) and read_parameters(image)["seed"] == "5"
        assert httpx.get(f"{app.local_url}v1/files/guessed.png").status_code == 404
        time.sleep(2.5)
        gone = httpx.get(urls[0])
        assert gone.status_code == 404 and "older than its 2 s" in gone.json()["error"]["message"]
    finally:
        app.close()


def test_v1_and_gradio_client_give_the_same_pixels_for_a_seed(server):
    api = sdk(server).images.generate(prompt="a green creature", extra_body={**FAST, "seed": 11, "n": 2})
    ui, _ = generate(Client(server.local_url, verbose=False), prompt="a green creature", seed="11", num_images=2)
    for from_api, from_ui in zip(api.data, ui):
        assert np.array_equal(pixels(decode(from_api.b64_json)), pixels(from_ui))
    # Image 1 of that request is the one-image request with seed 12, as its parameters say.
    alone = sdk(server).images.generate(prompt="a green creature", extra_body={**FAST, "seed": 12})
    assert np.abs(pixels(decode(alone.data[0].b64_json)).astype(int) - pixels(ui[1]).astype(int)).max() <= 1


def test_a_served_lora_takes_its_strength_from_each_request(server, tiny_sd, tmp_path):
    lora = tmp_path / "my-lora"
    train(tiny_sd, lora, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--max_train_steps", "4")
    app = start(tiny_sd, "--lora", str(lora), "--lora_scale", "0.5")
    try:
        assert httpx.get(f"{app.local_url}health").json()["lora_scale"] == 0.5
        body = {"prompt": "a red creature", "seed": 3, **FAST}

        def v1(server, **scale):
            return pixels(decode(post(server, {**body, **scale}).json()["data"][0]["b64_json"]))

        base, at_0, at_1, at_default = v1(server), v1(app, lora_scale=0), v1(app, lora_scale=1), v1(app)
        assert np.array_equal(at_0, base)  # strength 0 is the base model
        assert not np.array_equal(at_1, base) and not np.array_equal(at_default, at_1)
        assert not np.array_equal(at_default, base)
        # The page's /generate takes it too, by name, as gradio_client callers pass it.
        ui, _ = generate(Client(app.local_url, verbose=False), prompt="a red creature", seed="3", lora_scale=0)
        assert np.array_equal(pixels(ui[0]), base)
    finally:
        app.close()


def test_out_of_gpu_memory_says_what_would_fit_and_the_server_keeps_serving(server, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "__call__", out_of_memory)
        response = post(server, {"prompt": "a creature", "n": 4, **FAST})
        assert response.status_code == 500
        said = ("out of GPU memory for 4 image(s) of 64x64 (CUDA out of memory. Tried to allocate 3.00 GiB.); ask for"
                " fewer images or a smaller size")  # fmt: skip
        assert response.json()["error"]["message"] == f"generation failed: {said}"
        with pytest.raises(AppError, match=re.escape(said)):
            generate(Client(server.local_url, verbose=False), num_images=4)
    assert post(server, {"prompt": "a creature", **FAST}).status_code == 200


@pytest.mark.parametrize(
    "scheduler, a1111_name", [("Euler ancestral", "Euler a"), ("DPM-Solver++ SDE Karras", "DPM++ 2M SDE Karras")]
)
def test_png_parameters_round_trip_and_make_the_image_again(server, scheduler, a1111_name):
    body = {"prompt": "a red creature, tall", "negative_prompt": "blurry", "seed": 5, "steps": 4,
            "guidance_scale": 6.5, "scheduler": scheduler, "size": "64x80"}  # fmt: skip
    image = decode(post(server, body).json()["data"][0]["b64_json"])
    found = read_parameters(image)
    assert found["prompt"] == "a red creature, tall" and found["negative"] == "blurry"
    assert (found["sampler"], found["seed"], found["steps"], found["cfg_scale"]) == (a1111_name, "5", "4", "6.5")
    assert (found["Size"], found["model"]) == ("64x80", "tiny-sd")
    # Sending back what the PNG says (AUTOMATIC1111's sampler name included) makes the same image.
    width, height = found["Size"].split("x")
    again = {"prompt": found["prompt"], "negative_prompt": found["negative"], "seed": int(found["seed"]),
             "steps": int(found["steps"]), "guidance_scale": float(found["cfg_scale"]),
             "scheduler": found["sampler"], "size": f"{width}x{height}"}  # fmt: skip
    remade = decode(post(server, again).json()["data"][0]["b64_json"])
    assert np.array_equal(pixels(remade), pixels(image))


@pytest.mark.parametrize("scheduler", ["Euler ancestral", "DPM-Solver++ SDE Karras"])
def test_a_sampler_that_adds_noise_at_every_step_still_gives_image_i_its_own_seed(server, scheduler):
    body = {"prompt": "a green creature", "scheduler": scheduler, **FAST}
    both = post(server, {**body, "seed": 20, "n": 2}).json()["data"]
    alone = post(server, {**body, "seed": 21}).json()["data"][0]
    gap = pixels(decode(alone["b64_json"])).astype(int) - pixels(decode(both[1]["b64_json"])).astype(int)
    assert np.abs(gap).max() <= 1


def test_the_karras_samplers_step_through_other_noise_levels(server):
    def image(scheduler):
        return pixels(decode(post(server, {"prompt": "a creature", "seed": 2, "scheduler": scheduler, **FAST})
                             .json()["data"][0]["b64_json"]))  # fmt: skip

    plain = image("DPM++ 2M")
    assert not np.array_equal(image("DPM++ 2M Karras"), plain)
    assert not np.array_equal(image("DPM++ 2M SDE Karras"), image("DPM++ 2M Karras"))


def test_the_pages_downloads_carry_the_parameters_too(server):
    images, _ = generate(Client(server.local_url, verbose=False), prompt="pikachu", negative="dark", seed="3")
    found = read_parameters(images[0])
    assert (found["prompt"], found["negative"], found["seed"], found["sampler"]) == (
        "pikachu",
        "dark",
        "3",
        "DPM++ 2M",
    )


def test_windows_split_a_long_prompt_as_automatic1111_does(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    # A prompt that fits is one window, tokenized as the pipeline tokenizes it; "" one empty window.
    short = "a red creature, big eyes"
    assert literal_windows(tokenizer, short) == [
        tokenizer(short, padding="max_length", max_length=77, truncation=True).input_ids
    ]
    assert literal_windows(tokenizer, "") == [tokenizer("", padding="max_length", max_length=77).input_ids]
    # A long one in windows of 77 ids (start, up to 75 of its tokens, end, padding) that hold all of its tokens.
    long = " ".join(["a very detailed and colourful pokemon"] * 20)
    windows = literal_windows(tokenizer, long)
    assert [len(window) for window in windows] == [77, 77] and all(w[0] == tokenizer.bos_token_id for w in windows)
    text_tokens = [t for window in windows for t in window[1:] if t != tokenizer.eos_token_id]
    assert text_tokens == tokenizer(long, add_special_tokens=False).input_ids
    # Tags: a window ends after the last comma among its last 20 tokens, so no tag is cut in two.
    tags = ", ".join(f"tag{i} with several words" for i in range(30))
    for window in literal_windows(tokenizer, tags)[:-1]:
        text = tokenizer.decode(window[1:], skip_special_tokens=True)
        assert text.endswith(","), text


def test_a_prompt_longer_than_clip_is_read_whole(server, tiny_sd):
    # Two prompts that differ only past CLIP's 77 tokens: truncated, they would give the very same image. (The
    # tiny random model's images change little with the prompt, but they change.)
    start = " ".join(["a very detailed and colourful pokemon"] * 14)  # 84 tokens
    images = [
        decode(sdk(server).images.generate(prompt=f"{start} {end}", extra_body={**FAST, "seed": 1}).data[0].b64_json)
        for end in ("red fire dragon", "blue water turtle")
    ]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    # A long negative prompt beside a short prompt: the short one is padded with empty windows to as many.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    embeds, negative = encode_prompts(pipeline, "pikachu", start, guidance=True)
    assert embeds.shape == negative.shape == (1, 2 * 77, pipeline.text_encoder.config.hidden_size)
    # Prompts that fit are encoded as the pipeline encodes them.
    ours = encode_prompts(pipeline, "pikachu", "blurry", guidance=True)
    theirs = pipeline.encode_prompt("pikachu", "cpu", 1, True, negative_prompt="blurry")
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize(
    "prompt, found",
    [
        ("a [cat:dog:0.5]", "prompt editing"), ("[dog:10] in a field", "prompt editing"),
        ("[cat::0.3]", "prompt editing"), ("[[a:b:3]]", "prompt editing"), ("[cat|dog|bird]", "alternation"),
        ("cat AND dog", "composable diffusion"),
        # What it reads, or what AUTOMATIC1111 reads as text too.
        ("a [cat] ((dog)) (bird:1.2)", None), ("a \\[cat:dog:5\\]", None), ("black and white", None),
        ("ANDROID", None), ("[style: anime]", None), ("<lora:style:0.5> a cat", None),
    ],
)  # fmt: skip
def test_automatic1111_syntax_this_toolkit_does_not_read_is_named(prompt, found):
    problem = unsupported_syntax(prompt)
    assert (problem is None) if found is None else (found in problem and "does not read" in problem), problem


@pytest.mark.parametrize(
    "prompt, pieces",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        # AUTOMATIC1111's own example: weights nest and multiply, and the bracket left open weights the rest.
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.1 / 1.1), (" a ", 1.1), ("hill", 0.5 * 1.1),
          (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
        ("a cat BREAK a dog", [("a cat", 1.0), None, ("a dog", 1.0)]),
        ("closing) nothing] and a: colon", [("closing) nothing] and a: colon", 1.0)]),
        ("", [("", 1.0)]),
    ],
)  # fmt: skip
def test_prompts_are_parsed_for_emphasis_as_automatic1111_parses_them(prompt, pieces):
    parsed = parse_emphasis(prompt)
    assert [p and p[0] for p in parsed] == [p and p[0] for p in pieces]
    weights = [p[1] if p else 0.0 for p in pieces]  # (None, BREAK, has no weight)
    assert [p[1] if p else 0.0 for p in parsed] == pytest.approx(weights, rel=1e-12)


def test_a_full_window_is_cut_only_when_more_tokens_come(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    # Exactly 75 tokens with a comma among the last 20: one window, as AUTOMATIC1111 reads it (it once gave two).
    text = "red " * 70 + ", blue blue blue blue"
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == 75
    assert literal_windows(tokenizer, text) == [tokenizer(text, padding="max_length", max_length=77).input_ids]
    # One more token: the window ends after the comma and the four words after it start the next window.
    first, second = literal_windows(tokenizer, text + " green")
    assert tokenizer.decode(first, skip_special_tokens=True).endswith(",")
    assert tokenizer.decode(second, skip_special_tokens=True) == "blue blue blue blue green"
    # BREAK closes a window early; each token carries the weight of its piece, the start, end and padding 1.
    (ids_a, weights_a), (ids_b, weights_b) = token_windows(tokenizer, parse_emphasis("a (red:1.5) cat BREAK dog"))
    assert tokenizer.decode(ids_a, skip_special_tokens=True) == "a red cat"
    assert tokenizer.decode(ids_b, skip_special_tokens=True) == "dog"
    assert weights_a[:5] == [1.0, 1.0, 1.5, 1.0, 1.0] and set(weights_a[5:]) == {1.0} and set(weights_b) == {1.0}


def test_emphasis_scales_the_weighted_tokens_and_keeps_each_windows_mean(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    # A trained CLIP's last layer norm has a bias, so its embeddings' mean is away from zero. The random one's
    # bias is zero, which leaves a mean of rounding errors for the emphasis to scale back to: give it one.
    bias = pipeline.text_encoder.get_submodule("final_layer_norm").bias
    torch.nn.init.normal_(bias, mean=0.05, std=0.1, generator=torch.Generator().manual_seed(0))  # the same every run

    def embeds(prompt):
        return encode_prompts(pipeline, prompt, None, guidance=False)[0][0]  # (77 x windows, dim)

    plain, weighted = embeds("a red creature"), embeds("a (red:1.5) creature")
    # Every token is scaled back by one factor, so that the window's mean is what it was; "red" 1.5 times more.
    assert abs(plain.mean().item()) > 1e-3
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    ratio = weighted / plain
    factor = ratio[0].mean()
    assert factor > 0 and not torch.isclose(factor, torch.tensor(1.0))
    torch.testing.assert_close(ratio[[0, 1, 3, 4, 76]], torch.full_like(ratio[[0, 1, 3, 4, 76]], factor.item()))
    torch.testing.assert_close(ratio[2], torch.full_like(ratio[2], 1.5 * factor.item()))
    # A weight of 1 and escaped brackets change nothing: the pipeline's own embeddings of the literal text.
    assert torch.equal(embeds("a (red:1.0) creature"), plain)
    theirs = pipeline.encode_prompt("a (red) creature", "cpu", 1, False)[0][0]
    assert torch.equal(embeds(r"a \(red\) creature"), theirs)
    # BREAK: the window before it is the text before it, encoded alone.
    broken = embeds("a red creature BREAK big eyes")
    assert broken.shape[0] == 2 * 77 and torch.equal(broken[:77], plain)


def test_a_weighted_prompt_changes_the_image_and_its_png_keeps_the_prompt_as_typed(server):
    prompts = ["a red creature", "(a red creature:1.0)", "a (red:1.8) creature"]
    results = [
        sdk(server).images.generate(prompt=prompt, extra_body={**FAST, "seed": 3}).data[0] for prompt in prompts
    ]
    plain, weight_one, weighted = (pixels(decode(result.b64_json)) for result in results)
    # The brackets are read as weights, not as text: at weight 1 the image is the plain prompt's.
    assert np.array_equal(weight_one, plain) and not np.array_equal(weighted, plain)
    assert decode(results[2].b64_json).info["parameters"].splitlines()[0] == "a (red:1.8) creature"


class SlowEncoding:
    """A tokenizer's Rust backend that pauses before each encoding: another thread's call, if nothing keeps it
    out, then lands between this call's padding settings and its encoding, every time rather than by chance."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_batch(self, *args, **kwargs):
        time.sleep(0.01)
        return self.backend.encode_batch(*args, **kwargs)


def test_checking_a_prompts_length_while_another_request_generates_is_safe(tiny_sd):
    # The page and /v1 measure prompts outside the queue, while a request may be generating: the tokenizer's
    # shared padding state must not leak into the generating request (it once failed with "Expected size 2 but
    # got size 77").
    pipeline = load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    pipeline.tokenizer._tokenizer = SlowEncoding(pipeline.tokenizer._tokenizer)
    service = ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=1))
    done, failures = threading.Event(), []

    def measure():
        while not done.is_set():
            try:
                service.clip_windows("a creature " * 50)
            except Exception as err:  # a failure here must fail the test, not only warn
                failures.append(f"measuring: {err!r}")
                return

    checker = threading.Thread(target=measure)
    checker.start()
    try:
        for seed in range(10):
            try:
                service.generate(prompt="creature", negative_prompt="", steps=1, guidance_scale=7.5, seed=seed,
                                 scheduler="DDIM", width=64, height=64, num_images=1)  # fmt: skip
            except RuntimeError as err:
                failures.append(str(err))
    finally:
        done.set()
        checker.join()
    assert failures == []


def test_eight_openai_clients_at_once_all_finish(server):
    client = sdk(server)

    def one(seed):
        return client.images.generate(prompt="creature", extra_body={**FAST, "seed": seed})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [len(result.data) for result in results] == [1] * 8


def test_models_and_health(server):
    models = sdk(server).models.list()
    assert [model.id for model in models.data] == ["tiny-sd"]
    health = httpx.get(f"{server.local_url}health").json()
    assert health["model"] == "tiny-sd" and (health["device"], health["dtype"]) == ("cpu", "float32")
    assert health["queue"] == {"running": 0, "waiting": 0, "concurrency": 1, "max_queue": 16}
    assert health["lora_scale"] is None  # no LoRA served, so requests can't set one
    assert health["embeddings"] == []  # no --embeddings_dir
    assert health["uptime_s"] > 0


BAD = [
    ({"size": "100x100"}, "size", "multiple of 8"),
    ({"size": "2048x2048"}, "size", "from 64 to 1024"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"n": 0}, "n", "between 1 and 4"),
    ({"n": 5}, "n", "between 1 and 4"),
    ({"n": True}, "n", "whole number"),
    ({"prompt": "  "}, "prompt", "non-empty"),
    ({"prompt": None}, "prompt", "non-empty"),
    ({"steps": 0}, "steps", "between 1 and 150"),
    ({"steps": 151}, "steps", "between 1 and 150"),
    ({"steps": 2.5}, "steps", "whole number"),
    ({"scheduler": "Nope"}, "scheduler", "DPM-Solver++, DPM-Solver++ Karras, DPM-Solver++ SDE Karras, PNDM"),
    ({"guidance_scale": -1}, "guidance_scale", "from 0 to 30"),
    ({"guidance_rescale": 1.5}, "guidance_rescale", "from 0 to 1"),
    ({"seed": -1}, "seed", "between 0 and"),
    ({"seed": "7"}, "seed", "whole number"),
    ({"negative_prompt": 3}, "negative_prompt", "string"),
    ({"response_format": "bmp"}, "response_format", "b64_json"),
    ({"output_format": "jpeg"}, "output_format", "png"),
    ({"quality": "hd"}, "quality", "not supported"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"lora_scale": 0.5}, "lora_scale", "is for a LoRA, and this server serves none"),
    ({"prompt": "a [cat:dog:0.5]"}, "prompt", "prompt editing ([from:to:when]), which this toolkit does not read"),
    ({"negative_prompt": "blur AND noise"}, "negative_prompt", "composable diffusion (AND)"),
]


@pytest.mark.parametrize("change, param, message", BAD, ids=[f"{p}={c[p]!r}" for c, p, _ in BAD])
def test_a_bad_field_is_a_400_naming_it(server, change, param, message):
    response = post(server, {"prompt": "pikachu", **FAST, **change})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_a_400_and_the_server_keeps_serving(server, content):
    response = httpx.post(f"{server.local_url}v1/images/generations", content=content)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert post(server, {"prompt": "pikachu", **FAST}).status_code == 200


def test_the_sdk_raises_on_bad_input_and_on_an_unknown_model(server):
    with pytest.raises(openai.BadRequestError, match="multiple of 8"):
        sdk(server).images.generate(prompt="pikachu", size="100x100")
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-sd'"):
        sdk(server).images.generate(prompt="pikachu", model="dall-e-3")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        sdk(server).chat.completions.create(model="tiny-sd", messages=[{"role": "user", "content": "hi"}])


def test_without_the_key_v1_is_a_401_and_health_stays_open(tiny_sd, capsys):
    app = start(tiny_sd, "--api_key", "s3cret", "--auth", "ash:pikachu")
    try:
        assert "s3cret" not in capsys.readouterr().out  # the key is never printed
        with pytest.raises(openai.AuthenticationError):
            sdk(app, api_key="wrong").images.generate(prompt="pikachu", extra_body=FAST)
        for headers in ({}, {"Authorization": "Bearer ash:pikachu"}, {"Authorization": "Basic s3cret"}):
            response = post(app, {"prompt": "pikachu", **FAST}, **headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{app.local_url}v1/models").status_code == 401
        assert len(sdk(app, api_key="s3cret").images.generate(prompt="pikachu", extra_body=FAST).data) == 1
        assert httpx.get(f"{app.local_url}health").json()["model"] == "tiny-sd"
    finally:
        app.close()


def test_without_api_key_the_pages_login_is_the_key(tiny_sd):
    app = start(tiny_sd, "--auth", "ash:pikachu")
    try:
        assert post(app, {"prompt": "pikachu", **FAST}).status_code == 401
        assert post(app, {"prompt": "pikachu", **FAST}, Authorization="Bearer ash:pikachu").status_code == 200
    finally:
        app.close()


def test_a_full_queue_is_a_503_for_v1_and_an_error_on_the_page_and_the_server_keeps_serving(tiny_sd):
    app = start(tiny_sd, "--max_queue", "1", "--concurrency", "1")
    try:
        # One slow request runs (from /v1) and one waits (from the page): the queue is shared and now full.
        slow = {"prompt": "creature", "steps": 75, "scheduler": "PNDM", "size": "128x128", "seed": 1}
        api_job = threading.Thread(target=lambda: post(app, slow))
        api_job.start()
        client = Client(app.local_url, verbose=False)
        ui_job = client.submit("creature", "", 75, 7.5, "1", "PNDM", 128, 128, 1, api_name="/generate")
        deadline = time.time() + 60
        while time.time() < deadline:
            queue = httpx.get(f"{app.local_url}health").json()["queue"]
            if (queue["running"], queue["waiting"]) == (1, 1):
                break
            time.sleep(0.05)
        assert (queue["running"], queue["waiting"]) == (1, 1), queue

        refused = post(app, {"prompt": "pikachu", **FAST})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        with pytest.raises(AppError, match="The server is busy"):
            generate(client)

        api_job.join(timeout=120)
        assert len(ui_job.result(timeout=120)[0]) == 1
        assert post(app, {"prompt": "pikachu", **FAST}).status_code == 200  # still serving
        assert len(generate(client)[0]) == 1
    finally:
        app.close()


def test_listen_binds_every_interface_prints_the_lan_addresses_and_warns_without_auth(tiny_sd, capsys):
    app = start(tiny_sd, "--listen")
    try:
        out = capsys.readouterr().out
        assert app.server_name == "0.0.0.0"
        assert "warning: the page on 0.0.0.0" in out and "warning: /v1 and /sdapi/v1 on 0.0.0.0" in out
        port = app.server_port
        addresses = gradio_app.lan_addresses()
        for address in addresses:
            assert f"http://{address}:{port}/v1" in out
        # Reachable at a LAN address, where this machine has one (CI's container does).
        host = addresses[0] if addresses else "127.0.0.1"
        assert httpx.get(f"http://{host}:{port}/health").status_code == 200
    finally:
        app.close()


def test_listen_and_another_host_is_one_line():
    with pytest.raises(gradio_app.UserError, match="--listen means --host 0.0.0.0"):
        gradio_app.parse_args(["--listen", "--host", "10.0.0.2"])


def test_localhost_with_no_auth_gives_no_warning(capsys):
    args = gradio_app.parse_args([])
    gradio_app.warn_if_open(args)
    assert capsys.readouterr().out == ""
    gradio_app.warn_if_open(gradio_app.parse_args(["--host", "0.0.0.0", "--auth", "ash:pikachu"]))
    assert capsys.readouterr().out == ""
    # A public share link reaches the page and /v1 alike.
    gradio_app.warn_if_open(gradio_app.parse_args(["--share"]))
    out = capsys.readouterr().out
    assert "warning: the page on a public link" in out and "warning: /v1 and /sdapi/v1 on a public link" in out


def card_args(output_dir, **change):
    """Training's arguments for save_model_card: the script's defaults (so a flag added later is there too), the
    seed's recipe on the hub's names, and `change`."""
    values = dict(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
                  dataset_name="lambdalabs/pokemon-blip-captions", train_data_dir=None,
                  validation_prompts=["yoda", "a robot, shiny"], output_dir=str(output_dir), max_train_steps=1,
                  num_train_epochs=1, learning_rate=1e-5, lr_warmup_steps=0, train_batch_size=1,
                  gradient_accumulation_steps=4, center_crop=True, random_flip=True, mixed_precision="fp16",
                  use_ema=True)  # fmt: skip
    return example_args(**{**values, **change})


def page(server):
    config = httpx.get(f"{server.local_url}config").json()
    texts = [c["props"].get("value") for c in config["components"] if c["type"] == "markdown"]
    examples = [c["props"] for c in config["components"] if c["type"] == "dataset"]
    return config["title"], texts[0], examples


def test_the_page_says_what_it_serves_from_the_model_card(tiny_sd, tmp_path):
    import shutil

    import train_text_to_image

    model = tmp_path / "my-pokemon"
    shutil.copytree(tiny_sd, model)
    train_text_to_image.save_model_card(card_args(model), "my-pokemon", images=[])
    app = start(str(model))
    try:
        title, text, examples = page(app)
        assert title == "my-pokemon" and text.startswith("# my-pokemon\n")
        assert "Fine-tuned from **CompVis/stable-diffusion-v1-4** on **lambdalabs/pokemon-blip-captions**" in text
        assert "Pokémon" not in text
        assert examples and examples[0]["samples"] == [["yoda"], ["a robot, shiny"]]
    finally:
        app.close()

    # Trained from local folders, the card's sentence names them; --title replaces the title.
    train_text_to_image.save_model_card(
        card_args(
            model, pretrained_model_name_or_path=str(tiny_sd), dataset_name=None, train_data_dir=str(tmp_path / "x")
        ),
        "my-pokemon",
        images=[],
    )
    assert gradio_app.describe_model(str(model), title="Creature maker")[:2] == (
        "Creature maker",
        f"This pipeline was fine-tuned from a local folder `tiny-sd` on a local folder `x`. {gradio_app.SEED_HELP}",
    )
    # No card at all: the model's name, and no example prompts.
    assert gradio_app.describe_model(tiny_sd) == (
        "tiny-sd",
        f"Stable Diffusion pipeline `tiny-sd`. {gradio_app.SEED_HELP}",
        [],
    )


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_served_from_the_users_own_folder_it_writes_only_to_its_temp_dir(tiny_sd, tmp_path):
    # The way people run it: `python path/to/gradio_app.py` from their own folder, stopped with Ctrl-C.
    work, home, temp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, temp):
        folder.mkdir()
    gradio_temp = temp / "gradio"
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(gradio_temp),
           "HF_HOME": str(home / ".cache" / "huggingface"), "XDG_CACHE_HOME": str(home / ".cache")}  # fmt: skip
    port = free_port()
    command = [sys.executable, str(REPO / "gradio_app.py"), "--model_path", tiny_sd, "--port", str(port),
               "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                httpx.get(f"{url}health")
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        app = Namespace(local_url=url)
        assert len(sdk(app).images.generate(prompt="pikachu", n=2, extra_body=FAST).data) == 2
        link = sdk(app).images.generate(prompt="pikachu", response_format="url", extra_body=FAST).data[0].url
        assert httpx.get(link).status_code == 200
        images, _ = generate(Client(url, verbose=False, download_files=str(tmp_path / "client")))
        assert len(images) == 1
        # The page's image is in Gradio's cache and the linked one beside it, inside GRADIO_TEMP_DIR; the
        # base64 ones never touched the disk.
        written = [path for path in files_under(tmp_path) if not path.startswith("client/")]
        assert all(path.startswith("tmp/gradio/") and path.endswith(".png") for path in written), written
        assert sum(path.startswith("tmp/gradio/v1-images-") for path in written) == 1 and len(written) == 2
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert "Traceback" not in output, output
    assert files_under(work) == [] and files_under(home) == []
    assert files_under(temp) == [], files_under(temp)  # both caches are emptied when the server stops


def test_automatic1111s_launch_flags_and_near_misses_are_named_and_secrets_are_not(capsys):
    # The server's flags are read as the training script's: a near miss is named, and a secret is not repeated.
    # AUTOMATIC1111's launch flags are named with what does their work here.
    result = run_entry_point(gradio_app.main, "--api-key", "sk-do-not-show", "--gradio-auth", "me:pw-do-not-show",
                             "--ckpt", "model.safetensors", capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unrecognized arguments: --api-key *** --gradio-auth *** --ckpt model.safetensors -- did you mean"
        " --api_key?; --gradio-auth is --auth here (user:password); --ckpt is --model_path here (one .safetensors"
        " file, a pipeline folder or a hub id)"
    )
    assert "do-not-show" not in result.stderr + result.stdout
    # Each of those hints names flags the server has, and none of the flags it stands for.
    with pytest.raises(SystemExit):
        gradio_app.parse_args(["--help"])
    ours = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, flags=re.MULTILINE))
    assert {"--model_path", "--auth", "--dtype", "--host"} <= ours
    for theirs, here in gradio_app.KNOWN_ELSEWHERE.items():
        named = re.findall(r"--[\w-]+", here)
        assert theirs not in ours and named and all(flag in ours for flag in named), (theirs, here)
