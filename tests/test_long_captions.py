"""--max_token_length: captions past CLIP's 77 tokens read in windows, each caption's empty windows masked out."""

import pytest
import torch
from transformers import CLIPTokenizer

import train_text_to_image
from sdtoolkit.clip_windows import caption_windows
from sdtoolkit.errors import UserError
from tests.conftest import DEMO_DATA, demo_image, image_folder, literal_windows, logged_losses, train

LONG = " ".join(["a very detailed and colourful pokemon"] * 14)  # 84 tokens: two windows


def test_a_caption_is_its_windows_then_empty_masked_ones(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    standard = tokenizer("a red creature", padding="max_length", max_length=77, truncation=True).input_ids
    empty = tokenizer("", padding="max_length", max_length=77).input_ids
    ids, mask, _ = caption_windows(tokenizer, "a red creature", 3)
    assert ids.tolist() == [standard, empty, empty] and mask.tolist() == [1, 0, 0]
    ids, mask, _ = caption_windows(tokenizer, LONG, 3)
    assert ids.shape == (3, 77) and mask.tolist() == [1, 1, 0] and ids[2].tolist() == empty
    longer = " ".join([LONG] * 2)  # three windows' worth, cut after two
    ids, mask, _ = caption_windows(tokenizer, longer, 2)
    assert len(literal_windows(tokenizer, longer)) == 3
    assert mask.tolist() == [1, 1] and ids.tolist() == literal_windows(tokenizer, longer)[:2]


def test_short_captions_train_as_at_75_tokens(tiny_sd, tmp_path):
    # The masked empty windows take no part in cross-attention: the same losses, cached or encoded every step,
    # and the same held-out losses.
    flags = ["--max_train_steps", "3", "--center_crop", "--learning_rate", "1e-3", "--validation_split", "0.25",
             "--checkpointing_steps", "3"]  # fmt: skip
    on_disk = ["--latent_cache_dir", str(tmp_path / "cache")]  # written by one run, read by the next
    train(tiny_sd, tmp_path / "75", *flags)
    train(tiny_sd, tmp_path / "225", *flags, "--max_token_length", "225", *on_disk)
    train(tiny_sd, tmp_path / "225-reread", *flags, "--max_token_length", "225", *on_disk)
    train(tiny_sd, tmp_path / "225-uncached", *flags, "--max_token_length", "225", "--no-cache_latents")
    runs = ("75", "225", "225-reread", "225-uncached")
    for tag in ("train_loss", "validation_loss"):
        losses = [[loss for _, loss in logged_losses(tmp_path / run, tag)] for run in runs]
        assert all(other == pytest.approx(losses[0], rel=1e-4) for other in losses[1:]), tag


def test_the_end_of_a_long_caption_is_learned(tiny_sd, tmp_path):
    # Captions alike for their first 84 tokens: at 75 only those are read, and two runs log the same losses;
    # at 150 their ends are read too.
    folders = [
        image_folder(tmp_path / end, [(f"{i}.png", demo_image(i), f"{LONG} {end} {i}") for i in range(4)])
        for end in ("red fire dragon", "blue water turtle")
    ]
    runs = {}
    for length in ("75", "150"):
        for n, data in enumerate(folders):
            out = tmp_path / f"{length}-{n}"
            train(tiny_sd, out, "--max_train_steps", "2", "--center_crop", "--max_token_length", length, data=data)
            runs[length, n] = [loss for _, loss in logged_losses(out)]
    assert runs["75", 0] == runs["75", 1]
    assert runs["150", 0] != pytest.approx(runs["150", 1], rel=1e-6)


def test_long_captions_with_a_held_out_loss_validation_and_a_text_encoder_lora(tiny_sd, tmp_path):
    # The held-out loss, the validation images and a text encoder that trains (encoding every step) read windows.
    data = image_folder(tmp_path / "data", [(f"{i}.png", demo_image(i), f"{LONG} number {i}") for i in range(8)])
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "2", "--max_token_length", "150", "--validation_split", "0.25",
          "--validation_prompts", LONG, "--lora_rank", "4", "--train_text_encoder", data=data)  # fmt: skip
    assert all(torch.isfinite(torch.tensor([loss for _, loss in logged_losses(out)])))
    assert [step for step, _ in logged_losses(out, tag="validation_loss")] == [0, 2]
    assert (out / "validation" / "final" / "00.png").exists()


def test_dream_training_with_windows_is_refused():
    with pytest.raises(UserError, match="--dream_training can't pass the windows' mask"):
        train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(DEMO_DATA),
                                        "--dream_training", "--max_token_length", "150"])  # fmt: skip
