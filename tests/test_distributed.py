"""Two processes through `accelerate launch` (DDP over gloo on the CPU) against one process. They are also the
tests of a plain `accelerate launch train_text_to_image.py`; one process through train.sh's launcher is
tests/test_user_path.py's.

One two-process run is shared by the tests: 2 processes x batch 2 against 1 process x batch 4, with EMA,
gradient checkpointing, a warmup schedule, a held-out loss and the whole text encoder trained for the first 2
steps. Its second process runs under a recorder of every file it writes, to show that only the main process writes.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

import train_text_to_image
from tests.conftest import (
    DEMO_DATA,
    REPO,
    logged_losses,
    mixed_aspect_folder,
    relative_difference_of_updates,
    reset_accelerate_state,
    step_marker,
    unet_weights,
    wait_for_step,
)

# Several processes each: slow (make test and CI run them; plain `pytest` skips them).
pytestmark = pytest.mark.slow

FLAGS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--use_ema",
         "--gradient_checkpointing", "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--random_flip",
         "--resolution", "32", "--seed", "0", "--mixed_precision", "no", "--train_data_dir", str(DEMO_DATA),
         "--validation_split", "0.25"]  # fmt: skip
# The shared runs train the whole text encoder too, for their first 2 steps only (--stop_text_encoder_training):
# DDP, built over its weights, must go on without their gradients (a reducer still waiting for them would fail at
# step 3).
SHARED = [*FLAGS, "--train_text_encoder", "--stop_text_encoder_training", "2"]

# Run in every process before the script: on processes other than the main one, note every file written.
RECORDER = """
import builtins, os, sys
import PIL.Image, safetensors.torch, torch
import diffusers
sys.path.insert(0, {repo!r})

if os.environ.get("RANK", "0") != "0":
    log_path = {log!r} + ".rank" + os.environ["RANK"]
    real_open = builtins.open

    def note(kind, path):
        with real_open(log_path, "a") as f:
            f.write(f"{{kind}} {{path}}\\n")

    def wrap(owner, name, kind, path_of):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            note(kind, path_of(*args, **kwargs))
            return real(*args, **kwargs)
        setattr(owner, name, wrapped)

    def open_for_writing(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            note("open", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_for_writing
    wrap(torch, "save", "torch.save", lambda obj, f, *a, **k: f)
    wrap(safetensors.torch, "save_file", "save_file", lambda tensors, filename, *a, **k: filename)
    wrap(PIL.Image.Image, "save", "image", lambda self, fp, *a, **k: fp)
    wrap(diffusers.ModelMixin, "save_pretrained", "save_pretrained", lambda self, d, *a, **k: d)
    wrap(diffusers.DiffusionPipeline, "save_pretrained", "save_pretrained", lambda self, d, *a, **k: d)
    wrap(os, "replace", "replace", lambda src, dst, *a, **k: dst)

import train_text_to_image
train_text_to_image.run_main(train_text_to_image.main)
"""


def launch(tiny_sd, output_dir, *extra, num_processes=2, script=None):
    """accelerate launch with `num_processes` CPU processes (DDP over gloo)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(script or REPO / "train_text_to_image.py"),
        "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "recorded_train.py"
    script.write_text(RECORDER.format(repo=str(REPO), log=str(folder / "writes")))
    result = launch(tiny_sd, folder / "out", *SHARED, "--train_batch_size", "2", script=script)
    return folder, result


@pytest.fixture(scope="module")
def one_process_run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(out), *SHARED,
                              "--train_batch_size", "4"])  # fmt: skip
    reset_accelerate_state()
    return out


