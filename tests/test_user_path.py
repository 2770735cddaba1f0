"""The path users take: `bash train.sh` from their own folder, errors through the launcher, one run per folder.

These tests run train.sh (and through it `python -m sdtoolkit.launch`, which is `accelerate launch`) from a
folder outside the toolkit, with relative paths, as a user would. Where what a test checks comes after the
launcher (a resumed run, a busy folder), the script runs in the test's process with the flags train.sh builds
(tests/conftest.py's train_sh_flags), from the same folder.
"""

import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_text_to_image
from tests.conftest import (
    DEMO_DATA,
    REPO,
    SMALL,
    TWO_CPU_PROCESSES,
    as_train_sh_runs_it,
    run_entry_point,
    train_args,
    train_sh,
    train_sh_flags,
)


@pytest.fixture
def user_folder(tmp_path, tiny_sd):
    """A user's own folder with their data and a model in it, outside the toolkit."""
    home = tmp_path / "me"
    shutil.copytree(DEMO_DATA, home / "my-data")
    shutil.copytree(tiny_sd, home / "my-model")
    return home


def test_train_sh_from_another_folder_reads_and_writes_there(user_folder, monkeypatch, capsys, caplog):
    # Regularization images in DreamBooth's layout: no caption files, the folder's name is their caption.
    (user_folder / "my-reg" / "1_creature").mkdir(parents=True)
    for i in range(3):
        shutil.copy(DEMO_DATA / f"{i:04d}.png", user_folder / "my-reg" / "1_creature")
    code, lines = train_sh(user_folder, *SMALL, "--max_train_steps=2", "--checkpointing_steps=1",
                           "--validation_split=0.25", "--reg_data_dir=my-reg", model="my-model", data="my-data",
                           output_dir="my-output")  # fmt: skip
    assert code == 0, "\n".join(lines[-20:])
    assert any("--reg_data_dir: 3 of the 3 regularization images in my-reg make 24 examples per epoch" in line
               for line in lines)  # fmt: skip
    assert (user_folder / "my-output" / "model_index.json").exists()
    # The held-out loss's summary is among the last lines the user sees.
    assert any("Held-out loss (8 images, --validation_split): " in line for line in lines[-5:]), lines[-5:]
    assert not (REPO / "my-output").exists() and not (REPO / "my-data").exists()
    assert not any("should be kept in float32" in line for line in lines)  # diffusers' warning about nothing
    # The lock is released at the end: nothing says a run holds the folder.
    assert not (user_folder / "my-output" / ".lock.json").exists()

    # A new run into the folder holding the first: refused, nothing of it touched.
    before = {p: p.stat().st_mtime_ns for p in (user_folder / "my-output").rglob("*") if p.is_file()}
    result = as_train_sh_runs_it(user_folder, *SMALL, "--max_train_steps=2", model="my-model", data="my-data",
                                 output_dir="my-output", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert lines[-1].startswith("error: --output_dir my-output holds an earlier run (checkpoint-1, checkpoint-2, a")
    assert "--overwrite_output_dir" in lines[-1]
    after = {p: p.stat().st_mtime_ns for p in (user_folder / "my-output").rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name not in (".lock", ".lock.json")} == {
        p: t for p, t in before.items() if p.name not in (".lock", ".lock.json")
    }

    # The first command resumed, to a later step: it continues with nothing to report (the same recipe, flags and
    # relative paths), and a changed learning rate is named.
    with caplog.at_level(logging.INFO):
        result = as_train_sh_runs_it(user_folder, *SMALL, "--max_train_steps=3", "--checkpointing_steps=1",
                                     "--validation_split=0.25", "--reg_data_dir=my-reg", "--resume_from_checkpoint=latest",
                                     "--learning_rate=2e-3", model="my-model", data="my-data", output_dir="my-output",
                                     monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    changed = [line for line in caplog.messages if "other flags" in line or "other settings" in line]
    assert len(changed) == 1 and "(--learning_rate 0.001 -> 0.002): training continues from step 2" in changed[0]
    assert (user_folder / "my-output" / "checkpoint-3").is_dir()


@pytest.mark.slow
def test_an_error_through_train_sh_on_two_processes_is_the_last_line_with_exit_code_2(user_folder):
    # (One process: the mistyped flag's test below.)
    code, lines = train_sh(user_folder, *SMALL, model="my-model", data="no-such-data", output_dir="out",
                           launch_args=TWO_CPU_PROCESSES)  # fmt: skip
    assert code == 2, "\n".join(lines[-20:])
    assert lines[-1].startswith("error: could not load the dataset 'no-such-data'")
    output = "\n".join(lines)
    assert "CalledProcessError" not in output and "ChildFailedError" not in output
    # No traceback buries it: not the launcher's, nor one from a process that was waiting for the failed one.
    assert "Traceback" not in output, output


def test_what_accelerate_refuses_is_one_error_line_with_exit_code_2(user_folder, monkeypatch, capsys):
    # Before the script starts (the launcher's own checks), and in the script (accelerate's setup). Through train.sh:
    code, lines = train_sh(user_folder, *SMALL, "--max_train_steps=1", model="my-model", data="my-data",
                           output_dir="out", launch_args="--config_file no-such.yaml", timeout=120)  # fmt: skip
    output = "\n".join(lines)
    assert code == 2 and lines[-1].startswith("error: The passed configuration file `no-such.yaml` does not exist.")
    assert "Traceback" not in output, output[-3000:]
    # The launcher's other refusals in this process, with what train.sh gives it (train_sh_flags checks that its
    # LAUNCH_ARGS come first).
    from sdtoolkit import launch
    from sdtoolkit.errors import LAST_LINE_FILE

    (user_folder / "bad.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: BOGUS\n")
    cases = [("--config_file bad.yaml", "error: 'BOGUS' is not a valid DistributedType")]
    # (train.sh's recipe has EMA, which FSDP can't shard: said before accelerate is set up, in the environment
    # accelerate launch gives the script; tests/test_distributed.py.)
    if importlib.util.find_spec("deepspeed") is None:
        cases.append((f"--config_file {REPO}/configs/accelerate/deepspeed_zero2_offload.yaml --num_processes=1",
                      "error: DeepSpeed is not installed"))  # fmt: skip
    monkeypatch.chdir(user_folder)
    monkeypatch.setenv(LAST_LINE_FILE, "")  # the launcher sets it for its processes: put back after
    for launch_args, says in cases:
        flags = train_sh_flags(user_folder, *SMALL, "--max_train_steps=1", model="my-model", data="my-data",
                               output_dir="out", launch_args=launch_args)  # fmt: skip
        result = run_entry_point(launch.main, *launch_args.split(), REPO / "train_text_to_image.py", *flags,
                                 capsys=capsys)  # fmt: skip
        assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(says), result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert not (user_folder / "out").exists()

    # Without EMA, the FSDP config reaches accelerate's setup, which needs a GPU per process: in the environment
    # `accelerate launch` gives the script (its own function builds it). (The launcher then shows the script's line
    # last: the two-process test above.)
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv(LAST_LINE_FILE, "")  # as the launcher left it, it names a record it has removed
    fsdp = launch_command_parser().parse_args(["--config_file", f"{REPO}/configs/accelerate/fsdp.yaml",
                                               "--num_processes=1", "--mixed_precision=no", "script.py"])  # fmt: skip
    for name, value in prepare_multi_gpu_env(_validate_launch_command(fsdp)[0]).items():
        monkeypatch.setenv(name, value)
    result = run_entry_point(train_text_to_image.main, "--pretrained_model_name_or_path=my-model",
                             "--train_data_dir=my-data", "--output_dir=out", "--resolution=32", "--max_train_steps=1",
                             capsys=capsys)  # fmt: skip
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(
        "error: accelerate could not start (FSDP runs on GPUs only): There are currently no available devices found"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_mistyped_flag_through_train_sh_is_one_error_line(user_folder):
    # A near miss is named with the flag it misses, and a kohya-ss flag with the one that does its work here. The
    # script's error line is the last line, once, with exit code 2: no launcher's traceback after it.
    code, lines = train_sh(user_folder, *SMALL, "--max_train_steps=1", "--learning-rate=1e-4", "--shuffle_caption",
                           "--keep_tokens=1", "--no-such-flag", model="my-model", data="my-data", output_dir="out",
                           timeout=60)  # fmt: skip
    assert code == 2, "\n".join(lines[-20:])
    assert lines[-1] == (
        "error: unrecognized arguments: --learning-rate=1e-4 --shuffle_caption --keep_tokens=1 --no-such-flag -- did"
        " you mean --learning_rate?; --shuffle_caption is --shuffle_tags here; --keep_tokens is --keep_tags here"
    )
    output = "\n".join(lines)
    assert "Traceback" not in output and "CalledProcessError" not in output, output
    assert sum(line.startswith("error:") for line in lines) == 1, output


def test_train_sh_runs_the_seeds_recipe(tmp_path, monkeypatch):
    # Upstream's text_to_image example as the seed runs it, on its model and data, into sd-pokemon-model. (Read as
    # on a GPU: on this CPU, the recipe's fp16 is refused.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = train_text_to_image.parse_args(train_sh_flags(tmp_path))
    assert (args.pretrained_model_name_or_path, args.dataset_name, args.output_dir) == (
        "CompVis/stable-diffusion-v1-4",
        "lambdalabs/pokemon-blip-captions",
        "sd-pokemon-model",
    )
    recipe = dict(resolution=512, center_crop=True, random_flip=True, train_batch_size=1, gradient_accumulation_steps=4,
                  gradient_checkpointing=True, mixed_precision="fp16", use_ema=True, learning_rate=1e-5,
                  max_grad_norm=1.0, lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=15000)  # fmt: skip
    assert {name: getattr(args, name) for name in recipe} == recipe
    # Flags after it win; a --config_file takes its place.
    assert train_text_to_image.parse_args(train_sh_flags(tmp_path, "--learning_rate=1e-4")).learning_rate == 1e-4
    assert train_sh_flags(tmp_path, "--config_file=run.toml") == ["--config_file=run.toml"]


def test_every_flag_named_for_another_trainers_is_a_flag_here_and_theirs_is_not(capsys):
    from accelerate.commands.launch import launch_command_parser

    with pytest.raises(SystemExit):
        train_text_to_image.parse_args(["--help"])
    # The flags --help lists, one per option line (their help texts name other trainers' flags too).
    ours = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, flags=re.MULTILINE))
    assert {"--learning_rate", "--shuffle_tags", "--lora_rank"} <= ours
    # A hint may also name `accelerate launch`'s own options.
    launch = set(launch_command_parser()._option_string_actions)
    for theirs, here in train_text_to_image.KNOWN_ELSEWHERE.items():
        assert theirs not in ours, theirs
        named = re.findall(r"--[\w-]+", here)
        assert named and all(flag in ours or flag in launch for flag in named), (theirs, here)


def start_holder(tiny_sd, output_dir):
    """A training run that holds output_dir (paused once it holds it; it would take 100,000 steps and save nothing)."""
    argv = train_args(tiny_sd, output_dir, "--max_train_steps", "100000", "--checkpointing_steps", "100000")
    code = "import sys, train_text_to_image as t\nsys.argv[1:] = %r\nt.run_main(t.main)\n" % argv
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (output_dir / ".lock.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the first run ended before the second could start"
    # Paused, it holds the folder without taking the CPU from the run that tries it (a lock outlives a pause).
    process.send_signal(signal.SIGSTOP)
    return process


def test_a_second_run_on_the_same_output_dir_fails_at_once_naming_the_first(
    user_folder, tiny_sd, caplog, monkeypatch, capsys
):
    out = user_folder / "out"
    first = start_holder(tiny_sd, out)
    try:
        started = time.time()
        result = as_train_sh_runs_it(user_folder, *SMALL, "--max_train_steps=2", model="my-model", data="my-data",
                                     output_dir="out", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
        lines = result.stderr.splitlines()
        assert result.returncode == 2, "\n".join(lines[-20:])
        assert lines[-1].startswith(f"error: --output_dir out is in use by another training run (process {first.pid} ")
        assert time.time() - started < 60
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # The killed run's lock died with it: the next run takes the folder over and says from whom.
    with caplog.at_level(logging.WARNING):
        train_text_to_image.main(train_args(tiny_sd, out, "--max_train_steps", "1"))
    assert f"took over --output_dir {out} from process {first.pid} " in caplog.text
    assert (out / "model_index.json").exists() and not (out / ".lock.json").exists()


def test_the_launcher_gives_several_processes_time_to_write_their_ctrl_c_checkpoint(monkeypatch):
    # torch's elastic agent passes a Ctrl-C on to the processes it started, then kills those still running after
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 unless set): less than SD v1-4's checkpoint can take to write.
    from torch.distributed.launcher.api import LaunchConfig

    from sdtoolkit import launch
    from sdtoolkit.errors import LAST_LINE_FILE

    seen = []
    monkeypatch.setattr(launch, "launch_command", lambda args: seen.append(LaunchConfig(1, 1, 2).shutdown_timeout))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest's own Ctrl-C stays as it is
    monkeypatch.setenv(LAST_LINE_FILE, "")  # set by the launcher for its processes; put back after
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    launch.main(["--multi_gpu", "--num_processes=2", "train_text_to_image.py"])
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")  # the user's own setting stands
    launch.main(["--multi_gpu", "--num_processes=2", "train_text_to_image.py"])
    assert seen == [600, 45]
