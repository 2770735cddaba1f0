#!/usr/bin/env python
"""Measure what the speed and memory options of train_text_to_image.py buy, and write BENCHMARKS.md.

    python benchmark.py                       # both workloads, as `make bench` runs it (about 35 minutes on 2 cores)
    python benchmark.py --workloads tiny --steps 5 --out /tmp/bench.md   # a quick look

It builds the offline fixture pipelines itself (random weights, real architectures) under --models. Each
configuration trains in a fresh process, so its peak resident memory is its own. For each workload:

- all off: the upstream-equivalent path (encoders run every step, per-tensor AdamW, diffusers' EMA loop);
- each option alone on top of that, and all on (the toolkit's defaults);
- all on with 8-bit AdamW (torchao on a CPU, bitsandbytes on a GPU), for memory;
- the limit: the same number of bare UNet forward+backward passes and fused AdamW steps on pre-made latents
  and text embeddings, with nothing else.

Seconds per optimizer step are the median over --steps steps after --warmup steps, read from the
`step_seconds` the training script logs. For sd-v1-4 it also times inference at 256 px: 25 DPM-Solver++ steps
against 50 PNDM steps.

Then start-up: peak memory and time before the first step for 100 and 800 large images, as an imagefolder
and as parquet files written two ways, and what the on-disk latent cache saves a second run.

For each workload it also trains on a mixed-aspect copy of the bundled images (2:3, 1:1, 16:9, 1:3 and 3:2)
twice, with the defaults: square crops, and --aspect_buckets at the same resolution (about the same pixels
per image), to show what buckets cost.
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
DATA = REPO / "data" / "creatures"

# The seed's recipe, at a resolution a CPU can train.
RECIPE = ["--center_crop", "--random_flip", "--train_batch_size", "1", "--gradient_accumulation_steps", "4",
          "--use_ema", "--gradient_checkpointing", "--learning_rate", "1e-5", "--max_grad_norm", "1",
          "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]  # fmt: skip
WORKLOADS = {
    "tiny": {"preset": "tiny", "resolution": 64},
    "sd-v1-4": {"preset": "sd-v1-4", "resolution": 128},
}
OFF = ["--no-cache_latents", "--no-fused_adam", "--no-inplace_ema"]
CONFIGS = [
    ("all off (upstream path)", OFF),
    ("+ cached latents and text", ["--no-fused_adam", "--no-inplace_ema"]),
    ("+ fused AdamW", ["--no-cache_latents", "--no-inplace_ema"]),
    ("+ in-place EMA", ["--no-cache_latents", "--no-fused_adam"]),
    ("all on (defaults)", []),
    ("all on + 8-bit AdamW", ["--use_8bit_adam"]),
    ("all on + Adafactor", ["--optimizer", "adafactor"]),
    ("all on + the whole text encoder trained", ["--train_text_encoder"]),
]

# LoRA runs compared with the full fine-tune. bf16 autocast also keeps the frozen UNet in bf16.
LORA_CONFIGS = [
    ("LoRA rank 4", ["--lora_rank", "4"]),
    ("LoRA rank 64", ["--lora_rank", "64"]),
    ("DoRA rank 4", ["--lora_rank", "4", "--use_dora"]),
    ("LoRA rank 4, bf16 mixed precision", ["--lora_rank", "4", "--mixed_precision", "bf16"]),
    ("LoRA rank 4, --fp8_base", ["--lora_rank", "4", "--fp8_base"]),
    ("LoRA rank 4, --fp8_base, bf16 mixed precision", ["--lora_rank", "4", "--fp8_base", "--mixed_precision", "bf16"]),
    ("LoHa rank 4", ["--lora_type", "loha", "--lora_rank", "4"]),
    ("LoKr rank 4", ["--lora_type", "lokr", "--lora_rank", "4"]),
]


def peak_rss_gb():
    """This process's peak resident memory: VmHWM, which starts afresh at exec. (ru_maxrss also counts the
    parent's memory when it forked the child, so a benchmark parent that had written big files inflated it.)"""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmHWM"].split()[0]) / 1024**2  # KiB
    except (OSError, KeyError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def peak_cuda_gb():
    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None


# The mixed-aspect set: each bundled image resized to one of these width:height ratios, in turn.
ASPECTS = [(2, 3), (1, 1), (16, 9), (1, 3), (3, 2)]


def write_mixed_aspect_data(folder, side=256):
    """The bundled images at the ASPECTS ratios (long side `side`), as a folder with a metadata.jsonl."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        w, h = ASPECTS[i % len(ASPECTS)]
        size = (side, round(side * h / w)) if w >= h else (round(side * w / h), side)
        Image.open(DATA / row["file_name"]).convert("RGB").resize(size).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text((DATA / "metadata.jsonl").read_text())
    return folder


def child_train(model, resolution, flags, steps, warmup, data=str(DATA)):
    """One training run in this (fresh) process; returns its step times, peak memory, the number of weights
    it trained and the sizes of the weight files it wrote."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_text_to_image

    trainable = []

    class Trainable(logging.Handler):
        def emit(self, record):
            found = re.search(r"UNet trainable parameters: ([\d,]+)", record.getMessage())
            if found:
                trainable.append(int(found.group(1).replace(",", "")))

    logging.getLogger("train_text_to_image").addHandler(Trainable())
    with tempfile.TemporaryDirectory() as out:
        argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
                "--resolution", str(resolution), "--seed", "0", "--mixed_precision", "no",
                "--max_train_steps", str(warmup + steps), "--checkpointing_steps", "1000000", *RECIPE, *flags]  # fmt: skip
        started = time.perf_counter()
        train_text_to_image.main(argv)
        total = time.perf_counter() - started
        events = EventAccumulator(str(next(Path(out, "logs", "text2image-fine-tune").glob("events.out.tfevents.*"))))
        events.Reload()
        seconds = [e.value for e in events.Scalars("step_seconds")]
        outputs = {str(path.relative_to(out)): path.stat().st_size for path in sorted(Path(out).rglob("*.safetensors"))
                   if not path.relative_to(out).parts[0].startswith("checkpoint-")}  # fmt: skip
    return {"step_seconds": seconds[warmup:], "total_seconds": total, "peak_rss_gb": peak_rss_gb(),
            "peak_cuda_gb": peak_cuda_gb(), "trainable": trainable[0], "outputs": outputs}  # fmt: skip