def max_difference(a, b):
    a, b = unet_weights(a), unet_weights(b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_sd, two_process_run, one_process_run, tmp_path):
    folder, result = two_process_run
    ddp = folder / "out"
    assert "Num processes: 2" in result.stderr and "MULTI_CPU" in result.stderr
    # Same samples, augmentations and noise in each step; only the order of float sums differs (gradients are
    # averaged over two processes instead of over one batch). The first losses agree to float precision.
    (step, loss_ddp), (_, loss_one) = logged_losses(ddp)[0], logged_losses(one_process_run)[0]
    assert step == 1 and loss_ddp == pytest.approx(loss_one, rel=1e-5)
    # Adam turns gradients near zero into +-lr steps, so float noise moves a few weights by up to lr: compare
    # the updates as a whole. They agree to 1%, while the same one-process run with another seed is far off.
    base = Path(tiny_sd) / "unet"
    for sub in ("checkpoint-2/unet", "checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"):
        assert relative_difference_of_updates(base, ddp / sub, one_process_run / sub) < 0.01, sub
    # The processes share the held-out measurement, batch by batch (the main one logs it): the same as one
    # process's.
    assert "--validation_split: the 2 processes share each measurement of the 8 held-out images" in result.stderr
    held_out_ddp, held_out_one = (
        logged_losses(ddp, "validation_loss"),
        logged_losses(one_process_run, "validation_loss"),
    )
    assert [step for step, _ in held_out_ddp] == [step for step, _ in held_out_one] == [0, 2, 4]
    assert held_out_ddp[0][1] == pytest.approx(held_out_one[0][1], rel=1e-6)  # the base model: same weights
    assert [v for _, v in held_out_ddp] == pytest.approx([v for _, v in held_out_one], rel=1e-3)
    # The text encoder, trained in both models' DDP for 2 steps: saved with its average in each checkpoint by the main
    # process, moved as in one process, and left as it was from step 2 on.
    stopped, last = (
        load_file(str(ddp / sub / "text_encoder" / "model.safetensors")) for sub in ("checkpoint-2", "checkpoint-4")
    )
    assert all(torch.equal(stopped[key], last[key]) for key in stopped)
    for sub in ("checkpoint-4/text_encoder", "checkpoint-4/text_encoder_ema", "text_encoder"):
        apart = relative_difference_of_updates(
            Path(tiny_sd) / "text_encoder", one_process_run / sub, ddp / sub, weights="model.safetensors"
        )
        assert apart < 0.01, sub  # (not moved at all, it would be nan)
    other_seed = tmp_path / "seed-1"
    train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(other_seed),
                              *SHARED, "--train_batch_size", "4", "--seed", "1"])  # fmt: skip
    assert relative_difference_of_updates(base, other_seed / "unet", one_process_run / "unet") > 0.5


def test_warmup_and_total_steps_count_optimizer_steps_whatever_the_processes(two_process_run, one_process_run):
    ddp = two_process_run[0] / "out"
    steps = [step for step, _ in logged_losses(ddp)]
    assert steps == [1, 2, 3, 4]  # not 8: the 4 steps are optimizer steps of the whole group

    def lrs(out):
        return [round(value, 10) for _, value in logged_losses(out, tag="lr")]

    # Warmup over 2 steps to 1e-3, then linear decay to 0 at step 4: the same per step as one process.
    assert lrs(ddp) == lrs(one_process_run) == [0.0005, 0.001, 0.0005, 0.0]


def test_only_the_main_process_writes(two_process_run):
    folder, _ = two_process_run
    out = folder / "out"
    # The main process wrote everything a run leaves behind ...
    for path in ("model_index.json", "unet", "README.md", "checkpoint-2/unet", "checkpoint-4/unet_ema",
                 "checkpoint-4/optimizer.bin", "logs"):  # fmt: skip
        assert (out / path).exists(), path
    # ... and the second process wrote its own random state into each checkpoint, nothing else.
    log = folder / "writes.rank1"
    written = log.read_text().splitlines() if log.exists() else []
    assert written, "the recorder saw no write at all on process 1; it is not working"
    others = [line for line in written if not line.endswith("random_states_1.pkl")]
    assert others == [], others
    assert (out / "checkpoint-4" / "random_states_1.pkl").exists()


def test_every_process_resumes_from_the_same_checkpoint(tiny_sd, two_process_run, tmp_path):
    whole = two_process_run[0] / "out"
    resumed = tmp_path / "out"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(tiny_sd, resumed, *SHARED, "--train_batch_size", "2", "--resume_from_checkpoint", "latest")
    for rank in (0, 1):
        assert f"[RANK {rank}] Resuming from checkpoint checkpoint-2" in result.stderr
    assert max_difference(whole / "unet", resumed / "unet") == 0.0
    assert max_difference(whole / "checkpoint-4" / "unet", resumed / "checkpoint-4" / "unet") == 0.0
    text_encoders = [load_file(str(out / "text_encoder" / "model.safetensors")) for out in (whole, resumed)]
    assert all(torch.equal(text_encoders[0][key], text_encoders[1][key]) for key in text_encoders[0])
    # The held-out losses measured before the checkpoint come with it, and those after it are the same.
    states = [json.loads((out / "checkpoint-4" / "training_state.json").read_text()) for out in (whole, resumed)]
    for key in ("validation_losses", "validation_first_per_image"):
        assert states[0][key] == states[1][key], key
    assert [step for step, _ in states[1]["validation_losses"]] == [0, 2, 4]


# The configs in configs/accelerate/ ---------------------------------------------------------------------------

