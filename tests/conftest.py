"""Shared test fixtures: offline, seeded, tiny.

The tiny Stable Diffusion pipeline and the tiny CLIP model are built once per test session from config
(random weights, the real SD v1-4 tokenizer) into a temporary folder.
"""

import gc
import getpass
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face library is imported
# Under pytest-xdist, one torch thread per worker and per process it starts, as make test asks, unless told otherwise:
# with torch's default of one per core, two workers and their forked children wait on each other's OpenMP threads
# (gpu_check.py's dry run beside the benchmark took 3 min where it takes 30 s).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The caches a run writes (datasets' Arrow files, the default latent cache folder, Gradio's served files) go
# to one scratch folder per test session instead of the user's home and /tmp, and are removed at the end.
# Subprocesses inherit these variables, and take their temp folder there too (torch's elastic agent and
# inductor leave folders in it); this process keeps the temp folder it already has, for pytest's tmp_path.
SCRATCH = tempfile.mkdtemp(prefix="sdtoolkit-tests-")
os.environ["HF_HOME"] = os.path.join(SCRATCH, "huggingface")
os.environ["XDG_CACHE_HOME"] = os.path.join(SCRATCH, "cache")
os.environ["GRADIO_TEMP_DIR"] = os.path.join(SCRATCH, "gradio")
os.environ["TMPDIR"] = os.path.join(SCRATCH, "tmp")
os.makedirs(os.environ["TMPDIR"])
# Except inductor's compile cache, which stays where torch keeps it by default and serves the next run too, for
# what compiles (torchao's 8-bit AdamW, where torchao is installed).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdtoolkit.extract_lora import UNET_BLOCKS, target_layers  # noqa: E402
from sdtoolkit.fixtures import build_sd_pipeline, build_tiny_clip, build_tiny_open_clip  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "creatures"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SCRATCH, ignore_errors=True)


def pytest_collection_finish(session):
    # Every test module is imported by now, with torch, diffusers, transformers, gradio and the rest: hundreds of
    # thousands of objects that live as long as the process. Freezing them keeps them out of every later garbage
    # collection, which training runs when it frees the encoders (a third of a short in-process run's time,
    # otherwise). What tests create is collected as usual.
    gc.freeze()


# The test files that take longest, longest first (their seconds on 2026-11-28, from --durations=0), so that make
# test's two workers end together: xdist's own order, the files with the most tests first, left the benchmark and
# the learning tests (one or two tests of 30 to 45 s) for the end, with one worker waiting for the other. The other
# files follow in their usual order; make test passes --no-loadscope-reorder so that xdist keeps this one.
LONGEST_FIRST = ["test_distributed.py", "test_lora.py", "test_user_path.py", "test_resilience.py", "test_loading.py",
                 "test_images_api.py", "test_train.py", "test_gpu_check.py", "test_lycoris_training.py",
                 "test_learning.py", "test_gradio_app.py", "test_export.py", "test_data_layouts.py",
                 "test_benchmark.py", "test_output_dir.py", "test_evaluation.py", "test_metrics.py"]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
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
def tiny_sd_on_the_hub(tiny_sd):
    """The tiny pipeline as huggingface_hub caches a model it downloaded, under a hub id of its own: loaded by
    that id, offline, through the same hub code that loads CompVis/stable-diffusion-v1-4 for users with a
    network. (Not under SD v1-4's own id, which other tests expect to fail offline.)"""
    repo_id, commit = "sdtoolkit-tests/tiny-sd", "0" * 40
    repo = pathlib.Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(tiny_sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo_id


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("models") / "tiny-open-clip", seed=0)


@pytest.fixture(scope="module")
def client_downloads(tmp_path_factory):
    """gradio_client leaves an empty folder in the system temp folder for each file it downloads; put them here."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("client-downloads"))
    yield
    tempfile.tempdir = saved


def installed_toolkit_env():
    """This process's environment without PYTHONPATH: a `python -m sdtoolkit...` run from another folder then finds
    the package as make setup installed it, as a user's does."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


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


def run_entry_point(main, *args, capsys):
    """A script's main(argv) run as its entry point runs it (sdtoolkit.errors.run_main), in this process: a
    CompletedProcess like run_script's, seconds sooner. Each script keeps a test through run_script too, for its
    real command line."""
    from sdtoolkit.errors import run_main

    capsys.readouterr()
    try:
        run_main(lambda: main(list(map(str, args))))
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


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


