"""Checkpoints and the final pipeline, written so that a crash never leaves a half-written one behind.

A checkpoint is written to `.checkpoint-N.partial` beside its final name and renamed to `checkpoint-N` only
when every process has finished writing it; `latest` and `--checkpoints_total_limit` only ever see complete
checkpoints, and old ones are deleted only after the new one is in place. The final pipeline is written to
a scratch folder and moved into `--output_dir` with `model_index.json` last, so a crash mid-save leaves a
folder that `from_pretrained` refuses, never a mix of old and new weights that loads.

A save that fails (a full disk, most often) removes its scratch folder and raises a UserError that says
what is still intact and how to go on.
"""

import json
import os
import shutil

from safetensors import SafetensorError

from sdtoolkit.errors import UserError, first_line

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
