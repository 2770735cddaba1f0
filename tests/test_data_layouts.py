"""Data as people keep it: caption-file folders (nested, with kohya's N_name repeat folders), WebDataset shards,
--dataset_repeats, caption dropout and tag shuffling, all drawn per example so they are reproducible."""

import io
import json
import logging
import pathlib
import tarfile

import datasets
import PIL.Image
import pytest
import torch
from transformers import CLIPTokenizer

from sdtoolkit.data import TrainingExamples
from sdtoolkit.errors import UserError
from sdtoolkit.latent_cache import cache_bytes
from tests.conftest import (
    DEMO_DATA,
    SMALL,
    as_train_sh_runs_it,
    caption_folder,
    demo_image,
    example_args,
    image_folder,
    logged_losses,
    reset_accelerate_state,
    train,
    train_args,
    train_whole_and_resumed,
    unet_weights,
)


def test_a_nested_caption_folder_with_a_repeat_folder_trains(tiny_sd, tmp_path, caplog):
    data = caption_folder(tmp_path / "data", [("a/one.png", 0, "a pink creature"), ("a/b/two.jpg", 1, "a purple one"),
                                              ("3_rare/three.png", 2, "a yellow creature")])  # fmt: skip
    (data / "a" / "lost.txt").write_text("no image for me")
    with caplog.at_level(logging.INFO):
        # Through --dataset_name, as train.sh passes a folder.
        argv = train_args(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--center_crop", data=data)
        argv[argv.index("--train_data_dir")] = "--dataset_name"
        import train_text_to_image

        train_text_to_image.main(argv)
    assert f"Read {data} as a caption-file folder: 3 images, 3 with a .txt caption, 1 in N_name repeat folders" in (
        caplog.text
    )
    assert "1 caption files have no image beside them and are not used: a/lost.txt" in caplog.text
    assert "Repeats: 3 images make 5 examples per epoch" in caplog.text and "Num examples = 5" in caplog.text
    assert "Cached latents and text embeddings of 3 images (5 examples with repeats)" in caplog.text
    assert (tmp_path / "out" / "model_index.json").exists()


def test_a_folder_named_as_a_datasets_builder_trains_as_the_folder(tiny_sd, tmp_path, monkeypatch, caplog):
    # datasets reads --dataset_name text (or csv, json, eval, ...) as its own builder of that name; train.sh passes
    # the user's folder as a relative --dataset_name.
    image_folder(
        tmp_path / "text", [("one.png", demo_image(0), "a pink creature"), ("two.png", demo_image(1), "a purple one")]
    )
    monkeypatch.chdir(tmp_path)
    argv = train_args(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data="text")
    argv[argv.index("--train_data_dir")] = "--dataset_name"
    reset_accelerate_state()
    with caplog.at_level(logging.INFO):
        import train_text_to_image

        train_text_to_image.main(argv)
    assert "Read text as a dataset folder (image, text): 2 rows" in caplog.text
    assert (tmp_path / "out" / "model_index.json").exists()


@pytest.mark.parametrize("saved", ["a DatasetDict", "one Dataset"])
def test_a_dataset_saved_with_save_to_disk_trains_where_it_is(tiny_sd, tmp_path, monkeypatch, caplog, saved):
    # What a notebook leaves behind: dataset.save_to_disk("saved"). load_dataset refuses one Dataset and would copy
    # a DatasetDict whole into its cache; it is mapped where it is, and nothing is written beside it.
    rows = {"image": [demo_image(i) for i in range(4)], "text": ["a pink creature", "a purple one", "a", "b"]}
    dataset = datasets.Dataset.from_dict(
        rows, features=datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    )
    (datasets.DatasetDict(train=dataset) if saved == "a DatasetDict" else dataset).save_to_disk(tmp_path / "saved")
    files = sorted(tmp_path.joinpath("saved").rglob("*"))
    monkeypatch.chdir(tmp_path)
    # --max_train_samples shuffles it: datasets would write that shuffle's cache file beside it.
    flags = ["--max_train_steps", "1", "--cache_dir", "cache", "--max_train_samples", "3"]
    argv = train_args(tiny_sd, tmp_path / "out", *flags, data="saved")
    argv[argv.index("--train_data_dir")] = "--dataset_name"
    reset_accelerate_state()
    with caplog.at_level(logging.INFO):
        import train_text_to_image

        train_text_to_image.main(argv)
    assert "Read saved as a dataset saved with save_to_disk (image, text): 4 rows" in caplog.text
    assert (tmp_path / "out" / "model_index.json").exists() and sorted(tmp_path.joinpath("saved").rglob("*")) == files
    assert not any(tmp_path.joinpath("cache").rglob("*.arrow"))  # not copied into datasets' cache


def test_an_image_in_a_repeat_folder_without_a_caption_file_is_captioned_by_the_folder_name(tiny_sd, tmp_path, caplog):
    # kohya-ss's DreamBooth layout: 10_sks creature/ holds images and no caption files, and "sks creature" (its
    # class tokens) is their caption. A caption file still wins.
    from sdtoolkit.caption_folders import read_caption_folder

    data = caption_folder(tmp_path / "data", [("4_sks creature/one.png", 0, None), ("2_creature/two.png", 1, None),
                                              ("4_sks creature/three.png", 2, "a sks creature, smiling")])  # fmt: skip
    dataset, notes = read_caption_folder(data)
    paths = [image["path"] for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    assert dict(zip(paths, dataset["text"])) == {
        str(data / "2_creature" / "two.png"): "creature",
        str(data / "4_sks creature" / "one.png"): "sks creature",
        str(data / "4_sks creature" / "three.png"): "a sks creature, smiling",
    }
    assert notes[0] == (f"Read {data} as a caption-file folder: 3 images, 1 with a .txt caption, 2 captioned by their"
                        " N_name folder's name, 3 in N_name repeat folders")  # fmt: skip
    # With no caption file at all, it is still a caption folder, and trains.
    names_only = caption_folder(tmp_path / "names-only", [("10_sks creature/one.png", 0, None),
                                                          ("10_sks creature/two.png", 1, None)])  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=names_only)
    assert "2 images, 0 with a .txt caption, 2 captioned by their N_name folder's name" in caplog.text
    assert "Repeats: 2 images make 20 examples per epoch" in caplog.text


def test_regularization_images_are_balanced_as_kohya_balances_them():
    from sdtoolkit.data import balance_regularization

    # One round at each image's own repeats; then one more repeat per image in turn, until there are enough.
    assert balance_regularization([1, 1, 1], 7) == [3, 2, 2]
    assert balance_regularization([1] * 6, 4) == [1, 1, 1, 1, 0, 0]  # the rest are not used this run
    assert balance_regularization([5, 5], 3) == [5, 0]  # an image's repeats are not split
    assert balance_regularization([], 3) == []


def test_regularization_images_train_beside_the_images_at_their_loss_weight(tiny_sd, tmp_path, caplog):
    # DreamBooth's layout: the class images in 1_creature/, captioned "creature" by the folder's name.
    reg = caption_folder(tmp_path / "reg", [(f"1_creature/{i}.png", i, None) for i in range(5)])
    first_losses = []
    for weight in ("0", "1", "2"):
        out = tmp_path / f"weight-{weight}"
        with caplog.at_level(logging.INFO):
            train(tiny_sd, out, "--max_train_steps", "1", "--train_batch_size", "8", "--validation_split", "0.25",
                  "--reg_data_dir", str(reg), "--prior_loss_weight", weight)  # fmt: skip
        first_losses.append(logged_losses(out)[0][1])
    # The held-out images come from the training images only: 8 of the 32; the 24 left make as many examples as
    # the 5 regularization images do, which are never held out.
    assert "--validation_split: 8 of 32 images held out from training" in caplog.text
    assert ("--reg_data_dir: 5 of the 5 regularization images in" in caplog.text
            and "make 24 examples per epoch, beside the 24 training examples; their loss weighs 2" in caplog.text)  # fmt: skip
    assert "Num examples = 48" in caplog.text
    # Same batch in the three runs: the loss is the training examples' part plus the weight times the
    # regularization examples' part, so it moves by the same amount from weight 0 to 1 as from 1 to 2.
    at_0, at_1, at_2 = first_losses
    assert abs(at_1 - at_0) > 1e-3
    assert at_2 - at_1 == pytest.approx(at_1 - at_0, rel=1e-4)


def test_a_run_with_regularization_images_resumes_bit_for_bit(tiny_sd, tmp_path):
    reg = caption_folder(tmp_path / "reg", [(f"1_creature/{i}.png", i, None) for i in range(5)])
    flags = ["--reg_data_dir", str(reg), "--prior_loss_weight", "0.5", "--checkpointing_steps", "2"]
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    whole, parts = unet_weights(tmp_path / "whole" / "unet"), unet_weights(tmp_path / "parts" / "unet")
    assert all(torch.equal(whole[key], parts[key]) for key in whole)


def test_an_image_without_a_caption_file_is_an_error_unless_allowed(tiny_sd, tmp_path, caplog):
    data = caption_folder(
        tmp_path / "data", [("one.png", 0, "a creature"), ("two.png", 1, None), ("three.png", 2, " ")]
    )
    with pytest.raises(UserError, match=r"1 images have no \.txt caption file: two\.png; 1 caption files are empty:"
                                        r" three\.txt .*--allow_missing_captions"):  # fmt: skip
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=data)
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--allow_missing_captions", data=data)
    assert "--allow_missing_captions: 2 images train with an empty caption" in caplog.text