def caption_folder(root, rows):
    """A folder of images with same-named caption files, from (relative path, image index, caption or None)."""
    for path, i, caption in rows:
        image_path = root / path
        image_path.parent.mkdir(parents=True, exist_ok=True)
        demo_image(i).save(image_path)
        if caption is not None:
            image_path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root


def cutout(width, height, seed=0):
    """An RGBA image: opaque black in its left third and top quarter, transparent elsewhere (with colours behind
    the transparency, which training never sees: it lays transparent pixels on white)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    opaque = np.zeros((height, width), dtype=bool)
    opaque[:, : width // 3] = True
    opaque[: height // 4] = True
    pixels[opaque, :3] = 0
    pixels[..., 3] = np.where(opaque, 255, 0)
    return Image.fromarray(pixels, mode="RGBA")


def cutout_folder(root, opaque=True):
    """Eight captioned RGBA images; fully transparent ones when not `opaque`."""
    rows = []
    for i in range(8):
        image = cutout(40 + 8 * (i % 3), 40, seed=i)
        if not opaque:
            image.putalpha(0)
        rows.append((f"{i}.png", image, f"creature number {i}"))
    return image_folder(root, rows)


def demo_image(i=0):
    """Image i of the bundled data set."""
    return Image.open(DEMO_DATA / f"{i:04d}.png")


def literal_windows(tokenizer, text):
    """The token ids of `text` read literally (no emphasis), as CLIP windows: lists of 77 ids."""
    from sdtoolkit.clip_windows import token_windows

    return [ids for ids, _ in token_windows(tokenizer, [(text, 1.0)])]


# Tuned models and LoRA files with known changes, for sdtoolkit/extract_lora.py, the export and the LyCORIS loader.


def tuned_copy(tiny_sd, folder, unet_change=None, text_encoder_change=None, seed=1):
    """A copy of the tiny pipeline at `folder`, its UNet and text encoder changed by unet_change(unet) and
    text_encoder_change(text_encoder), which edit the weights in place (drawing from torch's generator at `seed`)."""
    shutil.copytree(tiny_sd, folder)
    torch.manual_seed(seed)
    for part, kind, change in (("unet", UNet2DConditionModel, unet_change),
                               ("text_encoder", CLIPTextModel, text_encoder_change)):  # fmt: skip
        if change is not None:
            model = kind.from_pretrained(folder / part)
            with torch.no_grad():
                change(model)
            model.save_pretrained(folder / part)
    return folder


def rank_two_change(model):
    """A change of rank 2 in each layer of the UNet's transformer blocks."""
    for layer in target_layers(model, UNET_BLOCKS).values():
        out, inputs = layer.weight.shape[0], layer.weight[0].numel()
        change = torch.randn(out, 2) @ torch.randn(2, inputs) / inputs**0.5
        layer.weight += change.reshape(layer.weight.shape)


RANK = 2  # the LyCORIS files' usual rank


def lycoris_layers(pipeline):
    """The layers lycoris_file's files adapt: two UNet attention projections, a 3x3 UNet convolution, a CLIP projection;
    as (component, module path, kohya-ss name, module)."""
    unet, text_encoder = dict(pipeline.unet.named_modules()), dict(pipeline.text_encoder.named_modules())
    chosen = [("unet", n) for n in unet if n.endswith(("attn1.to_q", "attn2.to_v"))][:2]
    chosen += [("unet", next(n for n in unet if n.endswith("resnets.0.conv1")))]
    chosen += [("text_encoder", next(n for n in text_encoder if n.endswith("layers.0.self_attn.q_proj")))]
    found = []
    for part, path in chosen:
        full = path if part == "unet" or path.startswith("text_model.") else f"text_model.{path}"
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        found.append((part, path, prefix + full.replace(".", "_"), (unet if part == "unet" else text_encoder)[path]))
    return found


def lycoris_file(pipeline, kind, path, seed=0):
    """A random LoHa or LoKr file in kohya-ss keys for `pipeline`, and each layer's update by LyCORIS's formula:
    {(component, module path): delta W}."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    tensors, deltas = {}, {}
    for i, (part, module_path, name, module) in enumerate(lycoris_layers(pipeline)):
        out, inner = module.weight.shape[0], module.weight[0].numel()  # a convolution's kernel flattened
        alpha = 1.0 + i
        if kind == "LoHa Tucker" and module.weight.ndim == 4:  # a convolution's LoHa with Tucker cores t1, t2
            t1, w1_a, w1_b = randn(RANK, RANK, 3, 3), randn(RANK, out), randn(RANK, module.in_channels)
            t2, w2_a, w2_b = randn(RANK, RANK, 3, 3), randn(RANK, out), randn(RANK, module.in_channels)
            tensors.update({f"{name}.hada_t1": t1, f"{name}.hada_w1_a": w1_a, f"{name}.hada_w1_b": w1_b,
                            f"{name}.hada_t2": t2, f"{name}.hada_w2_a": w2_a, f"{name}.hada_w2_b": w2_b})  # fmt: skip
            # Each core contracted with its factors, as AUTOMATIC1111's make_weight_cp: (out, in, 3, 3).
            rebuild = [torch.einsum("i j k l, i o, j n -> o n k l", t, a, b) for t, a, b in ((t1, w1_a, w1_b),
                       (t2, w2_a, w2_b))]  # fmt: skip
            delta = rebuild[0] * rebuild[1] * alpha / RANK
        elif kind.startswith("LoHa"):  # (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, one layer at another rank
            rank = RANK + 2 * (i == 1)
            w1_a, w1_b, w2_a, w2_b = randn(out, rank), randn(rank, inner), randn(out, rank), randn(rank, inner)
            tensors.update({f"{name}.hada_w1_a": w1_a, f"{name}.hada_w1_b": w1_b, f"{name}.hada_w2_a": w2_a,
                            f"{name}.hada_w2_b": w2_b})  # fmt: skip
            delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
        elif i % 2:  # LoKr, both factors full: kron(w1, w2), no scaling
            w1, w2 = randn(4, 4), randn(out // 4, inner // 4)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2})
            delta = torch.kron(w1, w2)
        else:  # LoKr, the second factor of rank 2: kron(w1, w2_a @ w2_b) * alpha / rank
            w1, w2_a, w2_b = randn(4, 4), randn(out // 4, RANK), randn(RANK, inner // 4)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b})
            delta = torch.kron(w1, w2_a @ w2_b) * alpha / RANK
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[(part, module_path)] = delta.reshape(module.weight.shape)
    save_file(tensors, path)
    return deltas


def example_args(**settings):
    """The training script's arguments at their defaults, as TrainingExamples reads them, with `settings` changed."""
    import train_text_to_image

    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(DEMO_DATA)])
    for name, value in settings.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    return args


