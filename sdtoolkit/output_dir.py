"""The --output_dir of a training run: writable, used by one run at a time, never a mix of two runs.

- `check_output_dir`: the folder exists (or is made) and files can be written in it.
- `lock_output_dir`: the main process holds a lock on the folder for the whole run, so a second run started on
  it fails at once with the holder's process id. The lock is `fcntl.flock` on `.lock` (through the filelock
  package): the kernel drops it when its process ends, however it ends, so a lock left by a killed run is
  never in the way. `.lock.json` says who holds it; a run removes it when it ends (also on an error or a
  signal), so finding one from another process means that run was killed, which the log says when the new
  run takes the folder over.
- `check_fresh_run`: a new run (not a resume) refuses a folder that holds an earlier run's checkpoints or
  model, unless told to overwrite it (`clear_earlier_run` then deletes what the script wrote, nothing else).
- `run_identity` / `identity_changes`: what a run is (seed, batch size, model, data, optimizer), stored in every
  checkpoint's training_state.json, so that a resume that changes one of them says what changed.
- `training_flags` / `flag_changes`: the rest of the flags that decide what a run trains (learning rate, loss,
  resolution, augmentations, ...), stored beside it, so that a resume that changes one of them says so too.
"""

import atexit
import json
import os
import shutil
import socket
import tempfile
import time

from filelock import FileLock, Timeout

from sdtoolkit.checkpoints import checkpoint_dirs
from sdtoolkit.errors import UserError, first_line
from sdtoolkit.export import ldm_config_path, single_file_name, written_ldm_config
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME, has_lora_weights

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.json"

# Locks this process holds, by lock file. A run inside a Python process (a test, a notebook) that ended with an
# exception leaves its lock here; the next run in the same process takes it back.
_held = {}