def test_a_caption_file_named_with_the_images_extension_is_named_with_the_file_it_should_be(tmp_path):
    # Some captioning tools write photo.jpg.txt; kohya-ss and this toolkit read photo.txt.
    from sdtoolkit.caption_folders import read_caption_folder

    data = caption_folder(tmp_path / "data", [("one.png", 0, "a creature"), ("two.png", 1, None)])
    (data / "two.png.txt").write_text("a purple creature")
    with pytest.raises(UserError) as error:
        read_caption_folder(str(data))
    assert str(error.value).startswith(
        f"1 images have no .txt caption file: two.png (in {data}) (an image's caption file is named without the"
        " image's extension: two.png reads two.txt, not two.png.txt) -- write their captions"
    )
    # In an N_name folder, the image trains on the folder's name, and the file is named among the unused ones.
    (data / "3_creature").mkdir()
    (data / "two.png").rename(data / "3_creature" / "two.png")
    (data / "two.png.txt").rename(data / "3_creature" / "two.png.txt")
    _, notes = read_caption_folder(str(data))
    assert notes[1] == (
        "1 caption files have no image beside them and are not used: 3_creature/two.png.txt (an image's caption"
        " file is named without the image's extension: 3_creature/two.png reads 3_creature/two.txt, not"
        " 3_creature/two.png.txt)"
    )


