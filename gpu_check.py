#!/usr/bin/env python
"""Measure the seed's recipe on one CUDA GPU in one run, and write GPU_CHECK.md and gpu_check.json.

    python gpu_check.py                                # on a GPU: the full SD v1-4 architecture at 512 px
    python gpu_check.py --dry-run                      # anywhere: the tiny preset at 64 px, two steps each
    python gpu_check.py --upstream path/to/upstream/train_text_to_image.py   # upstream's script too, same recipe
    python gpu_check.py --distributed                  # the shipped DeepSpeed and FSDP configs too, one process
    python gpu_check.py --only 'defaults, fp16' --only inference   # just these, in this order
    python gpu_check.py --minutes 5                    # the time budget (default 8): later rows are skipped
    python gpu_check.py --keep                         # run only the rows gpu_check.json has not measured here

It builds the SD v1-4 architecture with random weights on the machine it runs on (nothing large travels),
then trains each configuration of the seed's recipe (batch 1, gradient accumulation 4, EMA, gradient
checkpointing, center crop, flips, on the bundled images) in its own process, so each one's peak CUDA
memory is its own and one that runs out of memory is reported as such while the others go on. For each it
reports seconds per optimizer step (median and range over the timed steps, after warm-up),
torch.cuda.max_memory_allocated and max_memory_reserved, and whether it fits 24, 16 and 12 GB cards. Before
them, inference at 512 px: DPM-Solver++ 25 steps against PNDM 50, fp16, and caption accuracy's classifier
(metrics.py --caption_data) on 16 images. Each configuration took 30 to 50 s
on an H200, of which 4 to 9 s were training steps and 12 to 19 s the imports; a table splits each row's seconds
into such phases. The report is rewritten after each row.

GPU visits can be short: with --keep, the rows that the last report measured on the same GPU model, torch and
settings are kept and not run again, and the report holds both runs' rows, each saying which run measured it.

Without a GPU (the dry run), the children are forks of this process rather than fresh ones, which saves each
the time of importing the libraries again (see fork_child).

Step times are the wall-clock time between the script's once-per-optimizer-step `accelerator.log` calls, so
upstream's script is timed the same way as this one's. The parent process imports only the standard library
and torch; the children need the project's dependencies (on a GPU machine without network, the wheels
`make gpu-wheels` downloads: see the README).
"""

import argparse
import json
import os
import platform
import re
import runpy
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchmark

STARTED = time.time()  # in a child: when Python had started and imported torch
REPO = Path(__file__).resolve().parent
DATA = REPO / "data" / "creatures"

# The seed's recipe as benchmark.py runs it (train.sh's flags, less the output folder and the step count),
# and upstream's path: the toolkit's speed options off.
RECIPE = [*benchmark.RECIPE, "--seed", "0"]
UPSTREAM_PATH = benchmark.OFF
LORA_4 = ["--lora_rank", "4", "--learning_rate", "1e-4"]
# As `accelerate launch --dynamo_backend inductor --dynamo_use_regional_compilation` sets it (dynamic shapes off).
REGIONAL_COMPILE = {"ACCELERATE_DYNAMO_BACKEND": "inductor", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "True",
                    "ACCELERATE_DYNAMO_USE_DYNAMIC": "False"}  # fmt: skip
ONE_BATCH_OF_4 = ["--train_batch_size", "4", "--gradient_accumulation_steps", "1"]  # the recipe's 4 images at once