def check_output_dir(output_dir, flag="--output_dir"):
    """Create output_dir if needed and make sure files can be written in it."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {flag} {output_dir}: {first_line(err)}") from err


def read_holder(output_dir):
    """The {pid, host, started} record of the run holding output_dir's lock (or that held it last), or None."""
    try:
        with open(os.path.join(output_dir, HOLDER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe_holder(holder):
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on {holder.get('host')}, started {started}"


def lock_output_dir(output_dir):
    """Hold output_dir for this run, or raise UserError naming the run that holds it.

    Returns a note for the log when the lock was taken over from a run that was killed, else None.
    """
    path = os.path.abspath(os.path.join(output_dir, LOCK_FILE))
    leftover = _held.pop(path, None)
    if leftover is not None:
        leftover.release()
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"--output_dir {output_dir} is in use by another training run ({describe_holder(read_holder(output_dir))});"
            " wait for it to finish, stop it, or choose another --output_dir"
        ) from None

    note = None
    previous = read_holder(output_dir)
    if previous and previous.get("pid") != os.getpid():
        note = (
            f"took over --output_dir {output_dir} from {describe_holder(previous)}, which ended without releasing it"
            " (killed or crashed); its lock died with it"
        )
    with open(os.path.join(output_dir, HOLDER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    _held[path] = lock
    # A run that stops with an error or a signal still exits normally: it lets go of the folder then too.
    atexit.register(unlock_output_dir, output_dir)
    return note


def unlock_output_dir(output_dir):
    """Release the lock taken by lock_output_dir (at the normal end of a run; a dying process drops it anyway)."""
    path = os.path.abspath(os.path.join(output_dir, LOCK_FILE))
    lock = _held.pop(path, None)
    if lock is None:
        return
    try:
        os.remove(os.path.join(output_dir, HOLDER_FILE))
    except FileNotFoundError:
        pass
    lock.release()


def earlier_run(output_dir):
    """What an earlier run left in output_dir that a new run would mix with: checkpoints and a saved model."""
    found = checkpoint_dirs(output_dir)
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        found.append("a saved pipeline (model_index.json)")
    if has_lora_weights(output_dir):
        found.append(f"a saved LoRA ({WEIGHTS_NAME})")
    return found


def check_fresh_run(output_dir, *, overwrite, logging_dir):
    """A new run into output_dir: refuse an earlier run's outputs unless overwrite, then delete them.

    Returns the names deleted (none when the folder held no earlier run)."""
    found = earlier_run(output_dir)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise UserError(
            f"--output_dir {output_dir} holds an earlier run ({shown}); continue it with --resume_from_checkpoint"
            " latest, choose another --output_dir, or pass --overwrite_output_dir to delete it and start anew"
        )
    return clear_earlier_run(output_dir, logging_dir=logging_dir)


def clear_earlier_run(output_dir, *, logging_dir):
    """Delete what the training script writes in output_dir (and nothing else); returns the names deleted."""
    names = checkpoint_dirs(output_dir)
    names += [n for n in os.listdir(output_dir) if n.startswith(".") and n.endswith(".partial")]
    index = os.path.join(output_dir, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            components = [k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list)]
        names += components + ["model_index.json"]
    names += ["validation", "val_imgs_grid.png", "README.md", logging_dir, single_file_name(output_dir),
              WEIGHTS_NAME, KOHYA_WEIGHTS_NAME]  # fmt: skip
    ldm_config = ldm_config_path(single_file_name(output_dir))  # a v-prediction export's, when the export wrote it
    if written_ldm_config(os.path.join(output_dir, ldm_config)):
        names.append(ldm_config)
    deleted = []
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        deleted.append(name)
    return deleted


def local_path_or_name(name):
    """A model or dataset name as stored: the absolute path for a local folder or file, else the hub id."""
    return os.path.abspath(name) if name and os.path.exists(name) else name


def training_data(args):
    """What names a run's training data: --dataset_name, --in_json, --train_data_dir or --dataset_config, the
    first given."""
    return args.dataset_name or args.in_json or args.train_data_dir or args.dataset_config


def run_identity(args, total_batch_size, data_fingerprint, num_rows, noise_scheduler):
    """What makes a run this run, for training_state.json."""
    return {
        "seed": args.seed,
        "total_batch_size": total_batch_size,
        "model": local_path_or_name(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "model_config": local_path_or_name(args.model_config),
        "data": local_path_or_name(training_data(args)),
        # How its outputs are to be sampled (see sdtoolkit/inference.py's sample_as_trained).
        "vae": local_path_or_name(args.pretrained_vae_model_name_or_path),
        "prediction_type": noise_scheduler.config.prediction_type,
        "zero_terminal_snr": bool(noise_scheduler.config.get("rescale_betas_zero_snr")),
        "data_rows": num_rows,
        "data_fingerprint": data_fingerprint,
        "lora_rank": args.lora_rank,
        "init_lora": local_path_or_name(args.init_lora),
        "optimizer": optimizer_flags(args),
        "clip_skip": args.clip_skip,  # how the model is to be prompted: metrics.py and gradio_app.py read it
        "weighted_captions": args.weighted_captions,  # how its captions were read: metrics.py's caption accuracy
    }


def optimizer_flags(args):
    """The flags that pick a run's optimizer, as a checkpoint's optimizer state needs them again on resume."""
    return f"--optimizer {args.optimizer}" + " --use_8bit_adam" * args.use_8bit_adam


def identity_changes(saved, current):
    """['seed 0 -> 1', ...] for what differs between a checkpoint's run identity and this run's."""
    changes = []
    for key in ("seed", "total_batch_size", "model", "revision", "data"):
        if key in saved and saved[key] != current[key]:
            changes.append(f"{key.replace('_', ' ')} {saved[key]} -> {current[key]}")
    if "data_fingerprint" in saved and saved["data_fingerprint"] != current["data_fingerprint"]:
        changes.append(
            f"data content {saved.get('data_rows')} rows ({saved['data_fingerprint'][:12]}) ->"
            f" {current['data_rows']} rows ({current['data_fingerprint'][:12]})"
        )
    return changes


# Flags that say where a run writes, how often it reports or saves, or how fast it goes, and not what it trains:
# a resume may change them without a word. The seed, model and data are in the run's identity (identity_changes
# names them), the optimizer's flags must match (optimizer_flags), and --hub_token is a secret, never written.
NOT_TRAINING_FLAGS = {
    "seed", "pretrained_model_name_or_path", "revision", "dataset_name", "train_data_dir", "dataset_config",
    "in_json", "optimizer", "use_8bit_adam", "hub_token", "config_file", "output_config",
    "output_dir", "overwrite_output_dir", "logging_dir", "report_to", "tracker_project_name", "local_rank",
    "checkpointing_steps", "save_every_n_epochs", "checkpoints_total_limit", "resume_from_checkpoint",
    "save_state_on_train_end",
    "export_single_file",
    "push_to_hub", "hub_model_id", "validation_prompts", "sample_prompts", "validation_settings", "validation_epochs",
    "validation_steps", "sample_at_first",
    "cache_dir", "latent_cache_dir", "dataloader_num_workers",
    # Speed and memory: the same training, done another way (tests/test_speed.py checks the cache gives the same
    # losses). A resume on another GPU may well need other ones.
    "cache_latents", "vae_batch_size", "fused_adam", "inplace_ema", "foreach_ema", "offload_ema", "channels_last",
    "enable_xformers_memory_efficient_attention", "allow_tf32", "gradient_checkpointing",
    # The run's length is --max_train_steps (--num_train_epochs decides it or is worked out from it), and going on
    # past the first run's end is what a resume is often for; see flag_changes.
    "num_train_epochs",
}  # fmt: skip
# Compared as absolute paths, wherever the run starts.
PATH_FLAGS = ("model_config", "init_lora", "reg_data_dir", "pretrained_vae_model_name_or_path")
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def training_flags(args):
    """{flag: value} for the flags that decide what this run trains, for training_state.json."""
    flags = {key: value for key, value in vars(args).items() if key not in NOT_TRAINING_FLAGS}
    for key in PATH_FLAGS:
        flags[key] = local_path_or_name(flags[key])
    return flags


def flag_changes(saved, current):
    """['--learning_rate 1e-05 -> 2e-05', ...] for the training flags that differ between a checkpoint's run
    (saved: its training_flags, {} for a checkpoint from before they were kept) and this one.

    A longer or shorter --max_train_steps is only a change of what is trained when the learning rate schedule
    depends on it (cosine, linear, polynomial: the rates from the resumed step on follow the new length)."""
    changes = []
    for key, value in current.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "max_train_steps" and current["lr_scheduler"] in CONSTANT_SCHEDULES:
            continue
        changes.append(f"--{key} {saved[key]} -> {value}")
    return changes