CONFIGS = REPO / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, distributed_type, num_processes",
    [
        ("single_gpu_fp16.yaml", "NO", 1),
        ("multi_gpu_ddp.yaml", "MULTI_GPU", 2),
        ("deepspeed_zero2_offload.yaml", "DEEPSPEED", 2),
        ("fsdp.yaml", "FSDP", 2),
        ("multi_node.yaml", "MULTI_GPU", 16),
    ],
)
def test_each_config_loads_with_accelerates_own_loader(name, distributed_type, num_processes):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.name == distributed_type
    assert config.num_processes == num_processes
    raw = yaml.safe_load((CONFIGS / name).read_text())
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["offload_optimizer_device"] == "cpu"
        # Must match train.sh, or accelerate refuses to start.
        assert config.deepspeed_config["gradient_accumulation_steps"] == 4
    if distributed_type == "FSDP":
        assert raw["fsdp_config"]["fsdp_sharding_strategy"] in ("FULL_SHARD", 1)
    if name == "multi_node.yaml":
        assert config.num_machines == 2 and "main_process_ip" in raw and "machine_rank" in raw


def test_fsdp_with_ema_or_a_trained_text_encoder_is_refused_with_a_reason(monkeypatch, tmp_path):
    # In the environment `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives the script (its own
    # function builds it), as train.sh's recipe with EMA would run.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    launch = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes=1",
                                                 "--mixed_precision=no", "train_text_to_image.py"])  # fmt: skip
    for name, value in prepare_multi_gpu_env(_validate_launch_command(launch)[0]).items():
        monkeypatch.setenv(name, value)
    run = ["--pretrained_model_name_or_path", "/nonexistent", "--train_data_dir", str(DEMO_DATA), "--output_dir",
           str(tmp_path)]  # fmt: skip
    with pytest.raises(train_text_to_image.UserError, match="--use_ema is not supported with FSDP"):
        train_text_to_image.main([*run, "--use_ema"])
    with pytest.raises(
        train_text_to_image.UserError, match="--train_text_encoder is not supported with DeepSpeed or FSDP"
    ):
        train_text_to_image.main([*run, "--train_text_encoder"])


@pytest.mark.gpu
def test_two_gpu_ddp_fp16_config_trains(tiny_sd, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    # The config's fp16, not FLAGS' --mixed_precision no.
    flags = [flag for i, flag in enumerate(FLAGS) if "--mixed_precision" not in FLAGS[max(i - 1, 0) : i + 1]]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_gpu_ddp.yaml"),
               "--num_processes", "2", str(REPO / "train_text_to_image.py"), "--pretrained_model_name_or_path",
               str(tiny_sd), "--output_dir", str(tmp_path), *flags]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr and "Mixed precision type: fp16" in result.stderr
    assert [step for step, _ in logged_losses(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "model_index.json").exists()


def test_a_two_process_checkpoint_resumes_on_one_process(tiny_sd, one_process_run, two_process_run, tmp_path, caplog):
    # Same total batch (2 x 2 and 1 x 4), so the data position carries over and the runs stay together; the learning
    # rate schedule, which counts steps per process, is recounted for one. (In this process: a launch costs a CI
    # machine 20 s or more. The other way round, one process to two, runs the same resume code; only accelerate
    # leaves the second process's random state as seeded, its checkpoint having none.)
    resumed = tmp_path / "out"
    shutil.copytree(two_process_run[0] / "out" / "checkpoint-2", resumed / "checkpoint-2")
    with caplog.at_level(logging.WARNING):
        train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(resumed),
                                  *SHARED, "--train_batch_size", "4", "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert "not on the same data order" not in caplog.text
    lrs = [round(value, 10) for _, value in logged_losses(resumed, tag="lr")]
    assert lrs == [0.0005, 0.0]  # steps 3 and 4 of the one-process run's schedule
    base = Path(tiny_sd) / "unet"
    assert relative_difference_of_updates(base, one_process_run / "unet", resumed / "unet") < 0.01


def test_two_processes_train_on_buckets_and_a_disk_cache_and_a_sigterm_to_one_stops_both(tiny_sd, tmp_path):
    # Every batch stacks one bucket's images; a batch mixing two shapes could not be stacked. Each process gets
    # whole batches from accelerate's batch-sampler sharding. The latent cache, one array per bucket, is written
    # to disk by the main process and read by the other. Run under nohup (a hangup ignored), through the toolkit's
    # launcher: a hangup to the launcher, as a closed ssh session's shell sends it, and to the first process stops
    # nothing. Then SIGTERM to the second process: both stop at the same step, with a checkpoint that holds both
    # processes' random states.
    import signal

    import psutil

    # The script, behind a marker of each logged step, so the test waits for training rather than sleeping.
    step_file = tmp_path / "steps.txt"
    script = tmp_path / "marked_train_text_to_image.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + step_marker(step_file)
        + "import train_text_to_image\ntrain_text_to_image.run_main(train_text_to_image.main)\n"
    )  # fmt: skip
    data = mixed_aspect_folder(tmp_path / "data")
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [
        sys.executable, "-m", "sdtoolkit.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(script), "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(out),
        "--train_data_dir", str(data), "--resolution", "64", "--aspect_buckets", "--bucket_step", "16",
        "--min_bucket_side", "32", "--max_bucket_side", "128", "--center_crop", "--latent_cache_dir", str(cache),
        "--train_batch_size", "2", "--seed", "0", "--max_train_steps", "100000", "--checkpointing_steps", "100000",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # fmt: skip
    wait_for_step(step_file, 3, launcher)  # training steps are being taken
    workers = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "train_text_to_image" in " ".join(p.cmdline())
    ]
    rank0, rank1 = ([p for p in workers if p.environ().get("RANK") == rank] for rank in ("0", "1"))
    assert len(rank0) == len(rank1) == 1, [p.cmdline() for p in workers]
    os.killpg(launcher.pid, signal.SIGHUP)
    rank0[0].send_signal(signal.SIGHUP)
    wait_for_step(step_file, len(step_file.read_text().split()) + 3, launcher)  # still training
    rank1[0].send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)

    assert "[RANK 0] Cached latents and text embeddings" in stderr
    assert "[RANK 1] Read latents and text embeddings" in stderr
    [key] = list(cache.iterdir())
    assert len(list(key.glob("latent-mean-*.npy"))) > 1  # one per bucket
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: SIGTERM at step ")]
    assert len(stopped) == 3, stderr[-3000:]  # both processes, each with its line, and the launcher's last
    assert all("--resume_from_checkpoint latest" in line for line in stopped)
    assert launcher.returncode == 128 + signal.SIGTERM and not (out / ".lock.json").exists()  # the folder released
    # The launcher's last line is the first process's, with its exit code, and no traceback buries it (the same
    # way out as an `error:` line's, exit code 2: tests/test_user_path.py, on one process).
    assert stderr.strip().splitlines()[-1] == stopped[0] and "Traceback" not in stderr, stderr[-3000:]
    steps = {int(line.split(" at step ")[1].split()[0]) for line in stopped}
    assert len(steps) == 1
    (step,) = steps
    assert [logged for logged, _ in logged_losses(out)] == list(range(1, step + 1))
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert not (out / "model_index.json").exists()