def test_caption_from_filename_captions_images_by_their_names_and_a_caption_file_still_wins(tiny_sd, tmp_path, caplog):
    # SimpleTuner's caption_strategy "filename": a folder of images named by what they show, no caption files.
    from sdtoolkit.caption_folders import read_caption_folder
    from sdtoolkit.dataset_config import read_dataset_config, read_folders
    from sdtoolkit.learning_check import read_caption_data

    data = caption_folder(tmp_path / "data", [("a_pink_creature.png", 0, None), ("3_sks/a purple__one.png", 1, None),
                                              ("two.png", 2, "a yellow creature")])  # fmt: skip
    dataset, notes = read_caption_folder(str(data), from_filename=True)
    assert dataset["text"] == ["a purple one", "a pink creature", "a yellow creature"]  # the folder's name loses
    assert notes[0] == (
        f"Read {data} as a caption-file folder: 3 images, 1 with a .txt caption, 2 captioned by their file name,"
        " 1 in N_name repeat folders"
    )
    without = read_caption_folder(str(data), allow_missing_captions=True)[0]["text"]
    assert without == ["sks", "", "a yellow creature"]  # without the flag, the N_name folder's name, or nothing
    assert read_caption_data(str(data), from_filename=True)[1] == dataset["text"]  # metrics.py --caption_data
    # A kohya-ss dataset config's image folder, whose class_tokens lose to the names as a folder's name does.
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data / "3_sks"}"\nclass_tokens = "sks"\n')
    _, subsets = read_dataset_config(str(config), caption_extension=".txt")
    assert read_folders(subsets, from_filename=True)[0]["text"] == ["a purple one"]
    assert read_folders(subsets)[0]["text"] == ["sks"]

    # A folder with no caption file at all is a caption-file folder with the flag, through train.sh's --dataset_name.
    (data / "two.txt").unlink()
    (data / "3_sks" / "a purple__one.png").rename(data / "a_purple_one.png")
    with caplog.at_level(logging.INFO):
        argv = train_args(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--caption_from_filename", data=data)
        argv[argv.index("--train_data_dir")] = "--dataset_name"
        reset_accelerate_state()
        import train_text_to_image

        train_text_to_image.main(argv)
    assert (
        f"Read {data} as a caption-file folder: 3 images, 0 with a .txt caption, 3 captioned by their file name"
        in (caplog.text)
    )


def test_a_caption_file_that_is_not_utf8_is_named(tiny_sd, tmp_path):
    data = caption_folder(tmp_path / "data", [("one.png", 0, "a creature")])
    (data / "one.txt").write_bytes("une créature".encode("latin-1"))
    with pytest.raises(UserError, match=r"caption file .*one\.txt is not UTF-8 text"):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=data)


def test_caption_extension(tiny_sd, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    demo_image(0).save(data / "one.png")
    (data / "one.caption").write_text("a creature")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--caption_extension", ".caption", data=data)
    assert "1 images, 1 with a .caption caption" in caplog.text


def test_dataset_repeats_count_in_the_epoch_and_the_steps(tiny_sd, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path, "--num_train_epochs", "1", "--dataset_repeats", "2", "--train_batch_size", "8")
    # 32 images x 2 repeats = 64 examples = 8 steps of 8 in one epoch.
    assert "Num examples = 64" in caplog.text and "Total optimization steps = 8" in caplog.text
    assert [step for step, _ in logged_losses(tmp_path)] == list(range(1, 9))


def examples(tokenizer, captions, images=None, repeats=None, **flags):
    """TrainingExamples over rows of the bundled images (or `images`) with these captions (uncached: captions
    tokenized)."""
    images = images or [demo_image(i % 32) for i in range(len(captions))]
    rows = datasets.Dataset.from_dict({"image": images, "text": captions})
    settings = dict(resolution=8, center_crop=True, random_flip=False, image_interpolation_mode="bilinear", seed=0)
    args = example_args(**{**settings, **flags})
    return TrainingExamples(
        rows, "image", "text", tokenizer, args, latent_shape=(4, 1, 1), num_train_timesteps=1000, repeats=repeats
    )


def captions_drawn(dataset, epochs):
    drawn = []
    for epoch in range(epochs):
        dataset.epoch = epoch
        for i in range(len(dataset)):
            # CLIP's decoder writes "a , b" for "a, b": put the commas back where they were.
            text = dataset.tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True)
            drawn.append(text.replace(" ,", ","))
    return drawn


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


