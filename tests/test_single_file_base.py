"""Training from one .safetensors file in the original SD 1.x layout (what AUTOMATIC1111 and ComfyUI load, and
what users download), and loading and exporting what such a run writes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import metrics
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME
from tests.conftest import DEMO_DATA, SMALL, as_train_sh_runs_it, train

RUN = ["--use_ema", "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_prompts", "a red disc",
       "--learning_rate", "1e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def base_file(tiny_sd, tmp_path_factory):
    """The tiny pipeline as one float32 file, alone in a folder: its configs must come from --model_config."""
    path = tmp_path_factory.mktemp("downloads") / "tiny-base.safetensors"
    export_single_file(str(tiny_sd), str(path), half=False)
    return path


def weights(folder):
    return load_file(next(folder.glob("*.safetensors")))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_from_one_file_is_training_from_its_folder(tiny_sd, base_file, tmp_path):
    # With EMA, checkpoints and validation images, whose pipeline reloads the encoders freed after caching.
    from_folder, from_file = tmp_path / "from-folder", tmp_path / "from-file"
    train(tiny_sd, from_folder, *RUN)
    train(base_file, from_file, *RUN, "--model_config", str(tiny_sd))

    for part in ("unet", "vae", "text_encoder", "checkpoint-2/unet", "checkpoint-2/unet_ema"):
        assert same(weights(from_folder / part), weights(from_file / part)), part
    assert not same(weights(from_file / "unet"), weights(Path(tiny_sd) / "unet"))  # it trained
    images = sorted(p.relative_to(from_file) for p in from_file.glob("validation/*/*.png"))
    assert [str(p.parent) for p in images] == ["validation/final", "validation/step-4"]
    for image in images:
        assert Image.open(from_file / image).tobytes() == Image.open(from_folder / image).tobytes()
    # The saved pipeline is whole, and says where it came from.
    assert sorted(p.name for p in from_file.iterdir() if p.is_dir()) == sorted(
        p.name for p in from_folder.iterdir() if p.is_dir()
    )
    assert "fine-tuned from a local file `tiny-base.safetensors`" in (from_file / "README.md").read_text()
    state = json.loads((from_file / "checkpoint-4" / "training_state.json").read_text())
    assert (state["model"], state["model_config"]) == (str(base_file), str(tiny_sd))

    # A checkpoint of the run exports as one file, its VAE and text encoder read from the base file.
    exported = {}
    for run in (from_folder, from_file):
        export_single_file(str(run / "checkpoint-2"), str(tmp_path / f"{run.name}.safetensors"), half=False)
        exported[run.name] = load_file(tmp_path / f"{run.name}.safetensors")
    assert same(exported["from-folder"], exported["from-file"])


def test_a_lora_on_a_file_trains_through_train_sh_and_loads_everywhere(
    tiny_sd, base_file, tiny_clip, tmp_path, monkeypatch, capsys
):
    # A user's folder: the downloaded file, their data, a relative path to each; the configs from --model_config.
    home = tmp_path / "me"
    shutil.copytree(DEMO_DATA, home / "my-data")
    shutil.copy(base_file, home / "model.safetensors")
    result = as_train_sh_runs_it(home, *SMALL, "--max_train_steps=4", "--checkpointing_steps=2", "--lora_rank=4",
                                 "--learning_rate=1e-2", f"--model_config={tiny_sd}", model="model.safetensors",
                                 data="my-data", output_dir="my-lora", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lora = home / "my-lora"
    with safe_open(lora / KOHYA_WEIGHTS_NAME, "pt") as f:
        header = f.metadata()
    assert header["ss_sd_model_name"] == "model.safetensors"
    assert (header["sdtoolkit.model"], header["sdtoolkit.model_config"]) == (
        str(home / "model.safetensors"),
        str(tiny_sd),
    )
    assert "StableDiffusionPipeline.from_single_file(" in (lora / "README.md").read_text()

    # metrics.py scores the LoRA, its kohya file and its checkpoint on the base file their records name.
    report = metrics.main(["--model_path", str(lora), str(lora / KOHYA_WEIGHTS_NAME), str(lora / "checkpoint-2"),
                           "--clip_model", str(tiny_clip), "--seeds", "0", "--num_inference_steps", "2",
                           "--resolution", "32", "--output_dir", str(tmp_path / "scores")])  # fmt: skip
    scores = [model["clip_score"] for model in report["models"]]
    assert scores[0] == pytest.approx(scores[1], abs=1e-3) and scores[2] != scores[0]

    # Merged into the base file, as one file.
    export_single_file(str(lora), str(tmp_path / "merged.safetensors"), half=False)
    merged, base = load_file(tmp_path / "merged.safetensors"), load_file(base_file)
    assert merged.keys() == base.keys() and not same(merged, base)


def test_a_pickle_file_is_refused_before_anything_is_written(base_file, tmp_path):
    pickle = tmp_path / "model.ckpt"  # the name is what counts: .ckpt files are pickles
    shutil.copy(base_file, pickle)
    with pytest.raises(UserError, match=r"model.ckpt' is a pickle file, which can run code when loaded;"):
        train(pickle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_there_gets_one_line(tmp_path, tiny_clip):
    with pytest.raises(UserError, match=r"no such file: 'typo.safetensors' \(from "):
        train("typo.safetensors", tmp_path / "out")
    with pytest.raises(UserError, match=r"no such file: 'typo.safetensors' \(from "):
        metrics.main(["--model_path", "typo.safetensors", "--clip_model", str(tiny_clip), "--output_dir",
                      str(tmp_path / "scores")])  # fmt: skip


def test_a_file_without_configs_and_without_the_hub_says_what_to_pass(base_file, tmp_path):
    with pytest.raises(UserError, match=r"one file without its configs.*HF_HUB_OFFLINE=1 is set.*--model_config"):
        train(base_file, tmp_path / "out", "--max_train_steps", "1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--variant", "fp16"], "--variant is for a hub model or folder;"),
        (["--revision", "main"], "--revision is for a hub model or folder;"),
    ],
)
def test_hub_flags_with_a_file_get_one_line(base_file, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(base_file, tmp_path / "out", *flags)


def test_model_config_with_a_folder_gets_one_line(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="--model_config is for a --pretrained_model_name_or_path that is one file"):
        train(tiny_sd, tmp_path / "out", "--model_config", str(tiny_sd))
