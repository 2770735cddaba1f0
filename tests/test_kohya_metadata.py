"""--in_json: kohya-ss's fine-tuning metadata (merge_captions_to_metadata.py's JSON, or JSON lines) captions the
images as sd-scripts' fine_tune.py reads it: keys with or without their extension, relative or absolute, a
caption then its tags after a comma."""

import json
import logging
import os
import shutil

import pytest
import torch
from accelerate import PartialState

import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.kohya_metadata import read_kohya_metadata
from tests.conftest import (
    SMALL,
    as_train_sh_runs_it,
    caption_folder,
    demo_image,
    reset_accelerate_state,
    train,
    train_args,
    unet_weights,
)

CAPTIONS = [("a green creature", "round, small"), ("a red creature", ""), ("", "blue, tall"), ("a yellow one", None)]


def kohya_caption(caption, tags):
    """The caption sd-scripts trains on: the caption, then the tags after its caption separator (a comma)."""
    return ",".join(part for part in (caption, tags) if part)


def write_json(path, metadata):
    path.write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return path


def entry(caption, tags):
    return {"caption": caption, **({"tags": tags} if tags is not None else {})}


def test_keys_are_found_with_or_without_extension_relative_or_absolute(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    demo_image(0).save(images / "a.png")
    demo_image(1).save(images / "b.PNG")  # an upper-case extension, found from its stem
    (images / "sub").mkdir()
    demo_image(2).save(images / "sub" / "c.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    demo_image(3).convert("RGB").save(elsewhere / "d.avif")  # a phone's photo format, found from its stem too
    metadata = {
        "a": entry(*CAPTIONS[0]),  # merge_captions_to_metadata.py's default key: the file name without extension
        "b": entry(*CAPTIONS[1]),
        "sub/c.jpg": entry(*CAPTIONS[2]),  # a relative path with its extension
        str(elsewhere / "d"): entry(*CAPTIONS[3]),  # --full_path's key, absolute
    }
    dataset, notes = read_kohya_metadata(str(write_json(tmp_path / "meta_cap.json", metadata)), str(images))
    assert dataset["text"] == ["a green creature,round, small", "a red creature", "blue, tall", "a yellow one"]
    paths = [
        row["path"] for row in dataset.cast_column("image", dataset.features["image"].__class__(decode=False))["image"]
    ]
    assert paths == [
        str(images / "a.png"),
        str(images / "b.PNG"),
        str(images / "sub" / "c.jpg"),
        str(elsewhere / "d.avif"),
    ]
    assert dataset["repeats"] == [1, 1, 1, 1]
    assert notes == [
        f"Read --in_json {tmp_path / 'meta_cap.json'}: 4 images in {images}, 2 with tags after their caption"
    ]

    # JSON lines, sd-scripts' other format: {"image_path", "caption", "tags"} a line.
    lines = [json.dumps({"image_path": key, **value}) for key, value in metadata.items()]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    same, _ = read_kohya_metadata(str(tmp_path / "meta.jsonl"), str(images))
    assert same["text"] == dataset["text"]


def test_what_is_wrong_with_the_file_is_one_line(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    demo_image(0).save(images / "a.png")
    (images / "gone.npz").write_bytes(b"")  # sd-scripts' cached latents, without their image

    def refused(metadata, match, image_dir=str(images), name="meta.json"):
        path = tmp_path / name
        path.write_text(metadata if isinstance(metadata, str) else json.dumps(metadata), encoding="utf-8")
        with pytest.raises(UserError, match=match):
            read_kohya_metadata(str(path), image_dir)

    refused({"a": {"caption": "x"}, "gone": {"caption": "y"}, "other": {"caption": "z"}},
            r"2 of the 3 images --in_json .* lists are not found in .*img: gone, other; 1 have sd-scripts' cached"
            r" latents \(.npz\) beside them, which are not read here")  # fmt: skip
    refused({"a": {"caption": "x"}}, "names its images by relative paths .*: give the folder they are in as"
                                     " --train_data_dir", image_dir=None)  # fmt: skip
    refused({"a": {"caption": "", "tags": ""}}, "1 images of --in_json .* have neither a caption nor tags: a --"
                                                " write their captions, or pass --allow_missing_captions")  # fmt: skip
    refused("{not json", "is not valid JSON")
    refused(["a", "b"], "must hold one object that maps each image's key")
    refused({"a": {"caption": 3}}, "the caption of 'a' must be text, got 3")
    refused({}, "lists no images")
    refused('{"caption": "x"}\n', 'line 1: each line must be an object with an "image_path"', name="m.jsonl")
    with pytest.raises(UserError, match="no such file"):
        read_kohya_metadata(str(tmp_path / "missing.json"), str(images))
    # Allowed, an empty caption trains as one.
    (tmp_path / "empty.json").write_text(json.dumps({"a": {"caption": ""}}))
    dataset, notes = read_kohya_metadata(str(tmp_path / "empty.json"), str(images), allow_missing_captions=True)
    assert dataset["text"] == [""] and "1 images train with an empty caption" in notes[1]


def test_with_enable_wildcard_each_line_of_a_caption_gets_the_tags(tiny_sd, tmp_path):
    # sd-scripts' fine-tuning dataset under --enable_wildcard: the tags go after every non-empty line of the caption
    # (tags of several lines made one), since one line is drawn per example; a caption without lines is the tags.
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        demo_image(i).save(images / f"{i}.png")
    meta = write_json(tmp_path / "meta_cap.json", {
        "0": entry("a green creature\n\na drawing of a creature", "round,\nsmall"),
        "1": entry("a red creature", None),
        "2": entry("", "blue, tall"),
    })  # fmt: skip
    wild, _ = read_kohya_metadata(str(meta), str(images), wildcard=True)
    assert wild["text"] == ["a green creature,round,,small\na drawing of a creature,round,,small", "a red creature",
                            "blue, tall"]  # fmt: skip
    plain, _ = read_kohya_metadata(str(meta), str(images))  # without it, sd-scripts' one caption then the tags
    assert plain["text"][0] == "a green creature\n\na drawing of a creature,round,\nsmall"
    # The flag reaches the reading: each image's captions are its lines, each with the tags.
    args = train_text_to_image.parse_args(
        train_args(tiny_sd, "unused", "--in_json", str(meta), "--enable_wildcard", data=images)
    )
    PartialState()  # for the lines reading the data logs
    rows = train_text_to_image.load_training_dataset(args)[0]
    assert rows["text"][0] == ["a green creature,round,,small", "a drawing of a creature,round,,small"]
    # And so does a dataset config's: a fine-tuning subset, with the flag as its [general] key.
    config = tmp_path / "config.toml"
    config.write_text(f'[general]\nenable_wildcard = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
                      f'metadata_file = "{meta}"\n')  # fmt: skip
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--dataset_config",
                                           str(config), "--output_dir", "unused"])  # fmt: skip
    rows = train_text_to_image.load_training_dataset(args)[0]
    reset_accelerate_state()
    assert rows["text"][0] == ["a green creature,round,,small", "a drawing of a creature,round,,small"]


def captioned_both_ways(tmp_path, count):
    """The same images and captions twice: a caption-file folder, and a folder of the images alone with kohya-ss's
    metadata file (keys without extension). Returns (caption folder, image folder, metadata file)."""
    rows = [(f"{i:02d}.png", i, kohya_caption(*CAPTIONS[i % 4])) for i in range(count)]
    folder = caption_folder(tmp_path / "captions", rows)
    images = tmp_path / "images"
    images.mkdir()
    for name, _, _ in rows:
        shutil.copy(folder / name, images / name)
    meta = write_json(tmp_path / "meta_cap.json", {name[:2]: entry(*CAPTIONS[i % 4]) for name, i, _ in rows})
    return folder, images, meta


def test_it_trains_bit_for_bit_as_the_same_captions_in_text_files(tiny_sd, tmp_path):
    # The same eight images and captions, once as a caption-file folder, once as kohya-ss's metadata.
    folder, images, meta = captioned_both_ways(tmp_path, 8)
    steps = ["--max_train_steps", "2", "--learning_rate", "1e-3", "--checkpointing_steps", "2"]
    train(tiny_sd, tmp_path / "from-captions", *steps, data=folder)
    train(tiny_sd, tmp_path / "from-json", *steps, "--in_json", str(meta), data=images)
    a, b = unet_weights(tmp_path / "from-captions" / "unet"), unet_weights(tmp_path / "from-json" / "unet")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], weight) for name, weight in unet_weights(f"{tiny_sd}/unet").items())
    # The run records the metadata file as its data: in its checkpoint (resume checks it) and its model card.
    state = json.loads((tmp_path / "from-json" / "checkpoint-2" / "training_state.json").read_text())
    assert state["data"] == str(meta)
    assert "a local file `meta_cap.json`" in (tmp_path / "from-json" / "README.md").read_text()


