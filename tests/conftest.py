"""Shared test fixtures: offline, seeded, tiny.

The tiny Stable Diffusion pipeline and the tiny CLIP model are built once per test session from config
(random weights, the real SD v1-4 tokenizer) into a temporary folder.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face library is imported

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from sdtoolkit.fixtures import build_sd_pipeline, build_tiny_clip, build_tiny_open_clip

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "creatures"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("models") / "tiny-open-clip", seed=0)


def reset_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def run_script(script, *args):
    """One of the project's scripts in its own process, offline; the CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def image_folder(folder, rows):
    """A --train_data_dir from (file name, PIL image or raw bytes, caption) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for name, image, caption in rows:
            if isinstance(image, bytes):
                (folder / name).write_bytes(image)
            else:
                image.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder
