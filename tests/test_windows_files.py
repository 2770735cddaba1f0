"""Text files as Windows tools often save them: UTF-8 with a byte-order mark (BOM) first and CRLF line ends.
Every text file a user gives is read as its text alone: a caption file's BOM would otherwise train as three
stray CLIP tokens in front of the caption, and a TOML or JSON file with one would not parse."""

import json

import datasets
from PIL import Image

import metrics
import train_text_to_image
from sdtoolkit.caption_folders import read_caption_folder
from sdtoolkit.data import unlisted_images
from sdtoolkit.dataset_config import read_dataset_config
from sdtoolkit.kohya_metadata import read_kohya_metadata
from sdtoolkit.sample_prompts import read_sample_prompts


def windows_file(path, text):
    """`text` saved as Notepad saves UTF-8: a BOM first, CRLF line ends."""
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    return path


def images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), "red").save(folder / name)
    return folder


def test_a_caption_file_is_its_text_alone(tmp_path):
    images(tmp_path, ["a.png", "b.png"])
    windows_file(tmp_path / "a.txt", "a red dragon, flying\n")
    windows_file(tmp_path / "b.txt", "first line\nsecond line\n")
    dataset, _ = read_caption_folder(tmp_path)
    assert dataset["text"] == ["a red dragon, flying", "first line\nsecond line"]


def test_metadata_files_name_their_images(tmp_path):
    # datasets reads a BOM-first metadata file; so does the check for images it leaves out.
    for kind, text in (("jsonl", '{"file_name": "a.png", "text": "red"}\n'), ("csv", "file_name,text\na.png,red\n")):
        folder = images(tmp_path / kind, ["a.png"])
        windows_file(folder / f"metadata.{kind}", text)
        assert unlisted_images(str(folder)) == []
        assert datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")["text"] == ["red"]


def test_config_and_metadata_files_parse(tmp_path):
    images(tmp_path / "img", ["a.png"])
    config = windows_file(tmp_path / "data.toml", '[general]\nshuffle_caption = true\n[[datasets]]\n'
                                                  '[[datasets.subsets]]\nimage_dir = "img"\n')  # fmt: skip
    assert read_dataset_config(str(config), caption_extension=".txt")[0] == {"shuffle_tags": True}
    flags = windows_file(tmp_path / "flags.toml", "[training]\nlearning_rate = 0.001\n")
    args = train_text_to_image.parse_args(["--config_file", str(flags), "--pretrained_model_name_or_path", "m",
                                           "--train_data_dir", str(tmp_path / "img")])  # fmt: skip
    assert args.learning_rate == 0.001
    metadata = windows_file(tmp_path / "meta_cap.json", json.dumps({"a": {"caption": "a red square"}}))
    dataset, _ = read_kohya_metadata(str(metadata), str(tmp_path / "img"))
    assert dataset["text"] == ["a red square"]


def test_prompt_files_are_their_prompts_alone(tmp_path):
    assert read_sample_prompts(str(windows_file(tmp_path / "p.txt", "a cat --s 3\na dog\n"))) == [
        ("a cat", {"num_inference_steps": 3}), ("a dog", {})]  # fmt: skip
    assert metrics.load_prompts(str(windows_file(tmp_path / "p2.txt", "a cat\na dog\n"))) == (["a cat", "a dog"], None)
    jsonl = windows_file(tmp_path / "p.jsonl", '{"prompt": "a cat", "negative_prompt": "blur"}\n')
    assert metrics.load_prompts(str(jsonl)) == (["a cat"], ["blur"])
