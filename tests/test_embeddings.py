"""Textual inversion embeddings served as AUTOMATIC1111 serves them (gradio_app.py --embeddings_dir): each file
a word of the prompt, whose vectors stand where the word is, in any case and inside emphasis."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

import gradio_app
from sdtoolkit.clip_windows import encode_prompts, parse_emphasis, token_windows
from sdtoolkit.embeddings import load_embeddings
from tests.conftest import run_entry_point, start


def word_vector(pipeline, word):
    """The text encoder's input embedding of a word that is one token."""
    (token,) = pipeline.tokenizer(word, add_special_tokens=False).input_ids
    return pipeline.text_encoder.get_input_embeddings().weight[token].detach().clone()


@pytest.fixture
def embeddings_dir(tmp_path, tiny_sd):
    """Embeddings whose vectors are those of words the tokenizer has, so that using one reads as those words."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    red, blue = word_vector(pipeline, "red"), word_vector(pipeline, "blue")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": red[None]}, folder / "Rubyglow.safetensors")  # AUTOMATIC1111's key, one vector
    (folder / "two").mkdir()
    save_file({"emb_params": torch.stack([red, blue])}, folder / "two" / "duotone7.safetensors")  # two vectors
    save_file({"emb_params": torch.zeros(1, red.numel() + 1)}, folder / "other-model.safetensors")
    save_file({"clip_l": red[None], "clip_g": torch.zeros(1, 8)}, folder / "sdxl.safetensors")
    (folder / "pickled.pt").write_bytes(b"never unpickled")
    (folder / "truncated.safetensors").write_bytes(b"not a safetensors file")
    (folder / "Rubyglow.preview.png").write_bytes(b"")
    return folder


def test_an_embedding_is_a_word_whose_vectors_stand_where_it_is(tiny_sd, embeddings_dir):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    loaded, skipped = load_embeddings(pipeline, embeddings_dir)
    assert loaded == {"duotone7": 2, "rubyglow": 1}
    reasons = dict(skipped)
    assert sorted(reasons) == ["other-model.safetensors", "pickled.pt", "sdxl.safetensors", "truncated.safetensors"]
    assert "not a readable .safetensors file" in reasons["truncated.safetensors"]
    assert "pickle file, which can run code" in reasons["pickled.pt"]
    assert "takes 32" in reasons["other-model.safetensors"] and "2 tensors" in reasons["sdxl.safetensors"]

    def embeds(prompt):
        return encode_prompts(pipeline, prompt, None, guidance=False)[0]

    # The file's name in any case reads as its vectors: here those of "red", and of "red blue" for two.
    assert torch.equal(embeds("a Rubyglow creature"), embeds("a red creature"))
    assert torch.equal(embeds("a DUOTONE7 creature"), embeds("a red blue creature"))
    assert torch.equal(embeds("a (duotone7:1.4) creature"), embeds("a (red blue:1.4) creature"))
    assert not torch.equal(embeds("a duotone7 creature"), embeds("a red creature"))
    # Its vectors count as tokens of the window: 40 times two vectors is 80 tokens, two windows.
    assert len(token_windows(pipeline.tokenizer, parse_emphasis("duotone7 " * 40))) == 2


def test_the_server_loads_a_folder_of_embeddings_and_says_what_it_skipped(tiny_sd, embeddings_dir, capsys):
    app = start(tiny_sd, "--embeddings_dir", str(embeddings_dir))
    try:
        out = capsys.readouterr().out
        assert "Embeddings (2): duotone7 (2 vectors), rubyglow" in out
        assert "warning: --embeddings_dir: skipped pickled.pt: a pickle file" in out
        assert httpx.get(f"{app.local_url}health").json()["embeddings"] == ["duotone7", "rubyglow"]

        def image(prompt):
            body = {"prompt": prompt, "seed": 4, "steps": 3, "size": "64x64"}
            data = httpx.post(f"{app.local_url}v1/images/generations", json=body, timeout=60).json()["data"][0]
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).convert("RGB"))

        assert np.array_equal(image("a Rubyglow creature"), image("a red creature"))
    finally:
        app.close()


def test_a_missing_embeddings_folder_is_one_line(tiny_sd, tmp_path, capsys):
    result = run_entry_point(gradio_app.main, "--model_path", tiny_sd, "--embeddings_dir", tmp_path / "nope",
                             "--device", "cpu", capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: --embeddings_dir {tmp_path / 'nope'}: no such folder"