# (name, flags added to the recipe, flags taken out of it, mixed precision, extra environment), in the order they
# run: the targets' configurations first, the ones a time budget (--minutes) may leave out last.
CONFIGS = [
    ("upstream path, fp16", UPSTREAM_PATH, [], "fp16", {}),
    ("defaults, fp16", [], [], "fp16", {}),
    ("defaults + 8-bit AdamW + --offload_ema, fp16", ["--use_8bit_adam", "--offload_ema"], [], "fp16", {}),
    ("defaults, bf16", [], [], "bf16", {}),
    ("defaults + 8-bit AdamW, fp16", ["--use_8bit_adam"], [], "fp16", {}),
    ("defaults + --offload_ema, fp16", ["--offload_ema"], [], "fp16", {}),
    ("defaults without gradient checkpointing, fp16", [], ["--gradient_checkpointing"], "fp16", {}),
    ("LoRA rank 4, fp16", LORA_4, [], "fp16", {}),
    ("defaults + torch.compile (inductor), fp16", [], [], "fp16", {"ACCELERATE_DYNAMO_BACKEND": "inductor"}),
    # The whole UNet's compile had not ended after 178 s on an H200 (run 4); its 16 transformer blocks come in
    # 4 shapes, one per size of latent (accelerate launch --dynamo_use_regional_compilation).
    ("defaults + regional torch.compile (inductor), fp16", [], [], "fp16", REGIONAL_COMPILE),
    ("defaults + Adafactor, fp16", ["--optimizer", "adafactor"], [], "fp16", {}),
    ("LoRA rank 4 + --fp8_base, fp16", [*LORA_4, "--fp8_base"], [], "fp16", {}),
    # A step of the defaults kept the GPU busy for 13% of its time (the profile of the second visit): the rest is
    # the CPU launching some 26,000 kernels per optimizer step. The same optimizer step (4 images) as one batch of 4
    # runs a third of the operations; channels-last convolutions skip cuDNN's layout copies (a quarter of kernel time).
    ("defaults, batch 4 without accumulation, fp16", ONE_BATCH_OF_4, [], "fp16", {}),
    ("defaults + --channels_last, fp16", ["--channels_last"], [], "fp16", {}),
    # LoRA's steps after the first peaked at 1.96 GiB of its 5.07: is the rest the VAE encoding 8 images at a time?
    ("LoRA rank 4 + --vae_batch_size 1, fp16", [*LORA_4, "--vae_batch_size", "1"], [], "fp16", {}),
    # The whole text encoder trained too: float32 weights under fp16 autocast, its EMA; 2.5 GB more by accounting.
    ("defaults + --train_text_encoder, fp16", ["--train_text_encoder"], [], "fp16", {}),
    # DoRA (--use_dora) against LoRA rank 4: 1.21x its step time on the CPU at 128 px (docs/lora.md).
    ("DoRA rank 4, fp16", [*LORA_4, "--use_dora"], [], "fp16", {}),
]
# The shipped accelerate configs, on one process (--distributed). FSDP refuses EMA, so it trains without it.
DISTRIBUTED = [
    ("DeepSpeed ZeRO-2, optimizer state on the CPU (config's fp16)", "deepspeed_zero2_offload.yaml", []),
    ("FSDP, full shard (config's bf16, no EMA)", "fsdp.yaml", ["--use_ema"]),
]
UPSTREAM_SCRIPT = "upstream script, fp16"  # its row, with --upstream (a name without quotes, for --only)
PHASES = ["start and torch", "imports", "to the first step", "steps", "end"]  # of a child's time (child_train)
NOT_MEASURED = ("skipped", "timed out")  # a row's statuses that leave a kept measurement in place (--keep)
CARDS_GB = [24, 16, 12]
CUDA_CONTEXT_GB = 0.5  # what the CUDA context takes beside PyTorch's allocations, roughly
# The targets, judged on the full run (not the dry run).
TARGETS = [
    ("defaults, fp16: peak allocated <= 20 GB", lambda r: r["defaults, fp16"]["max_allocated_gb"] <= 20),
    ("8-bit AdamW + --offload_ema: peak allocated <= 12 GB",
     lambda r: r["defaults + 8-bit AdamW + --offload_ema, fp16"]["max_allocated_gb"] <= 12),
    ("defaults at least 1.3x faster per optimizer step than the upstream path",
     lambda r: r["upstream path, fp16"]["median_s"] / r["defaults, fp16"]["median_s"] >= 1.3),
]  # fmt: skip


def recipe(add=(), remove=()):
    return [flag for flag in RECIPE if flag not in remove] + list(add)


# ---------------------------------------------------------------------------------------------------------
# Children: one training run (this script's, or upstream's) or the inference timing, in a fresh process.