def test_a_dataset_configs_metadata_file_subset_trains_as_the_same_caption_files(tiny_sd, tmp_path):
    # sd-scripts' fine-tuning subset (metadata_file, image_dir, num_repeats) beside a subset of caption files.
    folder, images, meta = captioned_both_ways(tmp_path, 4)
    others = caption_folder(tmp_path / "others", [(f"{i}.png", i, f"another creature {i}") for i in range(4, 8)])
    subset = {
        "captions": f'image_dir = "{folder}"\nnum_repeats = 2',
        "metadata": f'metadata_file = "{meta}"\nimage_dir = "{images}"\nnum_repeats = 2',
    }
    steps = ["--max_train_steps", "3", "--learning_rate", "1e-3"]
    for name, first in subset.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(f"[[datasets]]\n[[datasets.subsets]]\n{first}\n[[datasets]]\n[[datasets.subsets]]\n"
                          f'image_dir = "{others}"\n')  # fmt: skip
        train_text_to_image.main(
            without_data_dir(train_args(tiny_sd, tmp_path / name, "--dataset_config", str(config), *steps))
        )
    a, b = unet_weights(tmp_path / "captions" / "unet"), unet_weights(tmp_path / "metadata" / "unet")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # A subset whose keys are relative needs its image_dir, named in the error.
    config = tmp_path / "no-dir.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "{meta}"\n')
    with pytest.raises(UserError, match=r"the metadata_file .* of \[\[datasets.subsets\]\] 1 of \[\[datasets\]\] 1"
                                        " names its images by relative paths .* give the folder they are in as the"
                                        " subset's image_dir"):  # fmt: skip
        train_text_to_image.main(
            without_data_dir(train_args(tiny_sd, tmp_path / "x", "--dataset_config", str(config)))
        )