# Start-up against dataset size: this many large images, as an imagefolder and as parquet written two ways.
STARTUP_COUNTS = [100, 800]
STARTUP_LAYOUTS = ["imagefolder", "parquet, 100 images per row group", "parquet, one row group"]
# The disk cache's first and second run: the preset and resolution, where encoding takes long enough to see.
CACHE_WORKLOAD = ("sd-v1-4", 128)


def write_large_images(folder, count):
    """`count` incompressible 600x600 PNGs (about 1 MB each) with captions, in three layouts: an imagefolder,
    a parquet file with row groups of 100 images (about 100 MB, as datasets' to_parquet writes them) and one
    with a single row group (as pandas and pyarrow write a table by default). Returns {layout: data flags}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images = folder / "imagefolder"
    paths = {"imagefolder": ["--train_data_dir", str(images)]}
    for layout, rows_per_group in zip(STARTUP_LAYOUTS[1:], [100, count]):
        paths[layout] = ["--dataset_name", str(folder / f"train-{rows_per_group}.parquet")]
    if (folder / "done").exists():
        return paths
    images.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    records = []
    for i in range(count):
        Image.fromarray(generator.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
        records.append({"file_name": f"{i:05d}.png", "text": f"picture number {i}"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    table = pa.table({"image": [{"bytes": (images / r["file_name"]).read_bytes(), "path": r["file_name"]}
                                for r in records], "text": [r["text"] for r in records]})  # fmt: skip
    for rows_per_group in (100, count):
        pq.write_table(table, folder / f"train-{rows_per_group}.parquet", row_group_size=rows_per_group)
    (folder / "done").touch()
    return paths


def child_startup(model, resolution, flags):
    """One training run of one step: its peak RSS, its peak private (anonymous) memory, sampled every 5 ms,
    which leaves out the pages of memory-mapped files that the kernel can drop, and the seconds it took."""
    import logging
    import threading

    import train_text_to_image

    peak = {"anon": 0}

    def sample():
        while True:
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    # The seconds the script says caching (or reading the cache) took.
    cache_seconds = []

    class Seconds(logging.Handler):
        def emit(self, record):
            found = re.search(r"\b(Cached|Read) .* in ([\d.]+) s; freeing", record.getMessage())
            if found:
                cache_seconds.append(float(found.group(2)))

    logging.getLogger("train_text_to_image").addHandler(Seconds())
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as hub_cache:
        argv = ["--pretrained_model_name_or_path", model, "--output_dir", out, "--resolution", str(resolution),
                "--seed", "0", "--mixed_precision", "no", "--max_train_steps", "1", "--checkpointing_steps", "1000000",
                "--cache_dir", hub_cache, *RECIPE, *flags]  # fmt: skip
        started = time.perf_counter()
        train_text_to_image.main(argv)
        total = time.perf_counter() - started
    return {"peak_rss_gb": peak_rss_gb(), "peak_anon_gb": peak["anon"] / 1024**3, "seconds": total,
            "cache_seconds": cache_seconds[0] if cache_seconds else None}  # fmt: skip


def child_limit(model, resolution, steps, warmup):
    """The bare minimum of a step: 4 UNet forward+backward passes on pre-made inputs and one fused AdamW step."""
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator().manual_seed(0)
    vae_config = json.loads(Path(model, "vae", "config.json").read_text())
    size = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator).to(device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    timestep = torch.tensor([500], device=device)
    seconds = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        for _ in range(4):  # gradient accumulation 4, batch 1
            prediction = unet(latents, timestep, text, return_dict=False)[0]
            (prediction.float().pow(2).mean() / 4).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return {"step_seconds": seconds[warmup:], "peak_rss_gb": peak_rss_gb(), "peak_cuda_gb": peak_cuda_gb()}


def child_breakdown(model, resolution, repeats=3):
    """Seconds per call of each part of a training step, timed alone (median of `repeats` after one warm-up)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    from sdtoolkit.ema import InPlaceEMAModel

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    result = {}
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        pixels = torch.randn(1, 3, resolution, resolution)
        result["VAE encode, 1 image"] = timed(lambda: vae.encode(pixels))
        vae = None  # free it before the next model
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        ids = torch.randint(0, 49408, (1, 77))
        result["text encoder, 1 caption"] = timed(lambda: text_encoder(ids))
        text_encoder = None

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.enable_gradient_checkpointing()
    unet.train()
    size = resolution // 8
    latents, text = torch.randn(1, 4, size, size), torch.randn(1, 77, unet.config.cross_attention_dim)

    def forward_backward():
        unet(latents, torch.tensor([500]), text, return_dict=False)[0].pow(2).mean().backward()

    result["UNet forward+backward, 1 micro-batch"] = timed(forward_backward)
    unet.to(memory_format=torch.channels_last)
    result["UNet forward+backward, 1 micro-batch, --channels_last"] = timed(forward_backward)
    unet.to(memory_format=torch.contiguous_format)
    result["clip_grad_norm_"] = timed(lambda: torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0))
    parameters = list(unet.parameters())
    for name, kwargs in (("AdamW per-tensor (upstream on CPU)", {"foreach": False}),
                         ("AdamW foreach", {"foreach": True}), ("AdamW fused", {"fused": True})):  # fmt: skip
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, **kwargs)
        result[name] = timed(optimizer.step)
        del optimizer
    for p in parameters:
        p.grad = None
    for name, make in (("EMA diffusers loop (upstream)", lambda: EMAModel(parameters)),
                       ("EMA diffusers foreach", lambda: EMAModel(parameters, foreach=True)),
                       ("EMA in-place lerp", lambda: InPlaceEMAModel(parameters))):  # fmt: skip
        ema = make()
        result[name] = timed(lambda: ema.step(parameters))
        ema = None
    return result


