"""One run per --output_dir: fresh runs refuse an earlier run's folder, resumes say what changed, a checkpoint
path is a path, and checkpoints that can't be resumed as asked say why in one line."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sdtoolkit import checkpoints
from sdtoolkit.errors import UserError
from sdtoolkit.output_dir import flag_changes, training_flags
from tests.conftest import (
    REPO,
    demo_image,
    image_folder,
    train,
    train_args,
    unet_weights,
)
from train_text_to_image import parse_args

TWO_STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "1"]


# Fresh runs and --overwrite_output_dir ---------------------------------------------------------------------------


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_and_deletes_nothing(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, *TWO_STEPS)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if ".lock" not in p.name)
    with pytest.raises(UserError, match=r"holds an earlier run \(checkpoint-1, checkpoint-2, a saved pipeline"):
        train(tiny_sd, tmp_path, *TWO_STEPS, "--seed", "1")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if ".lock" not in p.name) == before


def test_a_finished_model_without_checkpoints_is_refused_too(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "1")  # no checkpoint: checkpointing_steps is 500
    with pytest.raises(UserError, match=r"holds an earlier run \(a saved pipeline"):
        train(tiny_sd, tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")


def test_overwrite_output_dir_replaces_the_earlier_run_and_only_what_it_wrote(tiny_sd, tmp_path, caplog):
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "1",
          "--validation_prompts", "a creature")  # fmt: skip
    (tmp_path / "my-notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path, *TWO_STEPS, "--seed", "1", "--overwrite_output_dir")
    assert "--overwrite_output_dir: deleted the earlier run's checkpoint-1, checkpoint-2, checkpoint-3" in caplog.text
    # Only the new run's checkpoints: `latest` can no longer pick up the old run's checkpoint-4.
    assert checkpoints.checkpoint_dirs(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / "training_state.json").read_text())["seed"] == 1
    assert not (tmp_path / "validation").exists() and not (tmp_path / "val_imgs_grid.png").exists()
    assert (tmp_path / "my-notes.txt").read_text() == "mine"
    StableDiffusionPipeline.from_pretrained(tmp_path)


# The run's identity --------------------------------------------------------------------------------------------


def test_every_checkpoint_records_the_runs_identity(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "out", *TWO_STEPS)
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "training_state.json").read_text())
    assert state["seed"] == 0 and state["total_batch_size"] == 2 and state["global_step"] == 2
    assert state["model"] == str(tiny_sd) and state["data_rows"] == 32 and len(state["data_fingerprint"]) == 64


def test_a_resume_that_changes_the_seed_or_the_data_says_what_changed(tiny_sd, tmp_path, caplog):
    out = tmp_path / "out"
    train(tiny_sd, out, *TWO_STEPS)
    other = image_folder(tmp_path / "other", [(f"{i}.png", demo_image(i), f"creature {i}") for i in range(6)])
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--seed", "1",
              "--resume_from_checkpoint", "latest", data=other)  # fmt: skip
    warning = next(r.message for r in caplog.records if "written by a run with other settings" in r.message)
    assert "seed 0 -> 1" in warning and "data content 32 rows" in warning and "-> 6 rows" in warning
    assert "total batch size" not in warning  # unchanged, so not listed

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same settings: nothing to say
        train(tiny_sd, out, "--max_train_steps", "4", "--seed", "1", "--resume_from_checkpoint", "latest", data=other)
    assert "other settings" not in caplog.text


def test_a_resume_with_other_training_flags_names_each(tiny_sd, tmp_path, caplog):
    out = tmp_path / "out"
    train(tiny_sd, out, *TWO_STEPS, "--learning_rate", "1e-4")
    flags = json.loads((out / "checkpoint-2" / "training_state.json").read_text())["flags"]
    assert flags["learning_rate"] == 1e-4 and flags["loss_type"] == "l2" and "output_dir" not in flags

    with caplog.at_level(logging.WARNING):
        train(tiny_sd, out, "--learning_rate", "2e-4", "--loss_type", "huber", "--random_flip",
              "--max_train_steps", "3", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")  # fmt: skip
    warning = next(r.message for r in caplog.records if "other flags than this command's" in r.message)
    assert "--learning_rate 0.0001 -> 0.0002" in warning and "--loss_type l2 -> huber" in warning
    assert "--random_flip False -> True" in warning and "continues from step 2" in warning
    assert "max_train_steps" not in warning  # a constant schedule: a longer run trains the first steps alike
    assert "other settings" not in caplog.text  # seed, batch, model and data are the same

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same training, saved more often, with other speed flags
        train(tiny_sd, out, "--learning_rate", "2e-4", "--loss_type", "huber", "--random_flip",
              "--max_train_steps", "4", "--checkpointing_steps", "5", "--no-cache_latents", "--no-fused_adam",
              "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "other flags" not in caplog.text


def test_which_flag_changes_a_resume_reports(tmp_path, monkeypatch):
    def flags(*extra):
        return training_flags(parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *extra]))

    # A secret is never written into a checkpoint.
    assert "hub_token" not in flags("--hub_token", "hf_s3cret")
    # A longer run changes what is trained only when the learning rate schedule follows its length.
    assert flag_changes(flags("--max_train_steps", "10"), flags("--max_train_steps", "20")) == []
    cosine = flag_changes(flags("--max_train_steps", "10", "--lr_scheduler", "cosine"),
                          flags("--max_train_steps", "20", "--lr_scheduler", "cosine"))  # fmt: skip
    assert cosine == ["--max_train_steps 10 -> 20"]
    # A relative path to the same folder, from another working directory, is the same flag.
    (tmp_path / "a" / "reg").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    before = flags("--reg_data_dir", "a/reg")
    monkeypatch.chdir(tmp_path / "a")
    assert flag_changes(before, flags("--reg_data_dir", "reg")) == []
    # How often it saves is not what it trains.
    assert flag_changes(flags(), flags("--save_every_n_epochs", "1", "--checkpointing_steps", "10")) == []
    # A checkpoint written before the flags were kept compares nothing.
    assert flag_changes({}, flags("--learning_rate", "1")) == []


# --resume_from_checkpoint: names and paths ----------------------------------------------------------------------


def test_a_checkpoint_path_loads_that_folder_not_the_output_dirs_namesake(tiny_sd, tmp_path):
    theirs, mine = tmp_path / "their-run", tmp_path / "my-run"
    train(tiny_sd, theirs, *TWO_STEPS, "--learning_rate", "1e-3")
    train(tiny_sd, mine, *TWO_STEPS, "--learning_rate", "1e-3", "--seed", "1")  # also has a checkpoint-2
    # Resuming their checkpoint into my folder would mix two runs: refused unless told to overwrite mine.
    with pytest.raises(UserError, match="holds an earlier run"):
        train(tiny_sd, mine, *TWO_STEPS, "--resume_from_checkpoint", str(theirs / "checkpoint-2"))
    train(
        tiny_sd, mine, *TWO_STEPS, "--resume_from_checkpoint", str(theirs / "checkpoint-2"), "--overwrite_output_dir"
    )
    # At step 2 of 2 nothing is trained: the saved model is exactly their checkpoint's UNet.
    saved, loaded = unet_weights(mine / "unet"), unet_weights(theirs / "checkpoint-2" / "unet")
    assert all(torch.equal(saved[k], loaded[k]) for k in loaded)


def test_a_checkpoint_path_resumes_into_an_empty_output_dir(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "a", *TWO_STEPS)
    train(
        tiny_sd,
        tmp_path / "b",
        "--max_train_steps",
        "3",
        "--resume_from_checkpoint",
        str(tmp_path / "a" / "checkpoint-2"),
    )
    assert checkpoints.checkpoint_dirs(tmp_path / "b") == [] and (tmp_path / "b" / "model_index.json").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        ("{tmp}/nowhere/checkpoint-2", "nowhere/checkpoint-2: no such folder"),
        ("{tmp}/a/unet", "not a checkpoint-N folder"),
        ("checkpoint-7", r"no such checkpoint in .* \(available: checkpoint-1, checkpoint-2\)"),
    ],
)
def test_a_checkpoint_that_is_not_there_is_named(tiny_sd, tmp_path, value, message):
    train(tiny_sd, tmp_path / "a", *TWO_STEPS)
    with pytest.raises(UserError, match=message):
        train(tiny_sd, tmp_path / "a", *TWO_STEPS, "--resume_from_checkpoint", value.format(tmp=tmp_path))


# Checkpoints that can't resume as asked -------------------------------------------------------------------------


def test_use_ema_on_a_checkpoint_saved_without_ema_is_one_line(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, *TWO_STEPS)
    with pytest.raises(UserError, match=r"--use_ema, but .*checkpoint-2 was saved without EMA \(no unet_ema/\)"):
        train(tiny_sd, tmp_path, "--max_train_steps", "3", "--use_ema", "--resume_from_checkpoint", "latest")


def test_dropping_ema_on_resume_is_said(tiny_sd, tmp_path, caplog):
    train(tiny_sd, tmp_path, *TWO_STEPS, "--use_ema")
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert "holds EMA weights (unet_ema/), but --use_ema is not set" in caplog.text


def test_a_checkpoint_of_another_architecture_is_one_line(tiny_sd, tmp_path):
    # Another model: the tiny pipeline with a UNet of one layer per block instead of its two.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_sd, other)
    config = UNet2DConditionModel.load_config(other / "unet")
    UNet2DConditionModel.from_config({**config, "layers_per_block": 1}).save_pretrained(other / "unet")
    train(tiny_sd, tmp_path / "out", *TWO_STEPS)
    with pytest.raises(
        UserError, match=r"another architecture .*\(layers_per_block 2 vs 1\): resume it with .*tiny-sd"
    ):
        train(other, tmp_path / "out", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")


# A full disk ----------------------------------------------------------------------------------------------------

# Before checkpoint-4 is written, files may grow no more (as on a full disk): writes fail with an OSError.
DISK_FULL_AT_4 = """
import resource, signal, sdtoolkit.checkpoints as c
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_save = c.save_checkpoint
def save_checkpoint(accelerator, output_dir, global_step, *args, **kwargs):
    if global_step == 4:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    return _save(accelerator, output_dir, global_step, *args, **kwargs)