def test_each_repeat_draws_its_own_noise(tokenizer):
    dataset = examples(tokenizer, ["a creature"], repeats=[2])
    assert len(dataset) == 2 and not torch.equal(dataset[0]["noise"], dataset[1]["noise"])


def test_a_repeated_row_is_the_same_examples_as_the_row_listed_again(tokenizer):
    # Random crops, flips and a caption list: every draw of the repeats is the one of a copy in its place.
    images, captions = [demo_image(0), demo_image(1).resize((12, 8))], [["a", "b", "c"], ["d"]]
    flags = dict(center_crop=False, random_flip=True, caption_dropout_rate=0.3)
    repeated = examples(tokenizer, captions, images, repeats=[3, 2], **flags)
    listed = examples(tokenizer, [captions[i] for i in (0, 0, 0, 1, 1)], [images[i] for i in (0, 0, 0, 1, 1)], **flags)
    assert len(repeated.dataset) == 2 and len(repeated) == len(listed) == 5
    # The cache holds each image once: the memory it asks for is that of the two images.
    once = examples(tokenizer, captions, images, **flags)
    assert cache_bytes(repeated, text_dim=32, dtype=torch.float32) == cache_bytes(
        once, text_dim=32, dtype=torch.float32
    )
    for epoch in range(3):
        repeated.epoch = listed.epoch = epoch
        for i in range(5):
            a, b = repeated[i], listed[i]
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_repeat_folder_trains_as_its_images_copied_and_encodes_each_once(tiny_sd, tmp_path, caplog):
    # kohya's 2_name folder against the same images each saved twice, side by side: the same examples in the
    # same order, so the same weights bit for bit. Buckets and the latent cache go by image; the batches by example.
    # The VAE encodes one image at a time here: its float rounding depends on how many images share a batch.
    repeated, copied = tmp_path / "repeated" / "2_creatures", tmp_path / "copied" / "creatures"
    for i, size in enumerate([(80, 120), (20, 20), (100, 100), (160, 90)]):  # 20x20 is too small for a bucket
        image = demo_image(i).convert("RGB").resize(size)
        for path in (repeated / f"{i}.png", copied / f"{i}a.png", copied / f"{i}b.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            path.with_suffix(".txt").write_text(f"creature {i}")
    flags = ["--resolution", "64", "--aspect_buckets", "--bucket_step", "16", "--min_bucket_side", "32",
             "--max_bucket_side", "128", "--bucket_no_upscale", "--center_crop", "--random_flip",
             "--max_train_steps", "4", "--vae_batch_size", "1"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out-repeated", *flags, data=repeated.parent)
    assert "Repeats: 4 images make 8 examples per epoch" in caplog.text and "are left out" in caplog.text
    assert "Cached latents and text embeddings of 3 images (6 examples with repeats)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out-copied", *flags, data=copied.parent)
    assert "Cached latents and text embeddings of 6 images in" in caplog.text
    a, b = unet_weights(tmp_path / "out-repeated" / "unet"), unet_weights(tmp_path / "out-copied" / "unet")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], base) for key, base in unet_weights(pathlib.Path(tiny_sd) / "unet").items())


def test_caption_dropout_empties_its_share_of_draws_reproducibly(tokenizer):
    dataset = examples(tokenizer, ["a pink creature"] * 20, caption_dropout_rate=0.1)
    drawn = captions_drawn(dataset, 100)  # 2,000 seeded draws
    assert len(drawn) == 2000 and 0.07 <= drawn.count("") / 2000 <= 0.13
    assert set(drawn) == {"", "a pink creature"}
    assert captions_drawn(examples(tokenizer, ["a pink creature"] * 20, caption_dropout_rate=0.1), 100) == drawn


def test_tag_shuffling_keeps_the_first_tags_and_shuffles_the_rest(tokenizer):
    tags = "pikachu, yellow, electric, cute, mouse, cartoon"
    dataset = examples(tokenizer, [tags] * 10, shuffle_tags=True, keep_tags=2)
    drawn = captions_drawn(dataset, 5)
    assert all(caption.startswith("pikachu, yellow, ") for caption in drawn)
    assert all(sorted(caption.split(", ")) == sorted(tags.split(", ")) for caption in drawn)
    assert len(set(drawn)) > 10  # 24 orders of the last four tags; 50 draws see many of them
    assert captions_drawn(examples(tokenizer, [tags] * 10, shuffle_tags=True, keep_tags=2), 5) == drawn