def train_args(tiny_sd, output_dir, *extra, data=DEMO_DATA):
    """The training script's arguments with small, fast settings; extra flags win."""
    return [
        "--pretrained_model_name_or_path", str(tiny_sd),
        "--train_data_dir", str(data),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--seed", "0",
        "--mixed_precision", "no",
        *extra,
    ]  # fmt: skip


def train(tiny_sd, output_dir, *extra, data=DEMO_DATA):
    """Run the training script in-process with train_args, from accelerate's clean slate as in a process of its own
    (its state would otherwise keep the first run's settings: mixed precision, torch.compile)."""
    import train_text_to_image

    reset_accelerate_state()
    train_text_to_image.main(train_args(tiny_sd, output_dir, *extra, data=data))


def train_whole_and_resumed(tiny_sd, tmp_path, *flags):
    """Train 4 steps in one run (tmp_path/whole), and in two (tmp_path/parts: 2 steps, then resumed from its
    checkpoint-2 to 4), for a test to compare; `flags` must save a checkpoint at step 2."""
    train(tiny_sd, tmp_path / "whole", *flags, "--max_train_steps", "4")
    train(tiny_sd, tmp_path / "parts", *flags, "--max_train_steps", "2")
    train(tiny_sd, tmp_path / "parts", *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


def launched_with(monkeypatch, *options):
    """The torch.compile settings (ACCELERATE_DYNAMO_*) that `accelerate launch <options> script.py` gives the
    script, set in this process, from accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    launch = launch_command_parser().parse_args(["--num_processes=1", "--num_machines=1", "--mixed_precision=no",
                                                 *options, "train_text_to_image.py"])  # fmt: skip
    _, env = prepare_simple_launcher_cmd_env(_validate_launch_command(launch)[0])
    for name in [name for name in env if name.startswith("ACCELERATE_DYNAMO_")]:  # backend, mode, dynamic, ...
        monkeypatch.setenv(name, env[name])


# accelerate launch options for train.sh's LAUNCH_ARGS: one CPU process, or two (DDP over gloo).
SINGLE = "--num_processes=1 --num_machines=1 --mixed_precision=no --dynamo_backend=no"
TWO_CPU_PROCESSES = "--multi_gpu --num_processes=2 --num_machines=1 --mixed_precision=no --dynamo_backend=no"
# train.sh from a user's folder (see tests/test_user_path.py). The seed's recipe made small: train.sh's own flags stay (EMA, center crop, flips, checkpointing, ...).
SMALL = ["--mixed_precision=no", "--resolution=32", "--train_batch_size=2", "--gradient_accumulation_steps=1",
         "--seed=0", "--learning_rate=1e-3"]  # fmt: skip


def train_sh_env(model, data, output_dir, launch_args=SINGLE):
    """The environment train_sh runs train.sh in: the model, data and output folder, and accelerate's options."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHON": sys.executable,
        "MODEL_NAME": str(model),
        "DATASET_NAME": str(data),
        "OUTPUT_DIR": str(output_dir),
        "LAUNCH_ARGS": launch_args + " --main_process_port=0" * ("--multi_gpu" in launch_args),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
    }


