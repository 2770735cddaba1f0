"""The --cache_latents cache: made from the crops the pre-training check already decoded, kept on disk when
asked or when memory is short, and read back by a later run instead of encoded again."""

import io
import logging
import os
import shutil
import tracemalloc

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState

import train_text_to_image
from sdtoolkit import data as data_module
from sdtoolkit.data import large_row_groups, parquet_files
from sdtoolkit.latent_cache import DiskArrays
from tests.conftest import DEMO_DATA, demo_image, train, unet_weights

# Center crops and flips: the setting in which latents are cached.
CACHED = ["--center_crop", "--random_flip", "--max_train_steps", "3", "--learning_rate", "1e-3"]


def cache_folders(root):
    return sorted(path.name for path in root.iterdir())


def same_weights(a, b):
    a, b = unet_weights(a / "unet"), unet_weights(b / "unet")
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_reads_the_disk_cache_and_trains_the_same(tiny_sd, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "first", *CACHED, "--latent_cache_dir", str(cache))
    assert "Caching latents and text embeddings on disk in" in caplog.text
    [key] = cache_folders(cache)  # one whole cache, no partial folder left
    assert {p.name for p in (cache / key).iterdir()} == {
        "latent-mean-0.npy", "latent-std-0.npy", "text.npy", "text-empty.npy"
    }  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "second", *CACHED, "--latent_cache_dir", str(cache))
    assert f"Reading the cached latents and text embeddings from {cache / key}" in caplog.text
    assert cache_folders(cache) == [key]
    # Read from disk, in memory, or encoded anew: the same numbers, so the same weights.
    train(tiny_sd, tmp_path / "in-memory", *CACHED)
    assert same_weights(tmp_path / "first", tmp_path / "second")
    assert same_weights(tmp_path / "first", tmp_path / "in-memory")


def test_other_data_or_another_resolution_gets_a_cache_of_its_own(tiny_sd, tmp_path):
    cache = tmp_path / "cache"
    train(tiny_sd, tmp_path / "a", *CACHED, "--latent_cache_dir", str(cache))
    train(tiny_sd, tmp_path / "b", *CACHED, "--latent_cache_dir", str(cache), "--resolution", "64")
    assert len(cache_folders(cache)) == 2
    # The bundled data with one caption changed: same images, same shapes, other text embeddings.
    data = shutil.copytree(DEMO_DATA, tmp_path / "data")
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"text": "', '"text": "a changed caption, ')
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    train(tiny_sd, tmp_path / "c", *CACHED, "--latent_cache_dir", str(cache), data=data)
    assert len(cache_folders(cache)) == 3


def test_a_cache_too_big_for_memory_goes_to_disk(tiny_sd, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_text_to_image, "available_memory", lambda: 1000)
    monkeypatch.setattr(train_text_to_image, "DEFAULT_DISK_FOLDER", str(tmp_path / "default"))
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", *CACHED)
    assert "more than half of the 0.0 GB of free memory" in caplog.text
    assert len(cache_folders(tmp_path / "default" / "latents")) == 1
    # With no memory to spare, the crops are not kept through the check either.
    assert "caching decodes the images again" in caplog.text


def test_caching_decodes_each_image_once(tiny_sd, tmp_path, monkeypatch):
    decode = datasets.Image.decode_example
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Image, "decode_example", counted)
    train(tiny_sd, tmp_path / "kept", *CACHED)
    rows = 32  # the bundled data
    assert len(calls) == rows
    # Without the kept crops caching decodes every image again, and trains the same.
    calls.clear()
    monkeypatch.setattr(train_text_to_image, "cache_crop_maker", lambda args: None)
    train(tiny_sd, tmp_path / "decoded", *CACHED)
    assert len(calls) == 2 * rows
    assert same_weights(tmp_path / "kept", tmp_path / "decoded")


def test_bfloat16_survives_the_disk(tmp_path):
    values = torch.randn(3, 4).to(torch.bfloat16)
    arrays = DiskArrays(str(tmp_path / "key"))
    arrays.new("x", values.shape, torch.bfloat16)[:] = values
    arrays.finish()
    assert torch.equal(DiskArrays(str(tmp_path / "key")).open("x", values.shape, torch.bfloat16), values)


def test_a_parquet_file_in_one_big_row_group_is_named(tmp_path, monkeypatch):
    table = pa.table({"text": [os.urandom(500).hex() for _ in range(8)]})  # 1000 bytes each, incompressible
    pq.write_table(table, tmp_path / "one.parquet")
    pq.write_table(table, tmp_path / "small.parquet", row_group_size=1)
    monkeypatch.setattr(data_module, "LARGE_ROW_GROUP_BYTES", 4000)
    assert [(path, rows) for path, rows, _ in large_row_groups(parquet_files(str(tmp_path)))] == [
        (str(tmp_path / "one.parquet"), 8)
    ]
    # A folder that holds anything but parquet files (and a README) is not read as parquet.
    (tmp_path / "README.md").write_text("a dataset card")
    assert len(parquet_files(str(tmp_path))) == 2
    demo_image(0).save(tmp_path / "0.png")
    assert parquet_files(str(tmp_path)) == []


def test_loading_a_parquet_file_holds_one_row_group_not_the_file(tmp_path):
    # 256 incompressible images of ~60 KB in row groups of 8. pyarrow's default pre-buffering reads every row
    # group of the file into Python bytes before `datasets` converts the first one; the check then holds 64
    # images (a quarter of the file) at a time, two batches at the turn.
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    images = []
    for _ in range(256):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (140, 140, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": images, "text": ["a"] * 256}), path, row_group_size=8)
    size = path.stat().st_size
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", str(path),
                                           "--cache_dir", str(tmp_path / "hub"), "--no-cache_latents"])  # fmt: skip
    tracemalloc.start()
    try:
        train_text_to_image.load_training_dataset(args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size * 0.75, f"loading a {size / 1e6:.0f} MB file held {peak / 1e6:.0f} MB of Python memory at once"


def test_a_parquet_folder_trains_on_its_train_files_only(tmp_path):
    # A hub dataset's snapshot: data/train-*.parquet and data/test-*.parquet beside a README.
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    (tmp_path / "snapshot" / "README.md").write_text("a dataset card")
    for split, rows in (("train", 4), ("test", 2)):
        images = []
        for i in range(rows):
            buffer = io.BytesIO()
            demo_image(i).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"{i}.png"})
        table = pa.table({"image": images, "text": [f"{split} {i}" for i in range(rows)]})
        pq.write_table(table, tmp_path / "snapshot" / "data" / f"{split}-00000-of-00001.parquet")
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name",
                                           str(tmp_path / "snapshot"), "--cache_dir", str(tmp_path / "hub")])  # fmt: skip
    PartialState()  # the script's logger needs accelerate's state
    train_rows = train_text_to_image.load_training_dataset(args)[0]
    assert train_rows["text"] == [f"train {i}" for i in range(4)]