def test_a_keep_tags_separator_keeps_the_tags_around_the_shuffled_ones(tokenizer):
    # kohya-ss's keep_tokens_separator: before the first |||, kept in front; after a second one, kept at the end;
    # a caption without it keeps its first --keep_tags. The separators are not in the text.
    captions = ["sks dog, photo ||| red, blue, green, yellow ||| best quality, sharp", "pikachu, yellow, cute, mouse"]
    dataset = examples(tokenizer, captions * 5, shuffle_tags=True, keep_tags=1, keep_tags_separator="|||")
    drawn = captions_drawn(dataset, 5)
    separated, plain = drawn[0::2], drawn[1::2]
    assert all(c.startswith("sks dog, photo, ") and c.endswith(", best quality, sharp") for c in separated)
    assert all(sorted(c.split(", ")[2:6]) == ["blue", "green", "red", "yellow"] for c in separated)
    assert len(set(separated)) > 5 and all("|" not in c for c in drawn)
    assert all(c.startswith("pikachu, ") for c in plain) and len(set(plain)) > 3
    # Tag dropout leaves the kept ones too.
    dropped = captions_drawn(examples(tokenizer, captions[:1] * 10, caption_tag_dropout_rate=0.5,
                                      keep_tags_separator="|||"), 3)  # fmt: skip
    assert all(c.startswith("sks dog, photo") and c.endswith("best quality, sharp") for c in dropped)
    assert min(len(c.split(", ")) for c in dropped) < 8


def test_tag_dropout_leaves_out_tags_at_its_rate_keeping_the_first(tokenizer):
    tags = "pikachu, yellow, electric, cute, mouse, cartoon"
    drawn = captions_drawn(examples(tokenizer, [tags] * 10, caption_tag_dropout_rate=0.3, keep_tags=1), 20)
    kept = [caption.split(", ") for caption in drawn]
    assert all(caption[0] == "pikachu" for caption in kept)
    # Without shuffling the others keep their order; each is left out about 30% of the time (200 draws each).
    assert all(caption[1:] == [tag for tag in tags.split(", ")[1:] if tag in caption] for caption in kept)
    left_out = [sum(tag not in caption for caption in kept) / len(kept) for tag in tags.split(", ")[1:]]
    assert all(0.2 < share < 0.4 for share in left_out), left_out
    # With shuffling too: shuffled, then dropped; the same draws on a second pass.
    both = examples(tokenizer, [tags] * 10, caption_tag_dropout_rate=0.3, shuffle_tags=True, keep_tags=1)
    drawn = captions_drawn(both, 5)
    assert len({caption for caption in drawn if len(caption.split(", ")) == 6}) > 3
    assert captions_drawn(both, 5) == drawn


@pytest.mark.parametrize(
    "flags, key", [({"noise_offset": 0.1}, "offset_noise"), ({"input_perturbation": 0.1}, "perturbation")]
)
def test_a_random_strength_scales_each_examples_draw_from_0_to_1(tokenizer, flags, key):
    # kohya-ss's --noise_offset_random_strength and --ip_noise_gamma_random_strength, drawn per example after its
    # other draws: the same draw, times a factor of its own.
    random = {f"{'noise_offset' if key == 'offset_noise' else 'ip_noise_gamma'}_random_strength": True}
    fixed, scaled = examples(tokenizer, ["a creature"] * 8, **flags), examples(tokenizer, ["a creature"] * 8, **flags,
                                                                                  **random)  # fmt: skip
    factors = []
    for i in range(8):
        assert torch.equal(fixed[i]["noise"], scaled[i]["noise"]) and torch.equal(fixed[i]["timestep"],
                                                                                  scaled[i]["timestep"])  # fmt: skip
        if key == "offset_noise":  # the same draw, and its strength beside it (training scales it, with
            # --adaptive_noise_scale's share added)
            assert torch.equal(scaled[i][key], fixed[i][key]) and "offset_strength" not in fixed[i]
            factors.append(scaled[i]["offset_strength"].item())
        else:
            ratio = scaled[i][key] / fixed[i][key]
            torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()))
            factors.append(ratio.flatten()[0].item())
    assert all(0 <= factor < 1 for factor in factors) and len(set(factors)) == 8


def test_without_the_new_flags_the_draws_are_unchanged(tokenizer):
    # Dropout and shuffling draw last: with them off, every example is what it was before they existed.
    plain = examples(tokenizer, ["a creature, green"] * 4)
    off = examples(tokenizer, ["a creature, green"] * 4, caption_dropout_rate=0.0, shuffle_tags=False)
    for i in range(4):
        assert torch.equal(plain[i]["noise"], off[i]["noise"]) and torch.equal(
            plain[i]["timestep"], off[i]["timestep"]
        )