def child_train(spec):
    """Train as spec says; time each optimizer step by the script's accelerator.log calls; report memory: the peak
    over the whole run, and over the steps after the first (the training itself, without the models' loading, the
    latents' caching and the end's pipeline). With spec["profile"], one more step after the timed ones runs under
    torch.profiler."""
    import accelerate

    stamps, first_peak, later_peak, profiler = [], {}, {}, []
    cuda = torch.cuda.is_available()
    log = accelerate.Accelerator.log

    def timed_log(self, values, *args, **kwargs):
        if "train_loss" in values:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if len(stamps) == 1 and cuda:
                first_peak.update(
                    allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved()
                )
                torch.cuda.reset_peak_memory_stats()
            elif cuda:  # the peak since the first step's log, up to this one
                later_peak["allocated"] = torch.cuda.max_memory_allocated()
            if spec.get("profile") and len(stamps) == spec["warmup"] + spec["steps"]:
                profiler.append(start_profiler())
            elif profiler and len(stamps) == spec["warmup"] + spec["steps"] + 1:
                profiler[0].stop()
        return log(self, values, *args, **kwargs)

    accelerate.Accelerator.log = timed_log
    from sdtoolkit.errors import TrainingStopped, UserError

    if not spec.get("upstream"):
        import train_text_to_image  # noqa: F401 (timed: the libraries' imports)
    imported = time.time()

    status, error = "ok", None
    try:
        if spec.get("upstream"):
            sys.argv = [spec["upstream"], *spec["argv"]]
            runpy.run_path(spec["upstream"], run_name="__main__")
        else:
            import train_text_to_image

            train_text_to_image.main(spec["argv"])
    except torch.OutOfMemoryError:  # upstream's script
        status = "out of memory"
    except TrainingStopped as err:  # this toolkit's: out of memory (its line says what to try), or a NaN loss
        if isinstance(err.__cause__, torch.OutOfMemoryError):
            status = "out of memory"
        else:
            status, error = "failed", str(err)
    except UserError as err:  # the script's one-line errors
        status, error = "failed", str(err)
    if profiler:  # its step is not one of the timed ones
        stamps.pop()
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][-spec["steps"] :]
    peak = lambda key, later: max(first_peak.get(key, 0), later) / 1024**3 if cuda else None  # noqa: E731
    result = {
        "status": status,
        "error": error,
        "step_seconds": seconds,
        "max_allocated_gb": peak("allocated", torch.cuda.max_memory_allocated() if cuda else 0),
        "max_reserved_gb": peak("reserved", torch.cuda.max_memory_reserved() if cuda else 0),
        # Between the first step's log and the last's: training, without what loading, caching and the end took.
        "later_max_allocated_gb": later_peak["allocated"] / 1024**3 if later_peak else None,
    }
    if profiler:
        result["profile"] = profile_summary(profiler[0])
    # What torch.compile did, in a row that compiles: the graphs dynamo built, and the functions it was asked to run
    # (frames) and ran compiled (a frame past its recompile limit runs uncompiled).
    graphs, frames = torch._dynamo.utils.counters["stats"]["unique_graphs"], torch._dynamo.utils.counters["frames"]
    if graphs:
        result["compile"] = {"graphs": graphs, "frames": frames["total"], "compiled_frames": frames["ok"]}
    # Where a fresh child's time went (a fork's start is its parent's): Python's start with torch's import, the
    # other libraries' imports, from there to the end of the first optimizer step (models, data, cache, the first
    # step), the steps after it, and the end (the final pipeline, built but not written).
    if spec.get("spawned") and stamps:
        ends = [spec["spawned"], STARTED, imported, stamps[0] - time.perf_counter() + time.time()]
        ends += [ends[-1] + stamps[-1] - stamps[0], time.time()]
        result["phases_s"] = dict(zip(PHASES, (b - a for a, b in zip(ends, ends[1:]))))
    return result


def start_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def profile_summary(profiler, top=8):
    """One optimizer step under torch.profiler: the time its GPU kernels ran, how many were launched, and the
    operations that took the most CPU time and the most GPU time (milliseconds, summed over their calls)."""
    events = profiler.events()
    kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    cpu_events = [event for event in events if event.device_type == torch.autograd.DeviceType.CPU]
    averages = profiler.key_averages()

    def ranked(key):
        rows = sorted(averages, key=lambda event: -getattr(event, key))[:top]
        return [
            [cell(event.key), event.count, getattr(event, key) / 1000] for event in rows if getattr(event, key) > 0
        ]

    return {
        "kernel_ms": sum(event.time_range.elapsed_us() for event in kernels) / 1000,
        "kernel_launches": sum(1 for event in cpu_events if event.name.startswith(("cudaLaunch", "cuLaunch"))),
        "operations": sum(1 for event in cpu_events if event.name.startswith("aten::")),
        "top_cpu": ranked("self_cpu_time_total"),
        "top_gpu": ranked("self_device_time_total"),
    }


def cell(name, width=80):
    """An operation's name for a table cell: CUDA kernels' names can be C++ templates of hundreds of characters."""
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"