def test_two_processes_train_a_dora_on_the_unet_and_the_text_encoder_over_a_float8_base(tiny_sd, tmp_path):
    # DDP over the adapters' parameters only, the text encoder's too; the main process saves the adapters and
    # their EMA. Both adapters move as in one process with the same global batch (a text encoder left out of DDP
    # would move by each process's half of the batch). With --fp8_base, DDP starts with the base weights still
    # in their own precision: it cannot send float8 ones from the main process to the other. A DoRA is a LoRA's
    # two matrices and a magnitude per output, all trained: one run for both kinds (each costs a CI machine ~25 s).
    out, one = tmp_path / "out", tmp_path / "one"
    dora = ["--lora_rank", "4", "--use_dora", "--train_text_encoder", "--fp8_base"]
    launch(tiny_sd, out, *FLAGS, "--train_batch_size", "2", *dora)
    assert [step for step, _ in logged_losses(out)] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "lora_ema.safetensors").exists()
    train_text_to_image.main(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(one), *FLAGS,
                              "--train_batch_size", "4", *dora])  # fmt: skip

    def weights(run, folder):
        return load_file(run / folder / "pytorch_lora_weights.safetensors")

    for folder in ("checkpoint-4", "."):  # the last weights, then their EMA
        ddp, single = weights(out, folder), weights(one, folder)
        assert ddp.keys() == single.keys()
        for model in ("unet.", "text_encoder."):
            # The B matrices start at zero: what they hold is what training moved.
            up = [key for key in single if key.startswith(model) and ".lora_B." in key]
            assert up
            moved = torch.cat([single[key].flatten() for key in up])
            apart = torch.cat([(ddp[key] - single[key]).flatten() for key in up])
            assert (apart.norm() / moved.norm()).item() < 0.01, (folder, model)
    # The magnitudes start at the base weights' norms: what moved them from step 2 to step 4 is the same too.
    magnitudes = [key for key in weights(one, ".") if "lora_magnitude_vector" in key]
    assert any(key.startswith("unet.") for key in magnitudes) and any(
        key.startswith("text_encoder.") for key in magnitudes
    )
    moves = []
    for run in (out, one):
        then, now = weights(run, "checkpoint-2"), weights(run, "checkpoint-4")
        moves.append(torch.cat([(now[key] - then[key]).flatten() for key in magnitudes]))
    assert moves[1].norm() > 0 and ((moves[0] - moves[1]).norm() / moves[1].norm()).item() < 0.01