def test_cached_dropout_trains_like_encoding_every_step(tiny_sd, tmp_path):
    # The cache holds the empty caption's embedding: dropped examples use it, the same as encoding "" online.
    flags = ["--max_train_steps", "4", "--center_crop", "--caption_dropout_rate", "0.5", "--learning_rate", "1e-3"]
    train(tiny_sd, tmp_path / "cached", *flags)
    train(tiny_sd, tmp_path / "online", *flags, "--no-cache_latents")
    for (_, a), (_, b) in zip(logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "online")):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("flag", [["--shuffle_tags"], ["--caption_tag_dropout_rate", "0.2"]])
def test_shuffled_or_dropped_tags_train_with_the_latent_cache(tiny_sd, tmp_path, caplog, flag):
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path, "--max_train_steps", "2", "--center_crop", *flag, "--keep_tags", "1")
    assert "captions are not cached" in caplog.text and "Cached latents of 32 images" in caplog.text
    assert (tmp_path / "model_index.json").exists()


def test_a_caption_prefix_and_suffix_train_as_if_written_in_every_caption(tiny_sd, tmp_path):
    # kohya-ss's --caption_prefix / --caption_suffix on a metadata folder and on regularization images: the same
    # run, bit for bit, as the same words written into the captions themselves (and kept first by --keep_tags 1).
    rows = [(f"{i}.png", i, f"creature {i}, round") for i in range(6)]
    reg = [(f"1_creature/{i}.png", 6 + i, None) for i in range(2)]
    written = caption_folder(tmp_path / "written", [(n, i, f"sks, {c} best") for n, i, c in rows])
    written_reg = caption_folder(
        tmp_path / "written-reg", [(f"{i}.png", 6 + i, "sks, creature best") for i in range(2)]
    )
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--shuffle_tags",
             "--keep_tags", "1"]  # fmt: skip
    affixed = tmp_path / "affixed"
    train(tiny_sd, affixed, *flags, "--caption_prefix", "sks,", "--caption_suffix", "best", "--reg_data_dir",
          str(caption_folder(tmp_path / "reg", reg)), data=caption_folder(tmp_path / "data", rows))  # fmt: skip
    train(tiny_sd, tmp_path / "plain", *flags, "--reg_data_dir", str(written_reg), data=written)
    states = [json.loads((tmp_path / run / "checkpoint-2" / "training_state.json").read_text())
              for run in ("affixed", "plain")]  # fmt: skip
    assert states[0]["data_fingerprint"] == states[1]["data_fingerprint"]
    a, b = unet_weights(affixed / "unet"), unet_weights(tmp_path / "plain" / "unet")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_wildcards_draw_one_option_each_per_example(tokenizer):
    # kohya-ss's --enable_wildcard: {a|b|c} is one of its options, drawn per example and the same for a seed;
    # {{ and }} are braces. Without the flag the braces are words.
    caption = "a {red|blue|green} creature, {round|square}, {{sks}}"
    drawn = captions_drawn(examples(tokenizer, [caption] * 10, enable_wildcard=True), 10)
    colours = [c.split()[1] for c in drawn]
    assert {colours.count(colour) for colour in ("red", "blue", "green")} <= set(range(20, 48))  # 100 draws, 1/3 each

    def decoded(text):  # as captions_drawn reads it back
        return tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True).replace(" ,", ",")

    assert {c.split(", ")[1] for c in drawn} == {"round", "square"} and all(
        c.endswith(decoded(", {sks}")) for c in drawn
    )
    assert captions_drawn(examples(tokenizer, [caption] * 10, enable_wildcard=True), 10) == drawn
    assert captions_drawn(examples(tokenizer, [caption], enable_wildcard=False), 1) == [decoded(caption)]
    # A caption without wildcards draws as it did without the flag.
    plain = examples(tokenizer, ["a creature"] * 4)
    flagged = examples(tokenizer, ["a creature"] * 4, enable_wildcard=True)
    assert all(torch.equal(plain[i]["input_ids"], flagged[i]["input_ids"]) for i in range(4))


