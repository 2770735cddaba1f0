"""Checkpoints and the final pipeline, written so that a crash never leaves a half-written one behind.

A checkpoint is written to `.checkpoint-N.partial` beside its final name and renamed to `checkpoint-N` only
when every process has finished writing it; `latest` and `--checkpoints_total_limit` only ever see complete
checkpoints, and old ones are deleted only after the new one is in place. The final pipeline is written to
a scratch folder and moved into `--output_dir` with `model_index.json` last, so a crash mid-save leaves a
folder that `from_pretrained` refuses, never a mix of old and new weights that loads.

Also here: finding the checkpoint --resume_from_checkpoint names, recounting its LR schedule, and naming the
last good checkpoint when the loss goes NaN.

A save that fails (a full disk, most often) removes its scratch folder and raises a UserError that says
what is still intact and how to go on.
"""

import json
import os
import shutil

from safetensors import SafetensorError

from sdtoolkit.errors import UserError, first_line
from sdtoolkit.lora import has_lora_weights

# What torch.save, safetensors and plain file writes raise when a write fails.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save_failed(what, folder, err, intact):
    """The UserError for a save that failed: the library's reason, the free space, what is intact."""
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return UserError(
        f"could not write {what} in {folder}: {first_line(err)}{free} -- {intact}: free some space (or fix the"
        " folder), then run the same command with --resume_from_checkpoint latest"
    )


TRAINING_STATE = "training_state.json"


def checkpoint_dirs(output_dir):
    """The complete checkpoint-N folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return sorted(names, key=lambda d: int(d.split("-", 1)[1]))


def checkpoint_step(path):
    """The step N of a checkpoint-N folder (a name or a path)."""
    return int(os.path.basename(os.path.normpath(path)).split("-", 1)[1])


def find_resume_checkpoint(value, output_dir):
    """The checkpoint folder `--resume_from_checkpoint value` asks for, or None to start fresh.

    'latest' is the newest checkpoint in --output_dir, a bare name (checkpoint-N) one in --output_dir, and
    anything with a folder in it is a path, loaded from where it points.
    """
    if not value:
        return None
    if value == "latest":
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            print(f"No checkpoint found in {output_dir}. Starting a new training run.")
            return None
        return os.path.join(output_dir, dirs[-1])
    path = value.rstrip("/" + os.sep) or value
    if os.path.dirname(path):
        name = os.path.basename(path)
        if not os.path.isdir(path):
            raise UserError(f"--resume_from_checkpoint {value}: no such folder")
        if not (name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit()):
            raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint-N folder written by this script")
    else:
        # A named checkpoint that does not exist is an error, not a silent fresh start.
        path = os.path.join(output_dir, value)
        if value not in checkpoint_dirs(output_dir):
            available = ", ".join(checkpoint_dirs(output_dir)) or "none"
            raise UserError(
                f"--resume_from_checkpoint {value}: no such checkpoint in {output_dir}"
                f" (available: {available}); use 'latest' to resume from the newest one, or give its path"
            )
    # A --lora_rank run's checkpoint holds the adapter instead of unet/.
    if not os.path.isfile(os.path.join(path, "unet", "config.json")) and not has_lora_weights(path):
        raise UserError(f"--resume_from_checkpoint {value}: the folder has no unet/ (not a complete checkpoint)")
    return path


def recount_lr_schedule(schedule, optimizer, process_steps):
    """Set a resumed LR schedule to `process_steps` and the optimizer's learning rates to match.

    accelerate steps the LR scheduler on every process, so it counts process-steps (steps x processes), and a
    checkpoint holds the count of the run that wrote it. A run with another number of processes recounts it.
    All of diffusers' schedules are LambdaLRs, whose learning rate is a function of that count.
    """
    schedule.last_epoch = process_steps
    lrs = [base * factor(process_steps) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    schedule._last_lr = lrs


def nonfinite_loss_message(loss, step, output_dir):
    """What to say when the loss of `step` is NaN or Inf: the weights after step - 1 produced it."""
    steps = [checkpoint_step(name) for name in checkpoint_dirs(output_dir)]
    good = [s for s in steps if s <= step - 2]
    message = f"the loss became {loss} at step {step}; no pipeline was saved from these weights. "
    if good:
        message += (
            f"The last good checkpoint is {os.path.join(output_dir, f'checkpoint-{max(good)}')}: resume from it"
            " with a lower --learning_rate (or --max_grad_norm, or --mixed_precision bf16/no)"
        )
    else:
        message += "No checkpoint was saved before the weights went bad; start again with a lower --learning_rate"
    if step - 1 in steps:
        message += f" (checkpoint-{step - 1} holds the weights that gave this loss)"
    return message


def remove_partial_saves(output_dir):
    """Delete the scratch folders a crashed save left behind."""
    for name in os.listdir(output_dir):
        if name.startswith(".") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def replace_folder(source, destination):
    """Move source to destination; an existing destination is set aside first and deleted after."""
    old = None
    if os.path.exists(destination):
        old = destination + ".old.partial"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
    os.replace(source, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, output_dir, global_step, training_state, total_limit=None):
    """Save accelerate's state as output_dir/checkpoint-<global_step>, atomically. Call on every process."""
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(output_dir, f".checkpoint-{global_step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()

    # Every process writes its own random state; the main process writes the models, optimizer and scheduler.
    try:
        accelerator.save_state(partial)
        if accelerator.is_main_process:
            with open(os.path.join(partial, TRAINING_STATE), "w") as f:
                json.dump(training_state, f, indent=2)
    except WRITE_ERRORS as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise save_failed(f"checkpoint-{global_step}", output_dir, err, "the earlier checkpoints are intact") from err
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        replace_folder(partial, final)
        if total_limit is not None:
            for name in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, name))
    accelerator.wait_for_everyone()
    return final


def read_training_state(checkpoint):
    """The training_state.json of a checkpoint, or {} for checkpoints written by the upstream script."""
    path = os.path.join(checkpoint, TRAINING_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_pipeline(pipeline, output_dir):
    """pipeline.save_pretrained(output_dir) such that output_dir never holds a loadable mix of two saves."""
    scratch = os.path.join(output_dir, ".pipeline.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        pipeline.save_pretrained(scratch, safe_serialization=True)
    except WRITE_ERRORS as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise save_failed("the fine-tuned pipeline", output_dir, err, "the checkpoints are intact") from err

    # Without model_index.json the folder is not a pipeline: remove it first, put the new one back last.
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):
        os.remove(index)
    for name in sorted(os.listdir(scratch)):
        if name == "model_index.json":
            continue
        source, destination = os.path.join(scratch, name), os.path.join(output_dir, name)
        if os.path.isdir(source):
            replace_folder(source, destination)
        else:
            os.replace(source, destination)
    os.replace(os.path.join(scratch, "model_index.json"), index)
    shutil.rmtree(scratch, ignore_errors=True)