def child_inference(spec):
    """Seconds per image (guidance 7.5), the median of `repeats` after one warm-up, for each scheduler."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    size = spec["resolution"]
    result = {}
    for name, scheduler_cls, steps in (("DPM-Solver++, 25 steps", DPMSolverMultistepScheduler, 25),
                                       ("PNDM, 50 steps", PNDMScheduler, 50)):  # fmt: skip
        pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
        times = []
        for _ in range(1 + spec["repeats"]):
            started = time.perf_counter()
            pipeline("a creature", num_inference_steps=steps, height=size, width=size,
                     generator=torch.Generator(device).manual_seed(0))  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        result[name] = statistics.median(times[1:])
    return {"status": "ok", "seconds": result, "dtype": str(dtype).removeprefix("torch."),
            "caption_accuracy": time_caption_accuracy(pipeline, size, spec["caption_images"])}  # fmt: skip


def time_caption_accuracy(pipeline, size, count):
    """Seconds for metrics.py --caption_data's classifier on `count` bundled images, each tried with their `count`
    captions, after a warm-up with one caption (the same shapes): its cost grows with the square of the number of
    images."""
    from sdtoolkit.learning_check import caption_errors, read_caption_data

    images, captions, _, _, _ = read_caption_data(str(DATA), max_images=count)
    caption_errors(pipeline, images, captions[:1], resolution=size)
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    caption_errors(pipeline, images, captions, resolution=size)
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return {"images": len(images), "seconds": time.perf_counter() - started}


def run_child(kind, spec, launch=None, env=None, timeout=None, log=None, name=None):
    """Run a child in its own process: a fresh one (through `accelerate launch` with a config file when `launch` is
    given), or, without a GPU (the dry run), a fork of this one (see fork_child). A fresh child still running
    after `timeout` seconds is stopped, and its row says so. Its output is added to the file `log`, if given,
    under `name`."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        spec = {**spec, "kind": kind, "result": str(result_file), "spawned": None}
        started, timed_out = time.perf_counter(), False
        if not launch and not torch.cuda.is_available():
            returncode, stderr = fork_child(spec, env, Path(scratch) / "output.txt")
        else:
            spec["spawned"] = time.time()  # for the child's phases (see child_train)
            command = [__file__, "--child", json.dumps(spec)]
            if launch:
                command = ["-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes", "1",
                           "--main_process_port", "0", *command]  # fmt: skip
            # In a session of its own, so that a timeout stops `accelerate launch`'s training process too.
            with subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True) as child:  # fmt: skip
                try:
                    stderr = child.communicate(timeout=timeout)[1]
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    stderr, timed_out = child.communicate()[1], True
            returncode = child.returncode
        wall = time.perf_counter() - started
        if log:
            with open(log, "a") as file:
                file.write(f"===== {name or kind}: exit code {returncode}, {wall:.1f} s\n{stderr}\n")
        if timed_out:
            error = f"stopped after {timeout:.0f} s, at the end of the time budget (--minutes)"
            return {"status": "timed out", "error": error, "wall_s": wall}
        if returncode != 0 or not result_file.exists():
            status = "out of memory" if "OutOfMemoryError" in stderr or "out of memory" in stderr else "failed"
            return {"status": status, "error": error_line(stderr)[:300], "wall_s": wall}
        return {**json.loads(result_file.read_text()), "wall_s": wall}