c.save_checkpoint = save_checkpoint
import train_text_to_image
train_text_to_image.save_checkpoint = save_checkpoint
"""


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tiny_sd, tmp_path):
    argv = train_args(tiny_sd, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2")
    code = DISK_FULL_AT_4 + "import sys\nsys.argv[1:] = %r\ntrain_text_to_image.run_main(train_text_to_image.main)\n"
    result = subprocess.run([sys.executable, "-c", code % argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write checkpoint-4 in {tmp_path}: ")
    assert "the earlier checkpoints are intact" in last and "--resume_from_checkpoint latest" in last
    assert "Traceback" not in result.stderr
    assert checkpoints.checkpoint_dirs(tmp_path) == ["checkpoint-2"] and not list(tmp_path.glob(".*.partial"))
    UNet2DConditionModel.from_pretrained(tmp_path / "checkpoint-2" / "unet")


# The lock, in-process ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_the_lock_is_released_at_the_end_of_a_run(tiny_sd, tmp_path, fails):
    if fails:  # after it took the folder: the checkpoint is looked for there
        with pytest.raises(UserError, match="checkpoint-9"):
            train(tiny_sd, tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "checkpoint-9")
    else:
        train(tiny_sd, tmp_path, "--max_train_steps", "1")
    assert not (tmp_path / ".lock.json").exists()
    # Another process can take the folder while this one still runs (a lock still held here would refuse it).
    code = f"from filelock import FileLock; FileLock({str(tmp_path / '.lock')!r}, timeout=0).acquire(); print('taken')"
    taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert taken.stdout.strip() == "taken", taken.stderr[-500:]