def test_a_caption_files_lines_train_as_a_list_of_captions_with_enable_wildcard(tiny_sd, tmp_path, caplog):
    # Caption files of several lines with --enable_wildcard train bit for bit as a metadata file whose captions are
    # the lists of those lines: one line drawn per example, cached alike, --caption_prefix on each line.
    lines = [[f"creature {i}", f"a drawing of creature {i}", "sks"][: 1 + i % 3] for i in range(6)]
    files = caption_folder(tmp_path / "files", [(f"{i}.png", i, "\n\n".join(c) + "\n") for i, c in enumerate(lines)])
    listed = image_folder(tmp_path / "listed", [(f"{i}.png", demo_image(i), c) for i, c in enumerate(lines)])
    reg = caption_folder(tmp_path / "reg", [("1_creature/r.png", 7, "a creature")])
    flags = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--center_crop", "--reg_data_dir", str(reg),
             "--caption_prefix", "sks"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "from-files", *flags, "--enable_wildcard", data=files)
    read = "--enable_wildcard: 4 images have several captions (a caption's lines), one drawn per example; 0 captions"
    assert read in caplog.text and "Cached latents and text" in caplog.text
    train(tiny_sd, tmp_path / "from-lists", *flags, data=listed)
    a, b = unet_weights(tmp_path / "from-files" / "unet"), unet_weights(tmp_path / "from-lists" / "unet")
    assert all(torch.equal(a[key], b[key]) for key in a)
    # Without the flag, captions of several lines (and no wildcards) are named too.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path / "joined", "--max_train_steps", "1", data=files)
    assert "4 captions have several lines, read as one caption each, and 0 hold {a|b} wildcards" in caplog.text
    # A regularization image's caption lines are its captions too, with --caption_prefix on each.
    from accelerate import PartialState

    import train_text_to_image

    (reg / "1_creature" / "r.txt").write_text("a creature\na drawing")
    args = train_text_to_image.parse_args(train_args(tiny_sd, "unused", *flags, "--enable_wildcard", data=files))
    PartialState()  # for the lines it logs
    features = datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))})
    rows = train_text_to_image.read_regularization_images(args, [], features, "image", "text", 4, keep_crops=False,
                                                          keep_bytes=0)[0]  # fmt: skip
    reset_accelerate_state()
    assert rows["text"] == [["sks a creature", "sks a drawing"]]


def test_held_out_images_are_measured_on_their_first_line_and_first_options(tiny_sd, tmp_path):
    # --validation_split reads each held-out caption one way, always: its first line, each wildcard's first option.
    drawn = caption_folder(tmp_path / "drawn", [(f"{i}.png", i, f"a {{pink|green}} creature {{{{{i}}}}}\nline two")
                                                for i in range(4)])  # fmt: skip
    first = caption_folder(tmp_path / "first", [(f"{i}.png", i, f"a pink creature {{{i}}}") for i in range(4)])
    flags = ["--max_train_steps", "1", "--validation_split", "0.5"]
    train(tiny_sd, tmp_path / "a", *flags, "--enable_wildcard", data=drawn)
    train(tiny_sd, tmp_path / "b", *flags, data=first)
    a, b = (logged_losses(tmp_path / run, "validation_loss") for run in ("a", "b"))
    assert a[0] == b[0] and a[0][0] == 0


def test_wildcards_train_from_a_dataset_config_through_train_sh_and_are_named_without_it(
    tiny_sd, tmp_path, caplog, monkeypatch, capsys
):
    data = caption_folder(tmp_path / "data", [("0.png", 0, "a {pink|green} creature\nsks, {round|square}"),
                                              ("1.png", 1, "a creature {{sks}}")])  # fmt: skip
    config = tmp_path / "data.toml"
    config.write_text(f'[general]\nenable_wildcard = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data}"\n')
    with caplog.at_level(logging.INFO):
        result = as_train_sh_runs_it(tmp_path, *SMALL, "--max_train_steps=2", "--dataset_config", str(config),
                                     "--validation_split", "0.5", model=tiny_sd, data=data, output_dir="out",
                                     monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    output = caplog.text
    assert result.returncode == 0, result.stderr[-3000:]
    caplog.clear()
    read = "--enable_wildcard: 1 images have several captions (a caption's lines), one drawn per example; 2 captions"
    assert read in output
    assert "captions are not cached" in output and "it sets --enable_wildcard" in output
    # Without the flag the run trains on the captions as written, and says what the flag would do.
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path / "plain", "--max_train_steps", "1", data=data)
    assert (
        "1 captions have several lines, read as one caption each, and 1 hold {a|b} wildcards, read as text;"
        " --enable_wildcard draws one line and one option per example" in caplog.text
    )


def test_bad_values_are_one_line(tmp_path):
    import train_text_to_image

    for flags, message in ((["--dataset_repeats", "0"], "--dataset_repeats must be at least 1"),
                           (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate must be between 0 and 1"),
                           (["--caption_tag_dropout_rate", "-0.1"],
                            "--caption_tag_dropout_rate must be between 0 and 1"),
                           (["--keep_tags", "-1"], "--keep_tags must be 0 or more"),
                           (["--keep_tags_separator", "|||"], "--keep_tags_separator marks the tags that --shuffle_tags"),
                           (["--shuffle_tags", "--keep_tags_separator", ", "], "must be text without a comma"),
                           (["--noise_offset_random_strength"], "draws a strength up to --noise_offset, which is not"),
                           (["--ip_noise_gamma_random_strength"], "up to --input_perturbation, which is not given")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            train_text_to_image.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir",
                                            str(DEMO_DATA), *flags])  # fmt: skip