def without_data_dir(argv):
    i = argv.index("--train_data_dir")
    return argv[:i] + argv[i + 2 :]


def test_train_sh_reads_it_from_the_users_folder(tiny_sd, tmp_path, monkeypatch, capsys, caplog):
    user = tmp_path / "user"
    (user / "img").mkdir(parents=True)
    for i in range(4):
        demo_image(i).save(user / "img" / f"{i}.png")
    write_json(user / "meta_cap.json", {str(i): entry(*CAPTIONS[i]) for i in range(4)})
    with caplog.at_level(logging.INFO):
        result = as_train_sh_runs_it(user, *SMALL, "--max_train_steps=1", "--in_json=meta_cap.json",
                                     "--train_data_dir=img", model=tiny_sd, data="unused-hub-id", output_dir="out",
                                     monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Read --in_json meta_cap.json: 4 images in img, 2 with tags after their caption" in caplog.text
    assert (user / "out" / "model_index.json").is_file()

    # A metadata file given where a dataset config goes (train.sh's DATASET_NAME=meta_cap.json) is named for what it
    # is.
    result = as_train_sh_runs_it(user, *SMALL, model=tiny_sd, data="meta_cap.json", output_dir="out2",
                                 monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "error: --dataset_config meta_cap.json is kohya-ss's fine-tuning metadata (each image's caption), not a"
        " dataset config: give it as --in_json, with the folder of its images as --train_data_dir"
    )
    assert not os.path.exists(user / "out2")


def test_in_json_names_the_training_images_alone(tiny_sd, tmp_path):
    meta = write_json(tmp_path / "meta.json", {"a": {"caption": "x"}})
    with pytest.raises(UserError, match="--in_json lists the training images, .*: drop --dataset_name"):
        train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--dataset_name", "x",
                                  "--in_json", str(meta), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    # Whole paths (merge_captions_to_metadata.py --full_path) need no --train_data_dir.
    for i in range(2):
        demo_image(i).save(tmp_path / f"{i}.png")
    meta = write_json(tmp_path / "full.json", {str(tmp_path / f"{i}"): {"caption": f"thing {i}"} for i in range(2)})
    train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--in_json", str(meta), "--output_dir",
                              str(tmp_path / "full"), "--resolution", "32", "--max_train_steps", "1"])  # fmt: skip
    assert (tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
