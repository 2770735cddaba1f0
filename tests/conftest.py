"""Shared test fixtures: offline, seeded, tiny.

The tiny Stable Diffusion pipeline and the tiny CLIP model are built once per test session from config
(random weights, the real SD v1-4 tokenizer) into a temporary folder.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face library is imported

import pathlib

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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