def test_phone_photos_in_avif_train_and_those_in_heic_are_named(tiny_sd, tmp_path, caplog):
    # A caption folder of a phone's photos: AVIF, which Pillow reads, trains; HEIC, which it can't, is named as
    # any unreadable image is, with what to do (it used to be left out without a word, as a non-image file).
    data = caption_folder(tmp_path / "data", [("a.png", 0, "a creature")])
    demo_image(1).convert("RGB").save(data / "b.avif")
    (data / "b.txt").write_text("an avif creature")
    (data / "c.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # an HEIC file's first bytes
    (data / "c.txt").write_text("a phone photo")
    heic = r"1 of 3 images can't be read: .*c\.heic \(HEIC, which Pillow reads only with a plugin: convert it to JPEG"
    with pytest.raises(UserError, match=heic):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=data)
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--skip_invalid_images", data=data)
    assert "dropped 1 of 3 images that can't be read" in caplog.text and "Num examples = 2" in caplog.text


def test_a_200_megapixel_phone_photo_trains(tiny_sd, tmp_path, monkeypatch, caplog):
    # 16320 x 12240, as phones take them: past Pillow's guard against decompression bombs (179 MP refused), which
    # is for images from strangers. (One bit per pixel, so that the test's file is small.)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)  # put back after the run
    data = caption_folder(tmp_path / "data", [("a.png", 0, "a creature")])
    PIL.Image.new("1", (16320, 12240), 1).save(data / "b.png")
    (data / "b.txt").write_text("a large photo")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=data)
    assert "Num examples = 2" in caplog.text


def test_a_photo_stored_sideways_trains_upright(tmp_path):
    # A phone photo: pixels stored 40 wide x 20 high, with EXIF orientation 6 (rotate 90 degrees to view).
    from PIL import Image

    from sdtoolkit.caption_folders import read_caption_folder

    (tmp_path / "data").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "red").save(tmp_path / "data" / "phone.jpg", exif=exif)
    (tmp_path / "data" / "phone.txt").write_text("a red photo")
    dataset, _ = read_caption_folder(tmp_path / "data")
    assert dataset[0]["image"].size == (20, 40)


def webdataset(folder, shards=2, per_shard=3, extensions=("jpg", "txt", "json")):
    """img2dataset's output: .tar shards holding key.jpg, key.txt and key.json per image (bundled images and
    captions), with a .parquet and a _stats.json beside each shard."""
    captions = [json.loads(line)["text"] for line in (DEMO_DATA / "metadata.jsonl").read_text().splitlines()]
    folder.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                row = shard * per_shard + i
                jpeg = io.BytesIO()
                demo_image(row).convert("RGB").save(jpeg, "JPEG")
                files = {
                    "jpg": jpeg.getvalue(),
                    "txt": captions[row].encode(),
                    "json": json.dumps({"key": row}).encode(),
                }
                for extension in extensions:
                    entry = tarfile.TarInfo(f"{shard:05d}{i:04d}.{extension}")
                    entry.size = len(files[extension])
                    tar.addfile(entry, io.BytesIO(files[extension]))
        (folder / f"{shard:05d}_stats.json").write_text("{}")
        datasets.Dataset.from_dict({"key": [str(shard)]}).to_parquet(folder / f"{shard:05d}.parquet")
    return folder


def test_a_folder_of_webdataset_shards_trains_on_its_jpg_and_txt_files(tiny_sd, tmp_path, caplog):
    shards = webdataset(tmp_path / "shards")
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "1", data=shards)
    assert (f"Read {shards} as a WebDataset of 2 .tar shards: images from its .jpg files, captions from its .txt"
            " files, 6 rows") in caplog.text  # fmt: skip
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "training_state.json").read_text())
    assert state["data_rows"] == 6
    # Shards without captions: one line naming what they hold.
    bare = webdataset(tmp_path / "bare", extensions=("jpg", "json"))
    with pytest.raises(UserError, match="the WebDataset shards hold no captions for --caption_column 'text'; their"
                                        " files' extensions are: jpg, json; name the column"):  # fmt: skip
        train(tiny_sd, tmp_path / "out2", "--max_train_steps", "1", data=bare)


def test_caption_files_of_another_extension_are_named_with_the_flag_that_reads_them(
    tiny_sd, tmp_path, monkeypatch, capsys
):
    # sd-scripts' default extension is .caption; this script's is .txt. From the user's folder.
    user = tmp_path / "user"
    caption_folder(user / "img", [(f"{i}.png", i, f"a creature {i}") for i in range(3)])
    for i in range(3):
        (user / "img" / f"{i}.txt").rename(user / "img" / f"{i}.caption")
    result = as_train_sh_runs_it(user, *SMALL, "--max_train_steps=1", model=tiny_sd, data="img", output_dir="out",
                                 monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "error: img has images with .caption caption files beside them, and this run reads .txt ones: pass"
        " --caption_extension .caption"
    )
    assert not (user / "out" / "model_index.json").exists()