def child_evaluation():
    """What metrics.py's evaluation costs besides generating: CLIP image features (a CLIP ViT-B/16 of random
    weights: the time depends on the architecture, not the weights), the set distances, the nearest-image
    search and the bootstrap, at sizes of a real evaluation."""
    import numpy as np
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    import metrics
    from sdtoolkit.evaluation import image_features, nearest, paired_bootstrap, set_distances

    def timed(fn):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           patch_size=16, image_size=224),
        projection_dim=512,
    )  # fmt: skip
    clip = (metrics.TransformersCLIPFeatures(CLIPModel(config)).eval(), CLIPImageProcessor())
    images, _ = metrics.read_reference_images(str(DATA))
    image_features(images[:2], clip, "cpu")  # warm-up
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(1000, 512)))
    reference = torch.from_numpy(np.random.default_rng(1).normal(size=(800, 512)))
    return {
        f"CLIP ViT-B/16 image features, per image ({len(images)} bundled images)":
            timed(lambda: image_features(images, clip, "cpu")) / len(images),
        "Fréchet and kernel distances, 1,000 against 800 images": timed(lambda: set_distances(features, reference)),
        "nearest training image, 1,000 against 800 images": timed(lambda: nearest(features, reference)),
        "paired bootstrap, 600 prompt-seed pairs, 10,000 resamples":
            timed(lambda: paired_bootstrap(np.random.default_rng(0).normal(size=600))),
    }  # fmt: skip


