"""Training survives crashes, preemption and bad data: exact resume, atomic saves, preflight checks, NaN stops.

The crash tests run the script in a subprocess and kill it for real (SIGKILL, SIGINT; SIGTERM in
tests/test_distributed.py).
"""

import argparse
import importlib.util
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import accelerate
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import train_text_to_image
from sdtoolkit import checkpoints
from sdtoolkit.data import to_rgb
from sdtoolkit.errors import TrainingStopped, UserError, run_main
from tests.conftest import (
    DEMO_DATA,
    REPO,
    SMALL,
    as_train_sh_runs_it,
    demo_image,
    image_folder,
    logged_losses,
    run_script,
    train,
    train_args,
    train_sh_env,
    unet_weights,
)

NO_MODEL = "/nonexistent/model"  # preflight errors must come before any model is loaded


def assert_bitwise_equal(a, b):
    a, b = unet_weights(a), unet_weights(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def start_script(argv, wrapper=None):
    """The training script in its own process; `wrapper` is Python run before it (to patch in a crash)."""
    code = (wrapper or "") + "\nimport sys, train_text_to_image as t\nsys.argv[1:] = %r\nt.run_main(t.main)\n" % argv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def collect(stream, lines):
    for line in stream:
        lines.append(line)


# Exact resume and atomic checkpoints -------------------------------------------------------------------------

# The power goes out while checkpoint-8 is saved: everything is written, not yet renamed into place.
KILLED_WHILE_SAVING = """
import os, signal, accelerate
_save_state = accelerate.Accelerator.save_state
def save_state(self, output_dir=None, **kwargs):
    _save_state(self, output_dir, **kwargs)
    if "checkpoint-8" in output_dir:
        os.kill(os.getpid(), signal.SIGKILL)
accelerate.Accelerator.save_state = save_state
"""


@pytest.mark.slow
def test_a_kill_while_saving_keeps_the_last_checkpoint_and_the_resume_is_bitwise_an_uninterrupted_run(
    tiny_sd, tmp_path
):
    # EMA, gradient accumulation 2, a warmup then a cosine schedule, flips: 32 images / batch 2 / accumulation 2 = 8
    # steps an epoch; killed while saving checkpoint-8, resumed from checkpoint-4 into the second epoch. (Without EMA
    # and accumulation, resumes are bitwise too: tests/test_train.py and tests/test_lora.py, in-process; aspect-ratio
    # buckets: tests/test_buckets.py.)
    flags = ["--use_ema", "--gradient_accumulation_steps", "2", "--random_flip", "--lr_scheduler", "cosine",
             "--lr_warmup_steps", "2", "--checkpoints_total_limit", "1"]  # fmt: skip
    last = 12
    common = ["--max_train_steps", str(last), "--checkpointing_steps", "4", "--learning_rate", "1e-3", *flags]
    whole, broken = tmp_path / "uninterrupted", tmp_path / "killed"
    train(tiny_sd, whole, *common)

    process = start_script(train_args(tiny_sd, broken, *common), wrapper=KILLED_WHILE_SAVING)
    assert process.wait(timeout=120) == -signal.SIGKILL
    # checkpoint-4 survives even with a total limit of 1: old ones go only after the new one is complete.
    assert checkpoints.checkpoint_dirs(broken) == ["checkpoint-4"]
    assert (broken / ".checkpoint-8.partial").exists() and not (broken / "model_index.json").exists()

    train(tiny_sd, broken, *common, "--resume_from_checkpoint", "latest")

    assert_bitwise_equal(whole / "unet", broken / "unet")
    assert_bitwise_equal(whole / f"checkpoint-{last}" / "unet", broken / f"checkpoint-{last}" / "unet")
    assert_bitwise_equal(whole / f"checkpoint-{last}" / "unet_ema", broken / f"checkpoint-{last}" / "unet_ema")
    # The resumed run logged only the steps after its checkpoint, and left nothing half-written.
    assert [step for step, _ in logged_losses(broken)] == list(range(5, last + 1))
    assert checkpoints.checkpoint_dirs(broken) == [f"checkpoint-{last}"] and not list(broken.glob(".*.partial"))
    StableDiffusionPipeline.from_pretrained(broken)


def test_without_skipping_seen_batches_the_runs_would_differ(tiny_sd, tmp_path, monkeypatch):
    # The equality above is not luck: resuming at the start of the epoch (no skipping) gives other weights.
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-3", "--random_flip"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_sd, whole, *common)
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    monkeypatch.setattr(train_text_to_image.Accelerator, "skip_first_batches", lambda self, loader, n: loader)
    train(tiny_sd, resumed, *common, "--resume_from_checkpoint", "latest")
    assert not torch.equal(
        unet_weights(whole / "unet")["conv_in.weight"], unet_weights(resumed / "unet")["conv_in.weight"]
    )


# Atomic saves ---------------------------------------------------------------------------------------------------


def test_what_a_crashed_save_left_is_removed_when_the_next_run_starts(tiny_sd, tmp_path):
    # A save that no run will redo (the test above redoes checkpoint-8's, which removes its folder anyway).
    (tmp_path / ".checkpoint-9.partial" / "unet").mkdir(parents=True)
    (tmp_path / ".pipeline.partial").mkdir()
    train(tiny_sd, tmp_path, "--max_train_steps", "1")
    assert not list(tmp_path.glob(".*.partial"))


def test_a_crash_while_saving_the_pipeline_never_leaves_a_loadable_mix(tiny_sd, tmp_path, monkeypatch):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    checkpoints.save_pipeline(pipeline, tmp_path)
    StableDiffusionPipeline.from_pretrained(tmp_path)  # a first, complete save

    real_replace = os.replace

    def replace_then_crash(source, destination):
        real_replace(source, destination)
        if os.path.basename(destination) == "unet":
            raise OSError("disk full")

    monkeypatch.setattr(checkpoints.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_pipeline(pipeline, tmp_path)
    # The new UNet is in, the rest is old: the folder has no model_index.json, so nothing loads it as a pipeline.
    assert not (tmp_path / "model_index.json").exists()
    with pytest.raises(OSError, match="model_index.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    checkpoints.save_pipeline(pipeline, tmp_path)
    StableDiffusionPipeline.from_pretrained(tmp_path)


# Preemption -----------------------------------------------------------------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_sd, tmp_path, monkeypatch, capsys):
    # As a terminal sends it: to every process of `bash train.sh` (bash, the launcher, the script). SIGTERM (a
    # scheduler's preemption) takes the same way out: tests/test_distributed.py sends it to one of two processes.
    # (Each such run costs a CI machine 15 s.)
    flags = [*SMALL, "--train_batch_size=1", "--max_train_steps=100000", "--checkpointing_steps=2"]
    env = train_sh_env(tiny_sd, DEMO_DATA, "out")
    process = subprocess.Popen(["bash", str(REPO / "train.sh"), *flags], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    lines = []
    reader = threading.Thread(target=collect, args=(process.stdout, lines), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not (tmp_path / "out" / "checkpoint-2").exists():  # a few steps in
        assert process.poll() is None and time.time() < deadline, "".join(lines[-20:])
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    reader.join(timeout=10)

    # The script's line is the last one: the launcher waited for it, and no traceback of its own came after.
    output = "".join(lines)
    last = output.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGINT at step ") and "--resume_from_checkpoint latest" in last, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    step = int(last.split(" at step ")[1].split()[0])
    assert step >= 2 and checkpoints.checkpoint_dirs(tmp_path / "out")[-1] == f"checkpoint-{step}"
    assert not (tmp_path / "out" / "model_index.json").exists()
    # The folder is released: the next run is not told of a run that was "killed" (tests/test_output_dir.py).
    assert not (tmp_path / "out" / ".lock.json").exists()

    flags[flags.index("--max_train_steps=100000")] = f"--max_train_steps={step + 1}"
    result = as_train_sh_runs_it(tmp_path, *flags, "--resume_from_checkpoint=latest", model=tiny_sd, data=DEMO_DATA,
                                 output_dir="out", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s for s, _ in logged_losses(tmp_path / "out")] == [step + 1]
    StableDiffusionPipeline.from_pretrained(tmp_path / "out")


def test_a_hangup_saves_a_checkpoint_too(tiny_sd, tmp_path, monkeypatch):
    # SIGHUP: the ssh session or terminal the run was started from closed. Sent here as step 3 is logged, in this
    # process: the run stops after the step under way then, the 4th.
    # (Under nohup it is ignored and training goes on: tests/test_distributed.py.)
    log = accelerate.Accelerator.log

    def log_and_hang_up(self, values, step=None, **kwargs):
        log(self, values, step=step, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGHUP)

    monkeypatch.setattr(accelerate.Accelerator, "log", log_and_hang_up)
    with pytest.raises(TrainingStopped, match=r"^SIGHUP at step 4 of 100000; the state is saved in .*checkpoint-4\. "
                                              "Resume with the same command and --resume_from_checkpoint latest"
                       ) as stopped:  # fmt: skip
        train(tiny_sd, tmp_path, "--max_train_steps", "100000", "--checkpointing_steps", "100000")
    assert stopped.value.exit_code == 128 + signal.SIGHUP
    assert checkpoints.checkpoint_dirs(tmp_path) == ["checkpoint-4"]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # as it was


# Non-finite loss ------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_sd, tmp_path):
    # Warming up to a learning rate of 1e30: step 1 has lr 0, step 2 throws the weights to ~1e29, and the
    # forward pass of step 3 overflows. Checkpoint 2 holds those weights; checkpoint 1 is the last good one.
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "1", "--learning_rate", "1e30",
             "--lr_scheduler", "linear", "--lr_warmup_steps", "4"]  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"the loss became nan at step 3; .*good checkpoint is .*checkpoint-1:"):
        train(tiny_sd, tmp_path, *flags)
    assert checkpoints.checkpoint_dirs(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "model_index.json").exists() and not (tmp_path / "unet").exists()


def test_a_nan_loss_exits_with_code_1_and_one_line(tiny_sd, tmp_path, capsys):
    flags = ["--max_train_steps", "3", "--learning_rate", "1e30", "--lr_scheduler", "linear", "--lr_warmup_steps", "4"]
    # As the script's entry point runs it (train.sh's tests run it in processes of their own).
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: train_text_to_image.main(train_args(tiny_sd, tmp_path, *flags)))
    assert exit.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped: the loss became nan at step 3;") and "No checkpoint was saved" in last


# Out of GPU memory ----------------------------------------------------------------------------------------------


def out_of_memory_at_step(step):
    """accelerate's backward pass, raising at `step` what PyTorch raises when CUDA runs out of memory
    (torch.cuda.OutOfMemoryError is the same class)."""
    backward, calls = accelerate.Accelerator.backward, []

    def backward_or_out_of_memory(self, loss, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"
                                         " of 23.65 GiB of which 1.06 GiB is free.")  # fmt: skip
        return backward(self, loss, **kwargs)

    return backward_or_out_of_memory


def test_out_of_gpu_memory_is_one_line_with_what_to_try_and_the_checkpoints_stay(tiny_sd, tmp_path, monkeypatch,
                                                                                  capsys):  # fmt: skip
    monkeypatch.setattr(accelerate.Accelerator, "backward", out_of_memory_at_step(3))
    argv = train_args(tiny_sd, tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "2", "--use_ema",
                      "--train_batch_size", "2")  # fmt: skip
    # As the script's entry point runs it: the last line and the exit code.
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: train_text_to_image.main(argv))
    assert exit.value.code == 1
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert last.startswith("stopped: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert f"the last checkpoint, {tmp_path / 'checkpoint-2'}, is kept. To fit, try --gradient_checkpointing," in last
    for option in ("--mixed_precision fp16", "--use_8bit_adam (or --optimizer Adafactor)", "--offload_ema", "--lora_rank 4",
                   "--train_batch_size 1 --gradient_accumulation_steps 2 (the same batch)"):  # fmt: skip
        assert option in last
    assert checkpoints.checkpoint_dirs(tmp_path) == ["checkpoint-2"] and not (tmp_path / "model_index.json").exists()


def test_out_of_gpu_memory_offers_only_what_the_run_does_not_use_yet(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(accelerate.Accelerator, "backward", out_of_memory_at_step(1))
    flags = ["--max_train_steps", "2", "--gradient_checkpointing", "--use_ema", "--offload_ema", "--lora_rank", "4",
             "--train_batch_size", "1"]  # fmt: skip
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_sd, tmp_path / "lora", *flags)
    assert str(stopped.value).endswith(
        "; no checkpoint was saved. To fit, try --mixed_precision fp16 (or bf16), --fp8_base (the frozen UNet in float8)"
    )
    monkeypatch.setattr(accelerate.Accelerator, "backward", out_of_memory_at_step(1))
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_sd, tmp_path / "fp8", *flags, "--fp8_base")
    assert str(stopped.value).endswith("; no checkpoint was saved. To fit, try --mixed_precision fp16 (or bf16)")


def test_out_of_gpu_memory_while_caching_suggests_a_smaller_vae_batch(tiny_sd, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    monkeypatch.setattr(train_text_to_image, "encode_cache", out_of_memory)
    for flags, advice in (([], "--vae_batch_size 1"), (["--vae_batch_size", "1"], "a lower --resolution")):
        argv = train_args(tiny_sd, tmp_path, "--max_train_steps", "2", "--center_crop", *flags)
        with pytest.raises(SystemExit) as exit:
            run_main(lambda: train_text_to_image.main(argv))
        assert exit.value.code == 1
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == (
            "stopped: out of GPU memory while caching the latents, before the first step (CUDA out of memory. Tried"
            f" to allocate 3.00 GiB.); try {advice}"
        )


# Preflight ------------------------------------------------------------------------------------------------------


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def preflight(tmp_path, *extra, data=DEMO_DATA, output_dir=None):
    argv = ["--pretrained_model_name_or_path", NO_MODEL, "--train_data_dir", str(data),
            "--output_dir", str(output_dir or tmp_path / "out"), "--resolution", "32", *extra]  # fmt: skip
    train_text_to_image.main(argv)


def test_output_dir_that_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write to --output_dir"):
        preflight(tmp_path, output_dir=tmp_path / "a_file" / "out")


def test_missing_image_column_lists_the_columns(tmp_path):
    with pytest.raises(
        UserError, match="--image_column 'picture' is not a column of the dataset; it has: image, text"
    ):
        preflight(tmp_path, "--image_column", "picture")


@pytest.mark.parametrize("caption, shown", [(5, "int 5"), ([1, 2], "list [1, 2]"), ([], "list []")])
def test_captions_that_are_not_strings(tmp_path, caption, shown):
    data = image_folder(tmp_path / "data", [("a.png", demo_image(0), caption), ("b.png", demo_image(1), caption)])
    with pytest.raises(UserError, match=re.escape(f"strings or lists of strings; row 0 holds {shown}")):
        preflight(tmp_path, data=data)


def test_an_empty_dataset(tmp_path):
    import datasets

    # A hub-style dataset with no rows, and an image folder with no images.
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict({"image": [], "text": []}).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    argv = ["--pretrained_model_name_or_path", NO_MODEL, "--dataset_name", str(tmp_path / "hub"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match="the training dataset is empty"):
        train_text_to_image.main(argv)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="the training dataset is empty"):
        preflight(tmp_path, data=tmp_path / "folder")


def test_resuming_from_a_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint in .* \\(available: none\\)"):
        preflight(tmp_path, "--resume_from_checkpoint", "checkpoint-500")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--offload_ema"], "--offload_ema moves the EMA weights to the CPU, so it needs --use_ema"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
        (["--noise_offset", "-1"], "--noise_offset must be a number >= 0"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--snr_gamma", "0"], "--snr_gamma must be a positive number"),
        (["--reg_data_dir", "/nonexistent"], "--reg_data_dir /nonexistent is not a folder"),
        (["--reg_data_dir", str(DEMO_DATA), "--prior_loss_weight", "-1"], "--prior_loss_weight must be a number >= 0"),
        # The bundled data is an imagefolder with a metadata file: no caption files, no N_name folders.
        (["--reg_data_dir", str(DEMO_DATA)], "--reg_data_dir .* holds no captioned images"),
        (["--text_encoder_lr", "1e-5"], "--text_encoder_lr is the learning rate of --train_text_encoder"),
        (["--stop_text_encoder_training", "5"], "--stop_text_encoder_training stops --train_text_encoder's"),
        (["--train_text_encoder", "--stop_text_encoder_training", "-1"], "must be at least 1 step, got -1"),
        (["--fp8_base"], "--fp8_base keeps the frozen base model's weights in float8, so it needs --lora_rank"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 8"),
        (["--resolution", "60"], "--resolution must be a positive multiple of 8"),
        pytest.param(["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="fp16 is fine where there is a GPU")),
        pytest.param(["--use_8bit_adam"], "needs torchao's 8-bit AdamW", marks=pytest.mark.skipif(
            torch.cuda.is_available() or importlib.util.find_spec("torchao") is not None,
            reason="8-bit AdamW runs here (bitsandbytes on a GPU, or torchao)")),
        # accelerate would only warn, and the run would log nowhere.
        pytest.param(["--report_to", "wandb"], "--report_to wandb needs wandb installed", marks=pytest.mark.skipif(
            importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")),
        # argparse's own errors are one line too, which the launcher can repeat last.
        (["--validation_prompts"], "argument --validation_prompts: expected at least one argument"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ],
)  # fmt: skip
def test_incompatible_or_impossible_flags(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        preflight(tmp_path, *flags)


def test_an_unknown_flag_named_like_a_secret_is_refused_without_its_value(tmp_path):
    # kohya-ss's --huggingface_token and --wandb_api_key are not flags here: the line names them, and what does
    # their work, but not the tokens, which would be printed and kept by the launcher.
    flags = ["--huggingface_token", "hf_secret_do_not_show", "--wandb_api_key=wandb_secret", "--hub-token", "hf_x2"]
    with pytest.raises(UserError) as err:
        preflight(tmp_path, *flags)
    line = str(err.value)
    assert line.startswith("unrecognized arguments: --huggingface_token *** --wandb_api_key=*** --hub-token *** --")
    assert "log in with `hf auth login`" in line and "did you mean --hub_token?" in line
    assert "secret" not in line and "hf_x2" not in line


def test_the_hub_failing_is_one_line_and_never_loses_the_model(tiny_sd, tmp_path, monkeypatch):
    secret = ["--hub_token", "hf_secret_do_not_show"]
    # Before training: the repository cannot be created (tests run with HF_HUB_OFFLINE=1).
    with pytest.raises(UserError, match="--push_to_hub: could not create the hub repository 'out': .*offline") as err:
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--push_to_hub", *secret)
    assert "hf_secret" not in str(err.value)

    # After training: the upload fails, and the line says where the model is and how to upload it later.
    monkeypatch.setattr(train_text_to_image, "create_repo", lambda **kwargs: argparse.Namespace(repo_id="me/out"))

    def no_network(**kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(train_text_to_image, "upload_folder", no_network)
    with pytest.raises(UserError, match="the model is saved in .*out, but uploading it to the hub repository 'me/out'"
                                       " failed: Connection refused -- upload it later with `hf upload me/out ") as err:  # fmt: skip
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--push_to_hub", "--overwrite_output_dir", *secret)
    assert "hf_secret" not in str(err.value)
    assert (tmp_path / "out" / "model_index.json").exists() and (tmp_path / "out" / "README.md").exists()


def test_preflight_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_script("train_text_to_image.py", "--pretrained_model_name_or_path", NO_MODEL,
                        "--train_data_dir", DEMO_DATA, "--output_dir", tmp_path / "a_file" / "out")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write to --output_dir")
    assert "Traceback" not in result.stderr


def broken_files_folder(tmp_path):
    good = [(f"{i}.png", demo_image(i), f"creature {i}") for i in range(3)]
    whole = png_bytes(demo_image(3))
    broken = [("garbage.png", b"not an image at all", "x"), ("truncated.png", whole[: len(whole) // 2], "y")]
    return image_folder(tmp_path / "data", good + broken)


def test_unreadable_images_are_reported_by_name(tmp_path):
    with pytest.raises(
        UserError, match=r"2 of 5 images can't be read: .*garbage\.png.*truncated\.png.*--skip_invalid"
    ):
        preflight(tmp_path, data=broken_files_folder(tmp_path))


def test_skip_invalid_images_drops_and_counts_them(tiny_sd, tmp_path, caplog):
    data = broken_files_folder(tmp_path)
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--skip_invalid_images", data=data)
    assert "dropped 2 of 5 images that can't be read" in caplog.text
    assert "Num examples = 3 (2 unreadable skipped)" in caplog.text
    assert (tmp_path / "out" / "model_index.json").exists()


# Images of any mode and size ------------------------------------------------------------------------------------


def test_to_rgb_handles_every_mode():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: shows the white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert [to_rgb(sixteen).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    palette = demo_image(0).convert("P")
    assert to_rgb(palette).mode == "RGB"
    transparent_palette = Image.new("P", (2, 2), 0)
    transparent_palette.info["transparency"] = 0
    assert to_rgb(transparent_palette).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "1", "CMYK", "LA", "F"):
        assert to_rgb(demo_image(0).convert(mode)).mode == "RGB"


def test_training_on_images_of_every_mode_and_size(tiny_sd, tmp_path):
    base = demo_image(0)
    rows = [
        ("rgba.png", base.convert("RGBA"), "an rgba creature"),
        ("palette.png", base.convert("P"), "a palette creature"),
        ("grey.png", base.convert("L"), "a grey creature"),
        ("deep.png", Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)), "a 16-bit creature"),
        ("tiny.png", base.resize((5, 3)), "a creature smaller than the resolution"),
        ("tall.jpg", base.resize((20, 300)).convert("CMYK"), "a tall cmyk creature"),
    ]
    data = image_folder(tmp_path / "data", rows)
    train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", "--train_batch_size", "6", "--resolution", "64",
          data=data)  # fmt: skip
    assert (tmp_path / "out" / "model_index.json").exists()


# Long captions --------------------------------------------------------------------------------------------------


def test_captions_longer_than_77_tokens_are_counted(tiny_sd, tmp_path, caplog):
    rows = [("a.png", demo_image(0), "a creature " * 60), ("b.png", demo_image(1), "a short caption")]
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=image_folder(tmp_path / "data", rows))
    assert "1 of 2 captions are longer than CLIP's 77 tokens" in caplog.text


# Data as people keep it -----------------------------------------------------------------------------------------


def pyarrow_parquet(path, images, captions):
    """A parquet file as pyarrow or pandas write it: the image column a plain {bytes, path} struct, no `datasets`
    feature metadata saying it holds images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)]
    pq.write_table(pa.table({"image": records, "text": captions}), str(path))
    return path


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "single-file"])
def test_a_parquet_file_written_by_pyarrow_trains(tiny_sd, tmp_path, as_file):
    (tmp_path / "data").mkdir()
    path = pyarrow_parquet(tmp_path / "data" / "train.parquet", [png_bytes(demo_image(i)) for i in range(4)],
                           [f"creature {i}" for i in range(4)])  # fmt: skip
    argv = train_args(tiny_sd, tmp_path / "out", "--max_train_steps", "2")
    argv[argv.index("--train_data_dir") : argv.index("--train_data_dir") + 2] = ["--dataset_name", str(
        path if as_file else path.parent)]  # fmt: skip
    train_text_to_image.main(argv)
    assert (tmp_path / "out" / "model_index.json").exists()


def test_a_broken_image_in_a_pyarrow_parquet_is_found_before_training(tmp_path):
    path = pyarrow_parquet(tmp_path / "train.parquet", [png_bytes(demo_image(0)), b"not an image"], ["a", "b"])
    argv = ["--pretrained_model_name_or_path", NO_MODEL, "--dataset_name", str(path), "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match=r"1 of 2 images can't be read: 1\.png"):
        train_text_to_image.main(argv)


def test_an_image_column_that_holds_no_images_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [1, 2], "text": ["a", "b"]}).to_parquet(str(tmp_path / "t.parquet"))
    argv = ["--pretrained_model_name_or_path", NO_MODEL, "--dataset_name", str(tmp_path / "t.parquet"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match=r"--image_column 'image' holds Value\('int64'\), not images"):
        train_text_to_image.main(argv)


def test_images_without_a_metadata_line_and_empty_captions_are_counted(tiny_sd, tmp_path, caplog):
    rows = [("a.png", demo_image(0), "a creature"), ("b.png", demo_image(1), "  "), ("c.png", demo_image(2), "")]
    data = image_folder(tmp_path / "data", rows)
    demo_image(3).save(data / "forgotten.png")
    (data / "sub").mkdir()
    demo_image(4).save(data / "sub" / "also-forgotten.jpg")
    with caplog.at_level(logging.WARNING):
        train(tiny_sd, tmp_path / "out", "--max_train_steps", "1", data=data)
    assert "2 images in" in caplog.text and "forgotten.png, sub/also-forgotten.jpg" in caplog.text
    assert "2 of 3 captions are empty" in caplog.text