def train_sh(cwd, *extra, model, data, output_dir, launch_args=SINGLE, timeout=300):
    """`bash <toolkit>/train.sh` run from `cwd`; returns (exit code, output lines without blank ones)."""
    env = train_sh_env(model, data, output_dir, launch_args)
    result = subprocess.run(
        ["bash", str(REPO / "train.sh"), *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines


def train_sh_flags(cwd, *extra, model=None, data=None, output_dir=None, launch_args=SINGLE):
    """The training script's flags as train.sh builds them, run from `cwd` (MODEL_NAME, DATASET_NAME and OUTPUT_DIR
    unset where not given): train.sh itself runs, with PYTHON a stand-in that writes down what it was given instead
    of starting Python (milliseconds, where train_sh's launcher and script take 10 s or more). Checks that train.sh
    starts the launcher on the toolkit's script."""
    record = pathlib.Path(tempfile.mkdtemp(dir=SCRATCH))
    stand_in = record / "python"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$(dirname "$0")/argv"\n')
    stand_in.chmod(0o755)
    given = {"MODEL_NAME": model, "DATASET_NAME": data, "OUTPUT_DIR": output_dir}
    env = {name: value for name, value in os.environ.items() if name not in given}
    env.update({name: str(value) for name, value in given.items() if value is not None})
    env.update(PYTHON=str(stand_in), LAUNCH_ARGS=launch_args)
    subprocess.run(["bash", str(REPO / "train.sh"), *map(str, extra)], cwd=cwd, env=env, check=True, timeout=30)
    argv = (record / "argv").read_text().split("\0")[:-1]
    shutil.rmtree(record)
    script = next(i for i, arg in enumerate(argv) if arg.endswith("/train_text_to_image.py"))
    assert os.path.samefile(argv[script], REPO / "train_text_to_image.py"), argv
    assert argv[:2] == ["-m", "sdtoolkit.launch"] and argv[2:script] == launch_args.split(), argv
    return argv[script + 1 :]


def as_train_sh_runs_it(cwd, *extra, model, data, output_dir, monkeypatch, capsys):
    """The training script in this process, from `cwd`, with the flags train.sh gives it (train_sh_flags): train.sh's
    own way of building a run (its recipe, MODEL_NAME, DATASET_NAME, OUTPUT_DIR, a --config_file or
    --dataset_config in place of them) and the user's relative paths, seconds sooner than train_sh. What the
    launcher adds (its error line, several processes, the toolkit found from another folder), tests/test_user_path.py
    tests with train_sh. A CompletedProcess; the run's log lines are caplog's."""
    import train_text_to_image

    flags = train_sh_flags(cwd, *extra, model=model, data=data, output_dir=output_dir)
    monkeypatch.chdir(cwd)
    return run_entry_point(train_text_to_image.main, *flags, capsys=capsys)


def logged_losses(output_dir, tag="train_loss"):
    """(step, value) pairs of a logged scalar (train_loss unless told) from a run's newest TensorBoard file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = pathlib.Path(output_dir) / "logs" / "text2image-fine-tune"
    newest = max(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(newest))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def unet_weights(folder):
    return load_file(str(pathlib.Path(folder) / "diffusion_pytorch_model.safetensors"))


def relative_difference_of_updates(base, a, b, weights="diffusion_pytorch_model.safetensors"):
    """|(a - base) - (b - base)| / |a - base| over all the weights of a model folder's `weights` file (the UNet's
    unless told): how differently two runs moved them."""
    base, a, b = (load_file(str(pathlib.Path(folder) / weights)) for folder in (base, a, b))
    delta_a = torch.cat([(a[k] - base[k]).flatten() for k in base])
    delta_b = torch.cat([(b[k] - base[k]).flatten() for k in base])
    return ((delta_a - delta_b).norm() / delta_a.norm()).item()


def step_marker(step_file):
    """Python to run before the training script in a child process: it appends each logged step to step_file,
    so a test can wait for training to be under way instead of sleeping a fixed time."""
    return f"""
import accelerate
_log = accelerate.Accelerator.log
def _log_and_mark(self, values, step=None, **kwargs):
    _log(self, values, step=step, **kwargs)
    if step is not None and self.is_main_process:
        with open({str(step_file)!r}, "a") as f:
            f.write(f"{{step}}\\n")
accelerate.Accelerator.log = _log_and_mark
"""


def wait_for_step(step_file, step, process, timeout=120):
    """Wait until the child process marked by step_marker has logged `step` steps."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if step_file.exists() and len(step_file.read_text().split()) >= step:
            return
        assert process.poll() is None, f"the run ended (exit code {process.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


# Width x height of the test images: 2:3, 1:1, 16:9, 1:3, and one smaller than the smallest bucket.
MIXED_SHAPES = [(80, 120), (100, 100), (160, 90), (50, 150), (20, 20)]


def mixed_aspect_folder(root, copies=2):
    """A caption-file folder of images of MIXED_SHAPES (each `copies` times), nested, with .txt captions."""
    for i in range(copies * len(MIXED_SHAPES)):
        width, height = MIXED_SHAPES[i % len(MIXED_SHAPES)]
        path = root / f"set{i % 2}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        demo_image(i).convert("RGB").resize((width, height)).save(path)
        path.with_suffix(".txt").write_text(f"a creature {width} by {height}")
    return root


def embeddings(text_encoder, tokenizer):
    """The text encoder's hidden states for "a creature" (padded to 77 tokens): for comparing text encoders."""
    ids = tokenizer("a creature", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(ids.input_ids, return_dict=False)[0]


def generated_image(pipeline, size):
    """One image of `size` px from `pipeline`, 2 steps, seed 0, as a numpy array: for comparing two pipelines."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a creature", num_inference_steps=2, height=size, width=size, generator=generator, output_type="np"
    ).images


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorded_model(tiny_sd, tmp_path, clip_skip):
    """The tiny pipeline in a folder whose model card records `clip_skip`, as a training run's does (tests/test_clip_skip.py
    checks that training writes it)."""
    folder = tmp_path / f"clip-skip-{clip_skip}"
    shutil.copytree(tiny_sd, folder)
    (folder / "README.md").write_text(f"---\nlicense: creativeml-openrail-m\nclip_skip: {clip_skip}\n---\n# A model\n")
    return str(folder)


def start(model_path, *extra):
    """gradio_app.py serving `model_path` on CPU on a free port, in this process; call .close() when done."""
    import gradio_app

    args = gradio_app.parse_args(["--model_path", model_path, "--port", str(free_port()), "--device", "cpu", *extra])
    return gradio_app.launch(args, block=False)


@pytest.fixture(scope="module")
def server(tiny_sd):
    """A server of the tiny pipeline with the default options, shared by a test module."""
    app = start(tiny_sd)
    yield app
    app.close()


def generate(client, prompt="pikachu", negative="", steps=3, guidance=7.5, seed="7", scheduler="DPM-Solver++",
             width=64, height=64, num_images=1, **lora_scale):  # fmt: skip
    """The page's /generate through gradio_client: the images as PIL images, and the details text."""
    gallery, info = client.predict(
        prompt, negative, steps, guidance, seed, scheduler, width, height, num_images, api_name="/generate",
        **lora_scale,
    )  # fmt: skip
    return [Image.open(item["image"]) for item in gallery], info