def error_line(stderr):
    """The line of a failed child's output that says what went wrong: the last exception with a message, or error
    line. Under `accelerate launch` the training process's exception comes before the launcher's own, which has
    none ("ChildFailedError: "), and each of its lines starts with its rank ("[rank0]: "), which is dropped."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if re.search(r"\w(Error|Exception): \S", line) or "error:" in line]
    return said[-1] if said else lines[-1] if lines else ""


def fork_child(spec, env, output):
    """child_main(spec) in a fork of this process (see benchmark.forked), its output written to `output`; (exit
    code, output).

    Without a GPU, each child forks from this process, which has imported the training script once, instead of
    importing torch, diffusers and the script afresh. It is the same function in a process of its own. On a GPU
    every child starts fresh, so that no CUDA state is shared (tests/test_gpu_check.py runs a fresh child on the
    CPU, through the `--child` command line).
    """
    import train_text_to_image  # noqa: F401 (imported here once, for every fork)

    def child():
        os.chdir(REPO)
        os.environ.update(env or {})
        child_main(spec)

    return benchmark.forked(child, output)


def skip_writing_the_pipeline():
    """In a training child: the pipeline a run saves at its end goes with its temporary folder, so it is still
    built but not written (4.3 GB for SD v1-4, several seconds of each row)."""
    import diffusers

    import train_text_to_image

    train_text_to_image.save_pipeline = lambda pipeline, output_dir: None  # this toolkit's script
    diffusers.StableDiffusionPipeline.save_pretrained = lambda self, *args, **kwargs: None  # upstream's


def child_main(spec):
    if spec["kind"] == "train":
        skip_writing_the_pipeline()
    result = child_train(spec) if spec["kind"] == "train" else child_inference(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# The parent: build the model, run every configuration, write the table.


def machine():
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": None, "driver": None, "gpu_memory_gb": None}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"], info["gpu_memory_gb"] = props.name, props.total_memory / 1024**3
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip() or None
        except OSError:
            pass
    return info


def fits(result):
    if result.get("max_reserved_gb") is None:
        return "–"
    need = result["max_reserved_gb"] + CUDA_CONTEXT_GB
    return " ".join(f"{card}:{'yes' if need <= card else 'no'}" for card in CARDS_GB)


def train_table(rows, several_runs=False):
    lines = ["| configuration | status | s / optimizer step (median) | range | max allocated (GiB)"
             " | after step 1 (GiB) | max reserved (GiB) | fits 24 / 16 / 12 GB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, result in rows:
        if result["status"] != "ok" or not result.get("step_seconds"):
            reason = result.get("error") or "no timed steps"
            run = f", run {result['run']}" if several_runs and "run" in result else ""
            lines.append((f"| {name} | {result['status']}: {reason}{run} |" + " – |" * 6).replace("\n", " "))
            continue
        seconds = result["step_seconds"]
        status = f"ok, run {result['run']}" if several_runs else "ok"
        if result.get("process_medians"):
            medians = ", ".join(f"{median:.3f}" for median in result["process_medians"])
            status += f", {len(result['process_medians'])} processes (medians {medians})"
        gb = lambda key: f"{result[key]:.2f}" if result.get(key) is not None else "–"  # noqa: E731
        lines.append(f"| {name} | {status} | {statistics.median(seconds):.3f} | {min(seconds):.3f}–{max(seconds):.3f} |"
                     f" {gb('max_allocated_gb')} | {gb('later_max_allocated_gb')} | {gb('max_reserved_gb')} |"
                     f" {fits(result)} |")  # fmt: skip
    return "\n".join(lines)


def phase_table(rows):
    """Where each fresh child's seconds went (see child_train), and the rest of its wall time (its exit, the
    result's hand-over); empty when no row has them (a dry run's children are forks)."""
    timed = [(name, result) for name, result in rows if result.get("phases_s") and result.get("wall_s")]
    if not timed:
        return []
    lines = ["| configuration | " + " | ".join(PHASES) + " | exit | wall |", "| --- |" + " ---: |" * (len(PHASES) + 2)]
    for name, result in timed:
        phases = [result["phases_s"][phase] for phase in PHASES]
        cells = [*phases, result["wall_s"] - sum(phases), result["wall_s"]]
        lines.append(f"| {name} | " + " | ".join(f"{seconds:.1f}" for seconds in cells) + " |")
    return ["Where each row's seconds went:", "", *lines, ""]


def compile_section(rows):
    """The rows that ran torch.compile: what dynamo built (see child_train); empty when none did."""
    compiled = [(name, result["compile"]) for name, result in rows if result.get("compile")]
    if not compiled:
        return []
    lines = [f"- {name}: graphs {c['graphs']}, frames compiled {c['compiled_frames']} of {c['frames']}"
             for name, c in compiled]  # fmt: skip
    return ["What torch.compile built (dynamo's counts in the training process):", "", *lines, ""]


def profile_section(rows):
    """The rows --profile ran one more step of under torch.profiler (see profile_summary); empty when none did."""
    profiled = [(name, result) for name, result in rows if result.get("profile")]
    if not profiled:
        return []
    lines = ["One optimizer step under torch.profiler (--profile), after the timed ones; the profiler slows the step",
             "it watches, so compare its kernel time with the row's step time above:", ""]  # fmt: skip
    for name, result in profiled:
        summary = result["profile"]
        step = statistics.median(result["step_seconds"]) * 1000 if result.get("step_seconds") else None
        busy = f" ({summary['kernel_ms'] / step:.0%} of the median step)" if step and summary["kernel_ms"] else ""
        lines += [f"**{name}**: GPU kernels ran {summary['kernel_ms']:.0f} ms{busy}; {summary['kernel_launches']}"
                  f" kernel launches, {summary['operations']} aten operations.", "",
                  "| most CPU time (self) | calls | ms | most GPU time (self) | calls | ms |",
                  "| --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
        cpu, gpu = summary["top_cpu"], summary["top_gpu"]
        for i in range(max(len(cpu), len(gpu))):
            cells = [row[i] if i < len(row) else ["", "", None] for row in (cpu, gpu)]
            lines.append("| " + " | ".join(f"`{key}` | {count} | {ms:.1f}" if ms is not None else " |  | "
                                          for key, count, ms in cells) + " |")  # fmt: skip
        lines.append("")
    return lines


def judge(rows):
    """Each target: met, not met, or not measured (a configuration failed or was skipped)."""
    by_name = {}
    for name, result in rows:
        if result["status"] == "ok" and result.get("step_seconds") and result.get("max_allocated_gb") is not None:
            by_name[name] = {**result, "median_s": statistics.median(result["step_seconds"])}
    verdicts = []
    for target, check in TARGETS:
        try:
            verdicts.append((target, "met" if check(by_name) else "not met"))
        except KeyError:
            verdicts.append((target, "not measured"))
    return verdicts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="The tiny preset at 64 px, 2 steps per configuration: the same code path, anywhere.")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None, help="Default: 512, or 64 with --dry-run.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per configuration (default 5; 1 dry).")
    parser.add_argument("--warmup", type=int, default=None, help="Steps before timing (default 2; 1 dry).")
    parser.add_argument("--upstream", default=None, help="Path to upstream's train_text_to_image.py: run it too.")
    parser.add_argument("--distributed", action="store_true", help="Also the DeepSpeed and FSDP configs.")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="Time budget, the model's build included: a configuration still running then is stopped,"
                             " and the ones after it are reported as skipped (default 8).")  # fmt: skip
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="Run only this configuration (its name in the table, or 'inference'); repeat for more,"
                             " in the order given.")  # fmt: skip
    parser.add_argument("--profile", action="append", default=None, metavar="NAME",
                        help="Run one more step of this configuration under torch.profiler, after the timed ones,"
                             " and report its GPU kernel time, kernel launches and top operations; repeat for more.")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="Run each training configuration N times, in turn (A B A B), each in a process of its own,"
                             " and pool their timed steps (default 1).")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="Keep the rows the report at --json measured on the same GPU model, torch and settings,"
                             " and run only the others (and those --only names); the report holds both.")  # fmt: skip
    parser.add_argument("--models", default="build/gpu-check", help="Where the fixture pipeline is built.")
    parser.add_argument("--out", default=None, help="Default: GPU_CHECK.md, or build/gpu-check/ in a dry run.")
    parser.add_argument("--json", default=None, help="Default: gpu_check.json beside --out.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.dry_run else 512)
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.warmup = args.warmup or (1 if args.dry_run else 2)
    # A dry run's table must not replace a GPU's.
    args.out = args.out or ("build/gpu-check/GPU_CHECK.dry-run.md" if args.dry_run else "GPU_CHECK.md")
    args.json = args.json or str(Path(args.out).with_name("gpu_check.json"))
    # Relative paths are the user's folder's; the children run in the repository.
    args.models, args.out, args.json = (str(Path(path).resolve()) for path in (args.models, args.out, args.json))
    if args.upstream:
        args.upstream = str(Path(args.upstream).resolve())
    names = ["inference", UPSTREAM_SCRIPT, *(c[0] for c in CONFIGS), *(d[0] for d in DISTRIBUTED)]
    for name in args.only or []:
        if name not in names:
            parser.error(f"--only {name!r} is none of: " + "; ".join(names))
        if name == UPSTREAM_SCRIPT and not args.upstream:
            parser.error(f"--only {name!r} needs --upstream, the path to upstream's train_text_to_image.py")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    trained = names[1:]  # all but inference
    for name in args.profile or []:
        if name not in trained:
            parser.error(f"--profile {name!r} is none of: " + "; ".join(trained))
        if args.only and name not in args.only:
            parser.error(f"--profile {name!r} is not one of the configurations --only runs")
    return args


def kept_rows(args, info, preset):
    """--keep: (rows, inference, runs) of the report at args.json that this run can keep: its rows from the same GPU
    model and torch, at the same settings, each with the number of the run that measured it; and that report's runs
    (command, machine, seconds). Nothing, with a line saying why, when there are none. A row that ran but did not
    pass (failed, out of memory, timed out) is kept as a result too, and runs again; a skipped one is dropped."""
    path = Path(args.json)
    if not path.exists():
        print(f"--keep: no earlier report at {path}: every row runs", flush=True)
        return [], None, []
    try:
        earlier = json.loads(path.read_text())
        settings = ("preset", "resolution", "steps", "warmup", "dry_run")
        ours = {"preset": preset, **{key: getattr(args, key) for key in settings[1:]}}
        differs = [
            f"{key} {earlier.get(key)} (this run: {ours[key]})" for key in settings if earlier.get(key) != ours[key]
        ]
        for key in ("gpu", "torch"):
            if earlier["machine"][key] != info[key]:
                differs.append(f"{key} {earlier['machine'][key]} (this run: {info[key]})")
        if differs:
            print(f"--keep: {path} was measured with another {', '.join(differs)}: its rows are not kept", flush=True)
            return [], None, []
        runs = earlier.get("runs") or [{"command": earlier["command"], "machine": earlier["machine"],
                                        "seconds": earlier["seconds"]}]  # fmt: skip
        rows = [(name, {"run": 1, **row}) for name, row in earlier["train"].items() if row["status"] != "skipped"]
        # (An inference timed before caption accuracy was runs again, for it.)
        measured = earlier["inference"]["status"] == "ok" and "caption_accuracy" in earlier["inference"]
        inference = {"run": 1, **earlier["inference"]} if measured else None
    except json.JSONDecodeError as err:  # cut off while it was written
        print(f"--keep: {path} is not a whole report ({err}): every row runs", flush=True)
        return [], None, []
    except (KeyError, TypeError, AttributeError) as err:  # edited by hand, or not this script's
        print(f"--keep: {path} lacks what a report of gpu_check.py holds ({type(err).__name__}: {err}): every row"
              " runs", flush=True)  # fmt: skip
        return [], None, []
    print(f"--keep: {len(rows) + (inference is not None)} rows of {path} are kept", flush=True)
    return rows, inference, runs


def pooled(first, then):
    """One row from two processes of the same configuration (--repeat): all their timed steps, each process's
    median, the higher memory peaks; the first's phases."""
    medians = first.get("process_medians") or [statistics.median(first["step_seconds"])]
    row = {**first, "step_seconds": first["step_seconds"] + then["step_seconds"],
           "process_medians": [*medians, statistics.median(then["step_seconds"])]}  # fmt: skip
    for key in ("max_allocated_gb", "max_reserved_gb", "later_max_allocated_gb"):
        peaks = [peak for peak in (first.get(key), then.get(key)) if peak is not None]
        row[key] = max(peaks) if peaks else None
    return row


