"""--weighted_captions: training captions read as prompts are read (emphasis and BREAK), wherever they are encoded."""

import logging
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

import metrics
from sdtoolkit.clip_windows import caption_windows, emphasize, encode_prompts
from sdtoolkit.data import count_long_captions
from sdtoolkit.errors import UserError
from sdtoolkit.learning_check import caption_errors
from tests.conftest import SMALL, as_train_sh_runs_it, demo_image, image_folder, train

CAPTION = "a ((red)) creature, [white] background, (detailed:1.4)"
BROKEN = "a (red:1.3) creature BREAK on a white background"  # two windows


def test_a_weighted_caption_is_its_words_with_their_weights(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    ids, mask, weights = caption_windows(tokenizer, "a (red:1.5) cat", 1, weighted=True)
    words = tokenizer("a red cat", padding="max_length", max_length=77).input_ids
    red = tokenizer("red", add_special_tokens=False).input_ids[0]
    assert ids[0].tolist() == words and mask.tolist() == [1]
    assert weights[0].tolist() == [1.5 if token == red else 1.0 for token in words]
    # Read literally, the brackets and the number are tokens, every one of weight 1.
    ids, _, weights = caption_windows(tokenizer, "a (red:1.5) cat", 1)
    assert ids[0].tolist() == tokenizer("a (red:1.5) cat", padding="max_length", max_length=77).input_ids
    assert (weights == 1).all()
    # BREAK starts a window of its own.
    ids, mask, _ = caption_windows(tokenizer, BROKEN, 3, weighted=True)
    assert mask.tolist() == [1, 1, 0]
    assert ids[1].tolist() == tokenizer("on a white background", padding="max_length", max_length=77).input_ids


def test_emphasis_leaves_windows_of_weight_1_exactly_as_they_are():
    hidden = torch.randn(2, 3 * 77, 8)  # two captions, three windows each
    hidden[0, 77:154] = 0  # a window whose mean is 0: mean / mean would be NaN
    weights = torch.ones(2, 3, 77)
    weights[1, 2, 5] = 1.5  # one emphasized token, in the second caption's third window
    out = emphasize(hidden, weights)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[1, : 2 * 77], hidden[1, : 2 * 77])
    window, emphasized = hidden[1, 154:], out[1, 154:]
    factor = window.mean() / (window * weights[1, 2, :, None]).mean()
    torch.testing.assert_close(emphasized[5], window[5] * 1.5 * factor)
    torch.testing.assert_close(emphasized.mean(), window.mean())


