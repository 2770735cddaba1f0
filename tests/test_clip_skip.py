"""--clip_skip: prompts and captions read from the text encoder's N-th layer from the end, as AUTOMATIC1111's Clip
skip and kohya-ss's --clip_skip read them, in training (cached or not, held-out loss, validation images) and in
gradio_app.py."""

import json

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

import gradio_app
from sdtoolkit.clip_windows import encode_text
from sdtoolkit.errors import UserError
from sdtoolkit.export import single_file_name
from sdtoolkit.inference import load_pipeline, pick_clip_skip, recorded_clip_skip
from sdtoolkit.learning_check import caption_errors
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import demo_image, logged_losses, recorded_model, run_entry_point, start, train


def without_last_layer(tiny_sd):
    """The tiny text encoder built with one layer fewer, from the same weights: what Clip skip 2 reads, made
    another way."""
    return CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder", num_hidden_layers=1)


def test_clip_skip_2_reads_what_a_text_encoder_without_its_last_layer_outputs(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    assert text_encoder.config.num_hidden_layers == 2
    ids = tokenizer(
        ["a red creature", "a blue one"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        skipped = encode_text(text_encoder, ids, clip_skip=2)
        torch.testing.assert_close(skipped, without_last_layer(tiny_sd)(ids, return_dict=False)[0])
        assert torch.equal(encode_text(text_encoder, ids), text_encoder(ids, return_dict=False)[0])
        assert not torch.allclose(skipped, encode_text(text_encoder, ids))


def test_training_reads_captions_from_the_layer_asked_for_cached_or_not(tiny_sd, tmp_path):
    flags = ["--max_train_steps", "2", "--validation_split", "0.25"]
    # The last layer's run writes a disk cache first; the --clip_skip run beside it must not read its captions.
    cache = ["--latent_cache_dir", str(tmp_path / "cache")]
    train(tiny_sd, tmp_path / "last", *flags, *cache)
    train(tiny_sd, tmp_path / "cached", *flags, *cache, "--clip_skip", "2")
    train(
        tiny_sd, tmp_path / "encoded", *flags, "--clip_skip", "2", "--no-cache_latents", "--checkpointing_steps", "2"
    )
    for tag in ("train_loss", "validation_loss"):
        cached, encoded, last = (logged_losses(tmp_path / run, tag) for run in ("cached", "encoded", "last"))
        assert [v for _, v in cached] == pytest.approx([v for _, v in encoded], rel=1e-5), tag
        assert [v for _, v in cached] != pytest.approx([v for _, v in last], rel=1e-3), tag
    assert (
        "* Clip skip: 2 (captions read from the text encoder's layer 2 from the end"
        in (tmp_path / "cached" / "README.md").read_text()
    )
    # A LoRA says it in its kohya-ss header, as kohya-ss's trainer does, for the UIs that show it.
    lora = tmp_path / "lora"
    train(tiny_sd, lora, "--max_train_steps", "1", "--lora_rank", "4", "--clip_skip", "2", "--export_single_file")
    with safe_open(lora / KOHYA_WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2"
    # What the run wrote records it, and metrics.py and gradio_app.py read it there: the model card's metadata, a
    # checkpoint's training state, the LoRA file's header, the exported file's header.
    assert "\nclip_skip: 2\n" in (tmp_path / "cached" / "README.md").read_text().split("---")[1]
    recorded = [tmp_path / "cached", tmp_path / "encoded" / "checkpoint-2", lora, lora / KOHYA_WEIGHTS_NAME]
    recorded.append(lora / single_file_name(lora))
    assert [recorded_clip_skip(str(path)) for path in recorded] == [2] * 5
    assert recorded_clip_skip(str(tmp_path / "last")) is None and recorded_clip_skip(tiny_sd) is None
    with pytest.raises(UserError, match="--clip_skip 3 asks for a layer this text encoder lacks: it has 2"):
        train(tiny_sd, tmp_path / "bad", "--clip_skip", "3")
    with pytest.raises(UserError, match="--clip_skip must be 1"):
        train(tiny_sd, tmp_path / "bad", "--clip_skip", "0")


def image(service):
    (result,) = service.generate(
        prompt="a red creature", negative_prompt="", steps=3, guidance_scale=7.5, seed=5, scheduler="DPM-Solver++",
        width=64, height=64, num_images=1,
    )  # fmt: skip
    return result


def test_the_flag_wins_then_the_loras_record_then_the_models(tmp_path):
    model, lora = tmp_path / "model", tmp_path / "lora.safetensors"
    model.mkdir()
    (model / "training_state.json").write_text(json.dumps({"global_step": 2, "clip_skip": 3}))
    save_file({"x": torch.zeros(1)}, lora, metadata={"ss_clip_skip": "2"})
    assert pick_clip_skip(None, str(model), str(lora)) == (2, f"as {lora} was trained")
    assert pick_clip_skip(None, str(model)) == (3, f"as {model} was trained")
    assert pick_clip_skip(1, str(model), str(lora)) == (1, "--clip_skip")
    # kohya-ss writes "None" for a run without --clip_skip; a card whose metadata is not YAML records nothing.
    save_file({"x": torch.zeros(1)}, lora, metadata={"ss_clip_skip": "None"})
    (model / "training_state.json").unlink()
    (model / "README.md").write_text("---\n: [\n---\n")
    assert pick_clip_skip(None, str(model), str(lora)) == (1, "the default")


def test_the_server_reads_prompts_from_the_layer_asked_for(tiny_sd, tmp_path, capsys):
    def service(clip_skip=1, pipeline=None):
        pipeline = pipeline or load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
        return ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=1),
                            clip_skip=clip_skip)  # fmt: skip

    skipped = image(service(clip_skip=2))
    shorter = StableDiffusionPipeline.from_pretrained(tiny_sd, text_encoder=without_last_layer(tiny_sd),
                                                      safety_checker=None)  # fmt: skip
    shorter.set_progress_bar_config(disable=True)
    assert np.array_equal(np.asarray(skipped), np.asarray(image(service(pipeline=shorter))))
    assert not np.array_equal(np.asarray(skipped), np.asarray(image(service())))
    assert "Clip skip: 2" in skipped.info["parameters"] and "Clip skip" not in image(service()).info["parameters"]

    # Without --clip_skip, a model whose training run recorded one is served with it.
    app = start(recorded_model(tiny_sd, tmp_path, 2))
    try:
        assert httpx.get(f"{app.local_url}health").json()["clip_skip"] == 2
    finally:
        app.close()
    assert "Clip skip 2 (as " in capsys.readouterr().out
    result = run_entry_point(gradio_app.main, "--model_path", tiny_sd, "--clip_skip", "5", "--device", "cpu",
                             capsys=capsys)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --clip_skip must be from 1 (the last layer, the default) to 2, got 5"
    )


def test_caption_accuracy_reads_the_captions_at_the_clip_skip_asked(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    shorter = StableDiffusionPipeline.from_pretrained(tiny_sd, text_encoder=without_last_layer(tiny_sd),
                                                      safety_checker=None)  # fmt: skip
    images, captions = [demo_image(0), demo_image(1)], ["a red creature", "a blue creature"]
    skipped = caption_errors(pipeline, images, captions, resolution=32, clip_skip=2)
    torch.testing.assert_close(skipped, caption_errors(shorter, images, captions, resolution=32))
    assert not torch.allclose(skipped, caption_errors(pipeline, images, captions, resolution=32))