def write_report(args, command, info, preset, rows, inference, seconds, runs=()):
    """GPU_CHECK.md and gpu_check.json as they stand: written after every row, so a check stopped part-way leaves
    the rows it has. runs: the earlier runs whose rows are kept (--keep)."""
    verdicts = judge(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    runs = [*runs, {"command": command, "machine": info, "seconds": seconds}]
    report = {"command": command, "machine": info, "preset": preset, "resolution": args.resolution,
              "steps": args.steps, "warmup": args.warmup, "dry_run": args.dry_run, "train": dict(rows),
              "inference": inference, "targets": dict(verdicts), "seconds": seconds, "runs": runs}  # fmt: skip
    Path(args.json).write_text(json.dumps(report, indent=2))

    def gpu(info):
        if not info["gpu"]:
            return "none (CPU)"
        return f"{info['gpu']} ({info['gpu_memory_gb']:.0f} GB), driver {info['driver']}"

    if len(runs) == 1:
        how = [f"Command: `python gpu_check.py {command}`, {seconds / 60:.1f} min in all."]
    else:
        how = ["Runs (their rows are kept with --keep, on the same GPU model and torch; each row says its run):", ""]
        how += [f"{i}. `python gpu_check.py {run['command']}` on {gpu(run['machine'])}, {run['seconds'] / 60:.1f} min"
                for i, run in enumerate(runs, 1)]  # fmt: skip
    lines = [
        "# GPU check" + (" (dry run: the tiny preset on the CPU, not a measurement of a GPU)" if args.dry_run else ""),
        "",
        f"Machine: {gpu(info)}; Python {info['python']}, torch {info['torch']}, CUDA {info['cuda']}.",
        "",
        *how,
        "",
        f"The seed's recipe on the `{preset}` preset at {args.resolution} px: batch 1, gradient accumulation 4, EMA,"
        f" gradient checkpointing, lr 1e-5, center crop and flips on the bundled images; {args.warmup} warm-up and"
        f" {args.steps} timed optimizer steps per configuration, each in its own process. 'Fits' adds"
        f" {CUDA_CONTEXT_GB} GiB for the CUDA context to the peak reserved memory (memory in GiB, as torch.cuda"
        " counts it).",
        "",
        train_table(rows, several_runs=len(runs) > 1),
        "",
        *phase_table(rows),
        *compile_section(rows),
        *profile_section(rows),
        "Targets (judged on the full run):",
        "",
        *[
            f"- {target}: **{verdict if not args.dry_run else 'not judged (dry run)'}**"
            for target, verdict in verdicts
        ],
        "",
    ]
    if inference["status"] == "ok":
        by = f" (run {inference['run']})" if len(runs) > 1 else ""
        lines += [f"Inference{by}, one {args.resolution} px image, guidance 7.5, {inference['dtype']}:", "",
                  "| scheduler and steps | seconds per image |", "| --- | ---: |"]  # fmt: skip
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in inference["seconds"].items()]
        timed = inference.get("caption_accuracy")  # (not in the reports of runs before it was measured)
        if timed:
            n, seconds = timed["images"], timed["seconds"]
            lines += ["", f"Caption accuracy (`metrics.py --caption_data`), {n} images each tried with their {n}"
                      f" captions at 5 timesteps: {seconds:.2f} s per model; its default sample of 64 images costs"
                      f" {(64 / n) ** 2:g} times that, about {seconds * (64 / n) ** 2:.0f} s."]  # fmt: skip
    else:
        lines.append(
            f"Inference: {inference['status']}" + (f": {inference['error']}" if inference.get("error") else "")
        )
    Path(args.out).write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; gpu_check.py --dry-run runs the same code path on the CPU")
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    info = machine()
    preset = "tiny" if args.dry_run else "sd-v1-4"
    rows, inference, runs = [], {"status": "not run"}, []
    if args.keep:
        rows, kept_inference, runs = kept_rows(args, info, preset)
        inference = kept_inference or inference
    this_run = len(runs) + 1
    # Each child's output goes to this log, for a row that failed.
    log = Path(args.out).with_name("gpu_check.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    # The pipeline, with random weights, built here (about half a minute for SD v1-4's 1.07 B weights, once).
    model = Path(args.models, preset)  # absolute (parse_args)
    if not model.exists():
        print(f"building the {preset} pipeline in {model} ...", flush=True)
        subprocess.run([sys.executable, "-m", "sdtoolkit.fixtures", "--out", str(model), "--preset", preset],
                       check=True, cwd=REPO)  # fmt: skip

    def run(kind, name, spec, launch=None, env=None):
        """One child within the time budget, or a 'skipped' row once the budget is spent."""
        print(f"{name} ...", flush=True)
        left = deadline - time.perf_counter()
        if left < 10:  # too little to start a child: it would only be stopped
            result = {"status": "skipped", "error": f"the {args.minutes:g}-minute budget (--minutes) was spent"}
        else:
            result = run_child(kind, spec, launch, env, timeout=left, log=log, name=name)
        if result.get("step_seconds"):
            detail = f", {statistics.median(result['step_seconds']):.3f} s/step"
        elif result["status"] != "ok":
            detail = f": {result.get('error')}"
        else:
            detail = ""
        print(f"    {result['status']}{detail}", flush=True)
        return result

    def put(name, result):
        """This run's row: in place of a kept row of that name (unless it was not measured: skipped or stopped by the
        budget), else after the others; then the report. A repeat (--repeat) of a row this run measured adds its
        timed steps to the row's, and its memory peaks count if higher."""
        row = (name, {**result, "run": this_run})
        names = [kept for kept, _ in rows]
        if name in names:
            before = rows[names.index(name)][1]
            if before["run"] == this_run and before.get("step_seconds") and result.get("step_seconds"):
                row = (name, pooled(before, result))
            # A measurement replaces the kept row; so does any outcome but a skip, where the kept row did not pass.
            if result["status"] not in NOT_MEASURED or (before["status"] != "ok" and result["status"] != "skipped"):
                rows[names.index(name)] = row
        else:
            rows.append(row)
        write_report(args, command, info, preset, rows, inference, time.perf_counter() - started, runs)

    def train(name, flags, precision=None, launch=None, env=None, upstream=None):
        profile = name in (args.profile or [])  # one more step, under torch.profiler (see child_train)
        with tempfile.TemporaryDirectory() as out:
            argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(DATA),
                    "--output_dir", out, "--resolution", str(args.resolution),
                    "--max_train_steps", str(args.warmup + args.steps + profile), *flags]  # fmt: skip
            # On a CPU (the dry run) fp16 cannot run: float32 takes its place; bf16 runs as bf16.
            if precision == "fp16" and not torch.cuda.is_available():
                precision = "no"
            # And torch.compile traces the UNet with dynamo but leaves out inductor's code generation, which costs
            # a fresh machine about 50 s of compiling on a CPU, and on a GPU compiles other kernels anyway.
            if (env or {}).get("ACCELERATE_DYNAMO_BACKEND") == "inductor" and not torch.cuda.is_available():
                env = {**env, "ACCELERATE_DYNAMO_BACKEND": "eager"}
            if precision:
                argv += ["--mixed_precision", precision]
            if not upstream:
                argv += ["--checkpointing_steps", "1000000"]
            spec = {"argv": argv, "steps": args.steps, "warmup": args.warmup, "profile": profile, "upstream": upstream}
            result = run("train", name, spec, launch, env)
        put(name, {**result, "mixed_precision": precision or "config"})

    # Inference and upstream's script first, as they are short, then the configurations in CONFIGS's order; or
    # the ones --only names, in its order. With --keep, a row measured already runs only if --only names it.
    # --repeat N goes through the training rows N times, so that the repeats of two rows alternate.
    configs, distributed = {c[0]: c for c in CONFIGS}, {d[0]: d for d in DISTRIBUTED}
    plan = args.only or [
        "inference",
        *([UPSTREAM_SCRIPT] if args.upstream else []),
        *configs,
        *(distributed if args.distributed else []),
    ]
    plan += [name for _ in range(args.repeat - 1) for name in plan if name != "inference"]
    measured = {name for name, row in rows if row["status"] == "ok"}
    measured |= {"inference"} if inference["status"] == "ok" else set()
    for name in plan:
        if name in measured and not args.only and name not in (args.profile or []):
            print(f"{name}: kept (run {dict(rows).get(name, inference)['run']})", flush=True)
            continue
        if name == "inference":
            # (A dry run times the classifier on 4 images, 16 pairs: the same code, a 16th of the work.)
            repeats, images = (1, 4) if args.dry_run else (3, 16)
            spec = {"model": str(model), "resolution": args.resolution, "repeats": repeats, "caption_images": images}
            result = run("inference", name, spec)
            if inference["status"] != "ok" or result["status"] not in NOT_MEASURED:
                inference = {**result, "run": this_run}
        elif name == UPSTREAM_SCRIPT:
            train(name, recipe(), "fp16", upstream=args.upstream)
        elif name in configs:
            _, add, remove, precision, env = configs[name]
            train(name, recipe(add, remove), precision, env=env)
        elif torch.cuda.is_available():
            _, config, remove = distributed[name]
            train(name, recipe(remove=remove), launch=str(REPO / "configs" / "accelerate" / config))
        else:
            put(name, {"status": "skipped", "error": "needs a CUDA GPU"})

    total = time.perf_counter() - started
    write_report(args, command, info, preset, rows, inference, total, runs)
    print(f"wrote {args.out} and {args.json} ({total / 60:.1f} min); each child's output is in {log}")


if __name__ == "__main__":
    main()