def child_inference(model, resolution):
    """Seconds per image: 25 DPM-Solver++ steps against 50 PNDM steps."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    from sdtoolkit.inference import load_pipeline, pick_device_and_dtype

    device, dtype = pick_device_and_dtype()
    pipeline = load_pipeline(model, device, dtype)
    pipeline("warm up", num_inference_steps=1, height=resolution, width=resolution)
    result = {}
    for name, scheduler_cls, steps in (("DPM-Solver++ 25", DPMSolverMultistepScheduler, 25),
                                       ("PNDM 50", PNDMScheduler, 50)):  # fmt: skip
        pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
        generator = torch.Generator(device).manual_seed(0)
        started = time.perf_counter()
        pipeline("a cartoon creature", num_inference_steps=steps, height=resolution, width=resolution,
                 generator=generator)  # fmt: skip
        result[name] = time.perf_counter() - started
    return result


# --fork: children fork from this process instead of starting afresh (a quick look; see run_child).
FORK = False


def run_child(kind, **kwargs):
    """Run child_<kind>(**kwargs) in a fresh Python process and return what it returns. With --fork, in a fork of
    this one: about 5 s quicker each (no imports), but its peak memory then counts this process's too."""
    if FORK:
        import train_text_to_image  # noqa: F401 (imported here once, for every fork)

        def child():
            os.environ["HF_HUB_OFFLINE"] = "1"
            print("RESULT " + json.dumps(globals()[f"child_{kind}"](**kwargs)))

        with tempfile.TemporaryDirectory() as scratch:
            returncode, output = forked(child, Path(scratch) / "output.txt")
        stdout = stderr = output
    else:
        code = (
            "import json, sys; sys.path.insert(0, %r); import benchmark; "
            "result = benchmark.child_%s(**json.loads(sys.argv[1])); print('RESULT ' + json.dumps(result))"
        ) % (str(REPO), kind)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {kind} failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def forked(function, output):
    """function() in a fork of this process, its output (stdout and stderr) written to the file `output`; returns
    (exit code, that output). The fork starts with everything this process has imported, so it does not import
    torch, diffusers and the training script again (about 5 s on a 2-core CPU). Fork only from a process that has
    not run torch's parallel CPU code yet, as benchmark.py's and gpu_check.py's parents: the OpenMP threads of one
    that has are not in its fork, which can then hang."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # Both the file descriptors (for libraries' C code) and Python's streams (which may not be them).
            sys.stdout = sys.stderr = open(output, "w", buffering=1)
            os.dup2(sys.stdout.fileno(), 1)
            os.dup2(sys.stdout.fileno(), 2)
            function()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), Path(output).read_text()


def has_torchao():
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def build_model(preset, models):
    folder = Path(models) / preset
    if not (folder / "model_index.json").exists():
        print(f"building the {preset} fixture pipeline in {folder} ...", flush=True)
        subprocess.run([sys.executable, "-m", "sdtoolkit.fixtures", "--preset", preset, "--out", str(folder)],
                       check=True, cwd=REPO)  # fmt: skip
    return str(folder)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GB RAM, GPU: {gpu}; Python {platform.python_version()},"
            f" torch {torch.__version__}")  # fmt: skip


def table(rows, baseline, limit):
    lines = ["| configuration | s / optimizer step (median) | speed-up vs all off | vs limit | samples / s |"
             " peak RSS (GB) | peak CUDA (GB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, result in rows:
        median = statistics.median(result["step_seconds"])
        cuda = f"{result['peak_cuda_gb']:.2f}" if result.get("peak_cuda_gb") is not None else "–"
        lines.append(
            f"| {name} | {median:.3f} | {baseline / median:.2f}x | {median / limit:.2f}x | {4 / median:.2f} |"
            f" {result['peak_rss_gb']:.2f} | {cuda} |"
        )
    return "\n".join(lines)


def relative_table(rows, first="square crops"):
    """Step time and peak memory of each row, time relative to the first row's."""
    baseline = statistics.median(rows[0][1]["step_seconds"])
    lines = [f"| configuration | s / optimizer step (median) | time vs {first} | peak RSS (GB) |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, result in rows:
        median = statistics.median(result["step_seconds"])
        lines.append(f"| {name} | {median:.3f} | {median / baseline:.2f}x | {result['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def lora_table(rows):
    """LoRA against the full fine-tune: what trains, time, memory and the files written."""
    full = statistics.median(rows[0][1]["step_seconds"])
    lines = ["| configuration | trained weights | s / optimizer step (median) | time vs full | peak RSS (GB) |"
             " peak CUDA (GB) | weight files written (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, result in rows:
        median = statistics.median(result["step_seconds"])
        cuda = f"{result['peak_cuda_gb']:.2f}" if result["peak_cuda_gb"] is not None else "–"
        files = ", ".join(f"{path} {size / 1e6:,.1f}" for path, size in result["outputs"].items())
        lines.append(f"| {name} | {result['trainable']:,} | {median:.3f} | {median / full:.2f}x |"
                     f" {result['peak_rss_gb']:.2f} | {cuda} | {files} |")  # fmt: skip
    return "\n".join(lines)


def startup_table(rows):
    lines = ["| data | images | peak RSS (GB) | peak private memory (GB) | seconds (load, check, cache, 1 step) |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for (layout, count), result in rows:
        lines.append(f"| {layout} | {count} | {result['peak_rss_gb']:.2f} | {result['peak_anon_gb']:.2f} |"
                     f" {result['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def startup_section(models):
    """Start-up memory against dataset size, and what the disk cache saves a second run."""
    tiny = build_model("tiny", models)
    rows = []
    for count in STARTUP_COUNTS:
        print(f"[start-up] writing {count} large images ...", flush=True)
        layouts = write_large_images(Path(models) / f"large-{count}", count)
        for layout in STARTUP_LAYOUTS:
            print(f"[start-up] {layout}, {count} images ...", flush=True)
            rows.append(((layout, count), run_child("startup", model=tiny, resolution=64, flags=layouts[layout])))
    preset, resolution = CACHE_WORKLOAD
    model = build_model(preset, models)
    cache_rows = []
    with tempfile.TemporaryDirectory() as cache:
        flags = ["--train_data_dir", str(DATA), "--latent_cache_dir", cache]
        for name in ("first run: encodes and writes the cache", "second run: reads it"):
            print(f"[start-up] disk cache, {name} ...", flush=True)
            cache_rows.append((name, run_child("startup", model=model, resolution=resolution, flags=flags)))
    lines = [
        "### Start-up memory against dataset size",
        "The seed's recipe, one step, `tiny` preset at 64 px, on noise images of 600x600 px (PNG, about 1 MB"
        " each): the time and memory of everything before training (loading, the check of every image, caching)."
        " Peak RSS also counts the pages of the memory-mapped dataset that the check has read, which the kernel"
        " drops when memory runs short; peak private memory leaves them out (sampled every 5 ms).",
        "",
        startup_table(rows),
        "",
        "### The latent cache on disk, second run",
        f"`--latent_cache_dir`, `{preset}` preset at {resolution} px, the 32 bundled images with flips, run twice:",
        "",
        "| run | seconds to cache | whole run (s) | peak RSS (GB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, result in cache_rows:
        lines.append(
            f"| {name} | {result['cache_seconds']:.2f} | {result['seconds']:.1f} | {result['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None, help="Measured steps (default: 20 tiny, 3 sd-v1-4).")
    parser.add_argument("--warmup", type=int, default=None, help="Steps not measured (default: 3 tiny, 1 sd-v1-4).")
    parser.add_argument("--models", default="build/bench", help="Where the fixture pipelines are built.")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--skip_startup", action="store_true", help="Leave out start-up memory and the disk cache.")
    parser.add_argument(
        "--fork",
        action="store_true",
        help="A quick look: each configuration runs in a fork of this process rather than a fresh one (about 5 s"
        " less each), so its peak memory also counts this process's; not for BENCHMARKS.md.",
    )
    args = parser.parse_args(argv)
    global FORK
    FORK = args.fork

    command = "python benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    for workload in args.workloads:
        preset, resolution = WORKLOADS[workload]["preset"], WORKLOADS[workload]["resolution"]
        steps = args.steps or (20 if workload == "tiny" else 3)
        warmup = args.warmup if args.warmup is not None else (3 if workload == "tiny" else 1)
        model = build_model(preset, args.models)

        rows = []
        for name, flags in CONFIGS:
            if "--use_8bit_adam" in flags and not torch.cuda.is_available() and not has_torchao():
                print(f"[{workload}] {name}: skipped, torchao is not installed (make bench installs it)")
                continue
            print(f"[{workload}] {name} ...", flush=True)
            rows.append((name, run_child("train", model=model, resolution=resolution, flags=flags, steps=steps,
                                         warmup=warmup)))  # fmt: skip
            print(f"    {statistics.median(rows[-1][1]['step_seconds']):.3f} s/step,"
                  f" peak RSS {rows[-1][1]['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
        print(f"[{workload}] limit ...", flush=True)
        limit = run_child("limit", model=model, resolution=resolution, steps=steps, warmup=warmup)
        rows.append(("limit (bare UNet fwd+bwd x4 + fused AdamW)", limit))
        baseline = statistics.median(rows[0][1]["step_seconds"])
        limit_median = statistics.median(limit["step_seconds"])

        # Aspect-ratio buckets against square crops, on the mixed-aspect set (defaults otherwise).
        mixed = str(write_mixed_aspect_data(Path(args.models) / "mixed-aspect"))
        step = 64 if resolution >= 128 else 16  # SD's UNet needs multiples of 64; the tiny one of 16
        bucket_rows = []
        for name, flags in (("square crops (defaults)", []),
                            ("aspect-ratio buckets", ["--aspect_buckets", "--bucket_step", str(step)])):  # fmt: skip
            print(f"[{workload}] mixed aspect, {name} ...", flush=True)
            bucket_rows.append((name, run_child("train", model=model, resolution=resolution, flags=flags, steps=steps,
                                                warmup=warmup, data=mixed)))  # fmt: skip

        # Shuffled tags make a new caption every step, so the text encoder runs every step (see docs/data.md).
        print(f"[{workload}] --shuffle_tags ...", flush=True)
        defaults = next(result for name, result in rows if name == "all on (defaults)")
        tag_rows = [("all on (defaults)", defaults),
                    ("all on + --shuffle_tags", run_child("train", model=model, resolution=resolution,
                                                          flags=["--shuffle_tags"], steps=steps, warmup=warmup))]  # fmt: skip

        # LoRA against the full fine-tune, everything else the defaults (see docs/lora.md).
        lora_rows = [("full fine-tune (defaults)", defaults)]
        for name, flags in LORA_CONFIGS:
            print(f"[{workload}] {name} ...", flush=True)
            lora_rows.append((name, run_child("train", model=model, resolution=resolution, flags=flags, steps=steps,
                                              warmup=warmup)))  # fmt: skip

        section = [f"### {workload}: `{preset}` preset at {resolution} px, the seed's recipe",
                   f"Batch 1, gradient accumulation 4 (4 samples per optimizer step), EMA, gradient checkpointing,"
                   f" lr 1e-5, float32; median over {steps} steps after {warmup} warm-up steps.", "",
                   table(rows, baseline, limit_median), "",
                   f"Aspect-ratio buckets against square crops: the same recipe on the bundled images resized to"
                   f" 2:3, 1:1, 16:9, 1:3 and 3:2 (long side 256 px), at {resolution} px:", "",
                   relative_table(bucket_rows), "",
                   "Tag shuffling: the captions are no longer cached, so the text encoder runs at every step:", "",
                   relative_table(tag_rows, first="defaults"), "",
                   "LoRA against the full fine-tune (the same recipe and defaults; the weight files are the run's"
                   " output folder, without checkpoints):", "",
                   lora_table(lora_rows)]  # fmt: skip
        if workload == "sd-v1-4":
            print("[sd-v1-4] breakdown ...", flush=True)
            parts = run_child("breakdown", model=model, resolution=resolution)
            section += ["", "Where a step's time goes: each part timed alone (median of 3), same model and size:", "",
                        "| part | seconds |", "| --- | ---: |"]  # fmt: skip
            section += [f"| {name} | {seconds:.3f} |" for name, seconds in parts.items()]
        if workload == "sd-v1-4" and not args.skip_inference:
            print("[sd-v1-4] inference ...", flush=True)
            inference = run_child("inference", model=model, resolution=256)
            section += ["", "Inference, one 256 px image, guidance 7.5, float32:", "",
                        "| scheduler and steps | seconds per image |", "| --- | ---: |"]  # fmt: skip
            section += [f"| {name} | {seconds:.1f} |" for name, seconds in inference.items()]
            print("[sd-v1-4] evaluation costs ...", flush=True)
            costs = run_child("evaluation")
            section += ["", "metrics.py's evaluation besides generating (see docs/scoring.md), on this machine:", "",
                        "| part | seconds |", "| --- | ---: |"]  # fmt: skip
            section += [f"| {name} | {seconds:.3f} |" for name, seconds in costs.items()]
        sections.append("\n".join(section))
        raw = {name: result for name, result in rows}
        Path(args.models, f"{workload}-results.json").write_text(json.dumps(raw, indent=2))

    if not args.skip_startup:
        sections.append(startup_section(args.models))

    text = "\n\n".join(
        [
            "# Benchmarks",
            f"Machine: {machine()}.",
            f"Command: `{command.strip()}` (what `make bench` runs).",
            "Made by `benchmark.py`; every number below is from that run. Each configuration trains in its own"
            " process on the bundled `data/creatures` images.",
            "On a GPU, the seed's recipe at 512 px is measured by `gpu_check.py` instead: see"
            " [GPU_CHECK.md](GPU_CHECK.md), and the table made from it in"
            " [docs/speed-and-memory.md](docs/speed-and-memory.md#which-flags-for-which-gpu).",
            *sections,
        ]  # fmt: skip
    )
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