def test_a_break_counts_as_a_window_of_the_caption(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    rows = {"text": [BROKEN, "a red creature"]}
    assert count_long_captions(rows, "text", tokenizer, 1, weighted=True) == (1, 2)
    assert count_long_captions(rows, "text", tokenizer, 2, weighted=True) == (0, 2)
    assert count_long_captions(rows, "text", tokenizer, 1) == (0, 2)  # read literally, BREAK is a word


@pytest.fixture
def unet_inputs(monkeypatch):
    """The encoder_hidden_states of every UNet call, recorded."""
    calls = []
    forward = UNet2DConditionModel.forward

    def recorded(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recorded)
    return calls


@pytest.mark.parametrize(
    "caption, flags",
    [
        (CAPTION, []),  # cached, read from the cache written on disk
        (CAPTION, ["--no-cache_latents"]),  # encoded at every step
        (BROKEN, ["--max_token_length", "150", "--no-cache_latents"]),  # in windows
        (BROKEN, ["--max_token_length", "150"]),  # in windows, from the cache
    ],
)
def test_training_reads_a_caption_as_the_server_reads_the_prompt(tiny_sd, tmp_path, unet_inputs, caption, flags):
    # Every UNet call of training and of the held-out loss is conditioned on what gradio_app.py (encode_prompts)
    # makes of the caption as a prompt. The literal run before it writes its cache in the same folder: a weighted
    # run must not read it.
    data = image_folder(tmp_path / "data", [(f"{i}.png", demo_image(i), caption) for i in range(4)])
    common = ["--max_train_steps", "2", "--center_crop", "--validation_split", "0.25",
              "--latent_cache_dir", str(tmp_path / "cache"), *flags]  # fmt: skip
    train(tiny_sd, tmp_path / "literal", *common, data=data)
    literal = list(unet_inputs)
    unet_inputs.clear()
    train(tiny_sd, tmp_path / "weighted", *common, "--weighted_captions", data=data)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    expected = encode_prompts(pipeline, caption, None, guidance=False)[0][0]  # (77 x windows, dim)
    assert len(unet_inputs) == 5 * 2 + 2  # the held-out loss at 5 timesteps, before and after; 2 steps
    for states in unet_inputs:
        for example in states:
            torch.testing.assert_close(example, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(literal[-1][0], expected, atol=1e-3)  # without the flag, another reading
    assert "Captions: read for AUTOMATIC1111's emphasis" in (tmp_path / "weighted" / "README.md").read_text()


def test_syntax_the_toolkit_does_not_read_is_refused_and_weights_read_as_words_are_named(tiny_sd, tmp_path, caplog):
    rows = [(f"{i}.png", demo_image(i), "a [red|blue] creature") for i in range(2)]
    rows += [(f"{i}.png", demo_image(i), "a (red:1.2) creature") for i in range(2, 4)]
    data = image_folder(tmp_path / "data", rows)
    with pytest.raises(UserError, match=r"the caption 'a \[red\|blue\] creature' can't be read: .*alternation"):
        train(tiny_sd, tmp_path / "weighted", "--max_train_steps", "1", "--weighted_captions", data=data)
    assert not (tmp_path / "weighted" / "logs").exists()  # refused before training
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path / "literal", "--max_train_steps", "1", data=data)
    assert "2 captions weigh words in AUTOMATIC1111's syntax, e.g. (word:1.2); they are read as text" in caplog.text
    # Shuffled tags are split at commas: a comma inside brackets would split a weight from its words.
    rows = [(f"{i}.png", demo_image(i), "(red hair, blue eyes:1.2), smile") for i in range(2)]
    rows += [(f"{i}.png", demo_image(i), r"(red hair:1.2), \(blue, eyes\), smile") for i in range(2, 4)]
    data = image_folder(tmp_path / "commas", rows)
    with pytest.raises(UserError, match=r"the caption '\(red hair, blue eyes:1.2\), smile' has a comma inside brack"):
        train(tiny_sd, tmp_path / "shuffled", "--max_train_steps", "1", "--weighted_captions", "--shuffle_tags",
              data=data)  # fmt: skip
    with pytest.raises(UserError, match="--shuffle_tags or --caption_tag_dropout_rate: the caption"):
        train(tiny_sd, tmp_path / "dropped", "--max_train_steps", "1", "--weighted_captions",
              "--caption_tag_dropout_rate", "0.1", data=data)  # fmt: skip
    train(tiny_sd, tmp_path / "unshuffled", "--max_train_steps", "1", "--weighted_captions", data=data)
    data = image_folder(tmp_path / "no-commas", rows[2:])
    train(tiny_sd, tmp_path / "shuffled-fine", "--max_train_steps", "1", "--weighted_captions", "--shuffle_tags",
          data=data)  # fmt: skip


def test_caption_accuracy_reads_weighted_captions_when_told(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    images = [demo_image(i).convert("RGB") for i in range(2)]

    def errors(candidates, weighted):
        return caption_errors(pipeline, images, candidates, resolution=32, timesteps=(500,), weighted=weighted)

    plain = errors(["a red creature"], weighted=False)
    torch.testing.assert_close(errors(["a (red:1) creature"], weighted=True), plain)  # weight 1: the words alone
    assert not torch.allclose(errors(["a (red:1.5) creature"], weighted=True), plain)
    assert not torch.allclose(errors(["a (red:1) creature"], weighted=False), plain)  # brackets read as words
    with pytest.raises(UserError, match="--weighted_captions is for --caption_data's captions"):
        metrics.parse_args(["--model_path", str(tiny_sd), "--weighted_captions"])


def test_train_sh_trains_a_caption_folder_on_weighted_captions_from_the_users_folder(
    tmp_path, tiny_sd, monkeypatch, capsys
):
    # kohya-ss's layout, from the user's own folder: images with .txt captions in a repeats folder.
    home = tmp_path / "me"
    (home / "my-data" / "2_creature").mkdir(parents=True)
    shutil.copytree(tiny_sd, home / "my-model")
    for i in range(4):
        demo_image(i).save(home / "my-data" / "2_creature" / f"{i}.png")
        (home / "my-data" / "2_creature" / f"{i}.txt").write_text(f"({i} red:1.3) creature, BREAK white background")
    result = as_train_sh_runs_it(home, *SMALL, "--max_train_steps=2", "--weighted_captions", "--max_token_length=150",
                                 model="my-model", data="my-data", output_dir="my-output", monkeypatch=monkeypatch,
                                 capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Captions: read for AUTOMATIC1111's emphasis and BREAK" in (home / "my-output" / "README.md").read_text()


def test_caption_accuracy_reads_the_captions_as_the_run_recorded(tiny_sd, tiny_clip, tmp_path, capsys, monkeypatch):
    # A --weighted_captions run records it (its model card, its checkpoints' training_state.json): metrics.py then
    # reads --caption_data's captions for emphasis without being told, as it would with --weighted_captions.
    rows = [(f"{i}.png", demo_image(i), f"a ((red)) creature, (number {i}:1.3)") for i in range(4)]
    data = image_folder(tmp_path / "data", rows)
    train(tiny_sd, tmp_path / "weighted", "--max_train_steps", "2", "--checkpointing_steps", "2",
          "--weighted_captions", data=data)  # fmt: skip
    train(tiny_sd, tmp_path / "literal", "--max_train_steps", "2", data=data)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a creature\n")
    asked, measure = [], metrics.caption_hits  # how each model's captions were asked to be read

    def recorded_call(*args, **kwargs):
        asked.append(kwargs["weighted"])
        return measure(*args, **kwargs)

    monkeypatch.setattr(metrics, "caption_hits", recorded_call)

    def scores(*models, flags=()):
        report = metrics.main(["--model_path", *map(str, models), "--clip_model", tiny_clip, "--prompts_file",
                               str(prompts), "--caption_data", str(data), "--output_dir", str(tmp_path / "scores"),
                               "--num_inference_steps", "2", "--resolution", "32", "--device", "cpu", *flags])  # fmt: skip
        return [(m["caption_accuracy_weighted_captions"], m["caption_accuracy"]) for m in report["models"]]

    recorded = scores(tmp_path / "weighted", tmp_path / "weighted" / "checkpoint-2", tmp_path / "literal")
    assert [weighted for weighted, _ in recorded] == [True, True, False] and asked == [True, True, False]
    assert "captions read for emphasis" in capsys.readouterr().out
    told = scores(tmp_path / "weighted", tmp_path / "literal", flags=["--weighted_captions"])
    assert told == [recorded[0], (True, told[1][1])] and asked[3:] == [True, True]
