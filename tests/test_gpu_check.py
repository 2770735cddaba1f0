"""gpu_check.py: its dry run goes through every configuration on the CPU, so the GPU check cannot rot between
GPU visits; out-of-memory and failed configurations become rows, not a crash."""

import json
import logging
import shlex
import subprocess
import sys

import pytest
import torch

import gpu_check
import train_text_to_image
from sdtoolkit.errors import UserError
from tests.conftest import REPO

# The rows the dry run trains in `make test`: the targets' two and regional torch.compile (the script compiles, not
# accelerate; the row reports what dynamo built). Each row costs a CI machine about 5 s, the whole UNet's inductor
# compile 10 s more; the others' flags are each trained by their own feature's tests (tests/test_lora.py compiles
# the whole UNet as accelerate does), and here they are read by the training script's parser.
DRY_RUN_ROWS = [
    "upstream path, fp16",
    "defaults, fp16",
    "defaults + regional torch.compile (inductor), fp16",
]


@pytest.fixture(scope="module")
def dry_run(tiny_sd, tmp_path_factory):
    """`python path/to/gpu_check.py --dry-run` of DRY_RUN_ROWS and inference, from a folder of its own (with the
    tests' tiny pipeline in --models, where it would otherwise build its own: `make demo` builds it the same way):
    that folder, and the command's arguments."""
    folder = tmp_path_factory.mktemp("dry-run")
    (folder / "models").mkdir()
    (folder / "models" / "tiny").symlink_to(tiny_sd)
    only = [arg for name in [*DRY_RUN_ROWS, "inference"] for arg in ("--only", name)]
    argv = ["--dry-run", "--models", str(folder / "models"), *only]
    result = subprocess.run([sys.executable, str(REPO / "gpu_check.py"), *argv], cwd=folder, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, argv


@pytest.mark.slow
def test_the_dry_run_writes_a_row_for_each_configuration_it_runs(dry_run):
    folder, _ = dry_run
    table = (folder / "build" / "gpu-check" / "GPU_CHECK.dry-run.md").read_text()
    report = json.loads((folder / "build" / "gpu-check" / "gpu_check.json").read_text())
    assert "dry run" in table.splitlines()[0]
    assert list(report["train"]) == DRY_RUN_ROWS
    for name in DRY_RUN_ROWS:
        assert any(line.startswith(f"| {name} | ok |") for line in table.splitlines()), name
        outcome = report["train"][name]
        assert outcome["status"] == "ok", (name, outcome)
        assert len(outcome["step_seconds"]) == 1 and outcome["step_seconds"][0] > 0
    # What dynamo built, in the row that compiles, all of it compiled (today the UNet's blocks are 2 graphs).
    for name in DRY_RUN_ROWS:
        built = report["train"][name].get("compile")
        assert (built is not None) == ("torch.compile" in name), name
        if built:
            assert built["graphs"] >= 1 and built["compiled_frames"] == built["frames"], (name, built)
            assert f"- {name}: graphs {built['graphs']}, frames compiled" in table
    for target, _ in gpu_check.TARGETS:
        assert f"- {target}: **not judged (dry run)**" in table
    assert set(report["inference"]["seconds"]) == {"DPM-Solver++, 25 steps", "PNDM, 50 steps"}
    assert (
        report["inference"]["caption_accuracy"]["images"] == 4
        and report["inference"]["caption_accuracy"]["seconds"] > 0
    )
    assert "Caption accuracy (`metrics.py --caption_data`), 4 images each tried with their 4 captions" in table
    assert not (folder / "GPU_CHECK.md").exists()  # a dry run never replaces a GPU's table


def test_every_configuration_is_one_the_training_script_reads(tmp_path):
    # So that no row's flags rot between GPU visits, also those the dry run above does not train.
    for name, add, remove, _, _ in gpu_check.CONFIGS:
        argv = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data", "--output_dir", str(tmp_path),
                *gpu_check.recipe(add, remove)]  # fmt: skip
        try:
            args = train_text_to_image.parse_args(argv)
        except UserError as err:  # 8-bit AdamW alone, which a CPU without torchao lacks, says so
            assert "--use_8bit_adam" in add and "torchao" in str(err), (name, err)
            continue
        assert args.use_ema and args.gradient_accumulation_steps * args.train_batch_size == 4, name
        assert args.gradient_checkpointing == ("--gradient_checkpointing" not in remove), name
    assert set(DRY_RUN_ROWS) <= {name for name, *_ in gpu_check.CONFIGS}


@pytest.mark.parametrize("script", ["toolkit", "upstream"])
def test_out_of_memory_is_a_status_not_a_crash(monkeypatch, tmp_path, script):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The toolkit's script turns it into its one line (see its main); upstream's lets it through.
    monkeypatch.setattr(train_text_to_image, "fine_tune" if script == "toolkit" else "main", out_of_memory)
    argv = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", str(tmp_path)]
    result = gpu_check.child_train({"argv": argv, "steps": 2})
    assert result["status"] == "out of memory" and result["step_seconds"] == []
    table = gpu_check.train_table([("defaults, fp16", result), ("next", {"status": "ok", "step_seconds": [1.0, 3.0],
                                   "max_allocated_gb": 10.0, "max_reserved_gb": 14.0})])  # fmt: skip
    assert "| defaults, fp16 | out of memory: no timed steps |" in table
    assert "| next | ok | 2.000 | 1.000–3.000 | 10.00 | – | 14.00 | 24:yes 16:yes 12:no |" in table


def test_a_failing_configuration_reports_its_error_line(tmp_path, monkeypatch):
    # Without a GPU a training child is a fork of this process. (With one, a fresh process, whose output is read the
    # same way: test_a_fresh_childs_seconds_are_split_into_phases starts one, at 10 s of a CI machine.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = gpu_check.run_child("train", {"argv": argv, "steps": 1})
    assert result["status"] == "failed"
    assert result["error"] == f"the training dataset is empty: '{tmp_path}' holds no training rows"


def test_a_forked_child_that_crashes_is_a_failed_row(monkeypatch):
    def crash(argv):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(train_text_to_image, "main", crash)  # the fork inherits it
    result = gpu_check.run_child("train", {"argv": [], "steps": 1})
    assert result["status"] == "failed" and result["error"] == "RuntimeError: something nobody foresaw"


def test_a_launched_childs_error_is_its_own_not_the_launchers():
    # The end of the GPU check's DeepSpeed row: the training process's exception, then accelerate's launcher's.
    stderr = """[rank0]:     torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1 - decay)
[rank0]: RuntimeError: expected dtype float for `end` but got dtype c10::Half
E1128 05:54:45.840000 2573 torch/distributed/elastic/multiprocessing/api.py:986] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""
    assert gpu_check.error_line(stderr) == "RuntimeError: expected dtype float for `end` but got dtype c10::Half"
    assert (
        gpu_check.error_line("loading\nerror: the training dataset is empty\n")
        == "error: the training dataset is empty"
    )
    assert gpu_check.error_line("Killed\n") == "Killed"


def test_targets_are_met_not_met_or_not_measured():
    def ok(seconds, allocated):
        return {"status": "ok", "step_seconds": [seconds], "max_allocated_gb": allocated, "max_reserved_gb": allocated}

    rows = [("upstream path, fp16", ok(2.0, 26.0)), ("defaults, fp16", ok(1.0, 19.0)),
            ("defaults + 8-bit AdamW + --offload_ema, fp16", {"status": "out of memory"})]  # fmt: skip
    verdicts = dict(gpu_check.judge(rows))
    assert list(verdicts.values()) == ["met", "not measured", "met"]
    rows[1] = ("defaults, fp16", ok(1.8, 21.0))
    assert list(dict(gpu_check.judge(rows)).values()) == ["not met", "not measured", "not met"]


def test_a_child_past_the_time_budget_is_stopped_and_the_rest_are_skipped(tiny_sd, tmp_path, monkeypatch):
    # As on a GPU, the child is a fresh process: one second is too little for it even to import the libraries.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    log = tmp_path / "gpu_check.log"
    argv = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", str(REPO / "data" / "creatures"),
            "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "1"]  # fmt: skip
    result = gpu_check.run_child("train", {"argv": argv, "steps": 1}, timeout=1, log=log, name="slow one")
    assert result["status"] == "timed out" and 1 <= result["wall_s"] < 10
    assert log.read_text().startswith("===== slow one: exit code -9")

    # With the budget spent before the first row, every row is a skipped one, and the table is still written.
    monkeypatch.undo()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd)
    out = tmp_path / "GPU_CHECK.md"
    gpu_check.main(["--dry-run", "--minutes", "0", "--models", str(tmp_path / "models"), "--out", str(out)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["inference"]["status"] == "skipped"
    assert [row["status"] for row in report["train"].values()] == ["skipped"] * len(gpu_check.CONFIGS)
    assert "| defaults, fp16 | skipped: the 0-minute budget (--minutes) was spent | – |" in out.read_text()


def test_only_runs_the_named_configurations_in_its_order(tiny_sd, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd)
    only = ["--only", "LoRA rank 4, fp16", "--only", "inference", "--only", "upstream path, fp16"]
    gpu_check.main(["--dry-run", "--minutes", "0", "--models", str(tmp_path / "models"), "--out",
                    str(tmp_path / "GPU_CHECK.md"), *only])  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["train"]) == ["LoRA rank 4, fp16", "upstream path, fp16"]
    assert report["command"].endswith("--only 'LoRA rank 4, fp16' --only inference --only 'upstream path, fp16'")
    assert [line for line in capsys.readouterr().out.splitlines() if line.endswith(" ...")] == [
        "LoRA rank 4, fp16 ...", "inference ...", "upstream path, fp16 ..."
    ]  # fmt: skip
    # A name that is no configuration's, or the upstream script's without --upstream, is refused by name.
    for name, says in (("defaults fp16", "is none of: inference; upstream script, fp16; upstream path, fp16;"),
                       (gpu_check.UPSTREAM_SCRIPT, "needs --upstream")):  # fmt: skip
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--only", name])
        assert says in capsys.readouterr().err


def test_a_training_child_builds_the_final_pipeline_but_does_not_write_it(tiny_sd, tmp_path, monkeypatch, caplog):
    # What skip_writing_the_pipeline replaces comes back after the test (monkeypatch restores what it set).
    import diffusers

    monkeypatch.setattr(train_text_to_image, "save_pipeline", train_text_to_image.save_pipeline)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained",
                        diffusers.StableDiffusionPipeline.save_pretrained)  # fmt: skip
    gpu_check.skip_writing_the_pipeline()
    with caplog.at_level(logging.INFO):
        train_text_to_image.main(["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir",
                                  str(REPO / "data" / "creatures"), "--output_dir", str(tmp_path), "--resolution",
                                  "32", "--max_train_steps", "1"])  # fmt: skip
    assert "Saved the fine-tuned pipeline" in caplog.text and (tmp_path / "README.md").exists()  # the run ended
    assert not (tmp_path / "model_index.json").exists() and not (tmp_path / "unet").exists()


@pytest.mark.slow
def test_keep_runs_only_the_rows_not_measured_on_this_gpu_yet(dry_run, tmp_path, capsys):
    # A short GPU visit measures some rows (the dry run's); the next, with --keep, keeps them and runs the rest (here
    # with no time left: skipped), and the report names both runs. A report from another GPU keeps nothing.
    folder, argv = dry_run
    first = json.loads((folder / "build" / "gpu-check" / "gpu_check.json").read_text())
    (tmp_path / "gpu_check.json").write_text(json.dumps(first))
    common = ["--dry-run", "--models", str(folder / "models"), "--out", str(tmp_path / "GPU_CHECK.md")]
    gpu_check.main([*common, "--keep", "--minutes", "0"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    kept = report["train"]["defaults, fp16"]
    assert kept["run"] == 1 and kept["step_seconds"] == first["train"]["defaults, fp16"]["step_seconds"]
    assert report["inference"]["run"] == 1 and report["inference"]["seconds"] == first["inference"]["seconds"]
    others = [row for name, row in report["train"].items() if name not in DRY_RUN_ROWS]
    assert len(others) == len(gpu_check.CONFIGS) - len(DRY_RUN_ROWS)
    assert all(row["status"] == "skipped" and row["run"] == 2 for row in others)
    assert [run["command"] for run in report["runs"]] == [shlex.join(argv), report["command"]]
    table = (tmp_path / "GPU_CHECK.md").read_text()
    assert "| defaults, fp16 | ok, run 1 |" in table and "2. `python gpu_check.py --dry-run" in table
    assert "defaults, fp16: kept (run 1)" in capsys.readouterr().out
    # Named by --only, a kept row runs again; a run that is not a measurement (out of time) leaves the kept one.
    gpu_check.main([*common, "--keep", "--minutes", "0", "--only", "defaults, fp16"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["train"]["defaults, fp16"] == kept
    # An inference timed before caption accuracy was is not kept: it runs again (here: no time, skipped).
    del first["inference"]["caption_accuracy"]
    (tmp_path / "gpu_check.json").write_text(json.dumps(first))
    gpu_check.main([*common, "--keep", "--minutes", "0"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["inference"]["status"] == "skipped"
    # Measured on another GPU, nothing is kept.
    report["machine"]["gpu"] = "NVIDIA H200"
    (tmp_path / "gpu_check.json").write_text(json.dumps(report))
    gpu_check.main([*common, "--keep", "--minutes", "0"])
    assert "gpu NVIDIA H200 (this run: None): its rows are not kept" in capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {row["status"] for row in report["train"].values()} == {"skipped"} and len(report["runs"]) == 1
    # A report cut off while it was written keeps nothing either.
    (tmp_path / "gpu_check.json").write_text('{"command": "--dry-run", "train": {"defaults, fp16": {"stat')
    gpu_check.main([*common, "--keep", "--minutes", "0"])
    assert "is not a whole report" in capsys.readouterr().out
    # So does JSON that is not such a report: one line says what it lacks.
    for text, lacks in (('{"preset": "tiny"}', "(KeyError: 'machine')"), ("[1, 2]", "(AttributeError: 'list'")):
        (tmp_path / "gpu_check.json").write_text(text)
        gpu_check.main([*common, "--keep", "--minutes", "0"])
        assert f"lacks what a report of gpu_check.py holds {lacks}" in capsys.readouterr().out


def test_keep_shows_a_row_that_did_not_pass_until_a_later_run_has_an_outcome(tiny_sd, tmp_path, monkeypatch, capsys):
    # A timed-out or failed row is a result too (torch.compile ran past its time; DeepSpeed failed): --keep keeps it
    # in the table, runs it again, and a skip in the later run does not erase it; any other outcome does.
    outcomes = iter([{"status": "timed out", "error": "stopped after 60 s", "wall_s": 60.0}])
    monkeypatch.setattr(gpu_check, "run_child", lambda *args, **kwargs: next(outcomes))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd)
    common = ["--dry-run", "--models", str(tmp_path / "models"), "--out", str(tmp_path / "GPU_CHECK.md"), "--keep"]
    gpu_check.main([*common, "--minutes", "0"])  # every row skipped: a report to start from
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    report["train"]["defaults, bf16"] = {"status": "failed", "error": "RuntimeError: expected dtype float", "run": 1}
    (tmp_path / "gpu_check.json").write_text(json.dumps(report))

    gpu_check.main([*common, "--minutes", "0"])
    train = json.loads((tmp_path / "gpu_check.json").read_text())["train"]
    assert train["defaults, bf16"] == {"status": "failed", "error": "RuntimeError: expected dtype float", "run": 1}
    assert (
        "| defaults, bf16 | failed: RuntimeError: expected dtype float, run 1 |"
        in (tmp_path / "GPU_CHECK.md").read_text()
    )
    out = capsys.readouterr().out
    assert "--keep: 1 rows of" in out and "defaults, bf16: kept" not in out  # kept in the table, tried again

    gpu_check.main([*common, "--minutes", "1", "--only", "defaults, bf16"])
    row = json.loads((tmp_path / "gpu_check.json").read_text())["train"]["defaults, bf16"]
    assert row["status"] == "timed out" and row["run"] == 3


def test_a_fresh_childs_seconds_are_split_into_phases(tiny_sd, tmp_path, monkeypatch):
    # As on a GPU, the child is a fresh process (it trains on the CPU): its row says where its time went.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", str(REPO / "data" / "creatures"),
            "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "3"]  # fmt: skip
    result = gpu_check.run_child("train", {"argv": argv, "steps": 2})
    assert result["status"] == "ok", result
    phases = result["phases_s"]
    assert list(phases) == gpu_check.PHASES and all(seconds >= 0 for seconds in phases.values())
    assert phases["imports"] > 0.5  # diffusers, transformers and the script, in a process of its own
    assert abs(phases["steps"] - sum(result["step_seconds"])) < 0.01
    assert sum(phases.values()) <= result["wall_s"] < sum(phases.values()) + 10
    table = gpu_check.phase_table([("defaults, fp16", result), ("forked", {"status": "ok", "wall_s": 1.0})])
    assert table[2].startswith("| configuration | start and torch | imports | to the first step | steps | end |")
    assert len(table) == 6 and table[4].startswith("| defaults, fp16 | ")


def test_the_first_step_and_the_profiled_one_are_kept_apart(monkeypatch):
    # A fake GPU and clock, set by a fake training: loading, caching and the first step peak at 9 GiB, the later
    # steps at 6; the steps take 1, 2 and 3 s, and the profiled one after them 100 s.
    import accelerate

    gib, memory, clock = 1024**3, {"peak": 0}, {"now": 0.0}
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: memory["peak"] * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: (memory["peak"] + 1) * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: memory.update(peak=0))
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock["now"])
    profiled = []  # the clock when the profiler started and stopped

    def start_profiler():
        profiled.append(clock["now"])
        return type("Profiler", (), {"stop": lambda self: profiled.append(clock["now"])})()

    monkeypatch.setattr(gpu_check, "start_profiler", start_profiler)
    monkeypatch.setattr(gpu_check, "profile_summary", lambda profiler: {"watched": profiled[-1] - profiled[0]})

    def train(argv):
        for peak, seconds in ((9, 1), (5, 2), (6, 3), (6, 100)):  # each optimizer step, then its log
            memory["peak"], clock["now"] = max(memory["peak"], peak), clock["now"] + seconds
            accelerate.Accelerator.log(None, {"train_loss": 0.1})
        memory["peak"] = max(memory["peak"], 7)  # the end: the final pipeline

    monkeypatch.setattr(train_text_to_image, "main", train)
    result = gpu_check.child_train({"argv": [], "steps": 2, "warmup": 1, "profile": True})
    assert result["step_seconds"] == [2, 3] and result["profile"] == {"watched": 100} and len(profiled) == 2
    assert result["max_allocated_gb"] == 9 and result["max_reserved_gb"] == 10
    assert result["later_max_allocated_gb"] == 6  # not the end's 7
    table = gpu_check.train_table([("defaults, fp16", result)])
    assert "| 9.00 | 6.00 | 10.00 | 24:yes 16:yes 12:yes |" in table


def test_profile_runs_one_more_step_under_the_profiler(tiny_sd, tmp_path, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "log", accelerate.Accelerator.log)  # child_train wraps it
    # One warm-up, one timed step, and the profiled one after them (the parent adds it to --max_train_steps).
    argv = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", str(REPO / "data" / "creatures"),
            "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "4"]  # fmt: skip
    result = gpu_check.child_train({"argv": argv, "steps": 1, "warmup": 2, "profile": True})
    assert result["status"] == "ok" and len(result["step_seconds"]) == 1
    profile = result["profile"]
    # One optimizer step is 4 micro-batches of the UNet's forward, recomputed forward and backward.
    assert profile["operations"] > 4 * 1000
    assert profile["kernel_ms"] == 0 and profile["kernel_launches"] == 0  # no GPU here
    assert 0 < len(profile["top_cpu"]) <= 8 and profile["top_gpu"] == []
    section = gpu_check.profile_section([("defaults, fp16", result), ("not profiled", {"status": "ok"})])
    assert section[3].startswith(
        f"**defaults, fp16**: GPU kernels ran 0 ms; 0 kernel launches, {profile['operations']}"
    )
    assert len(section) == 3 + 1 + 1 + 2 + len(profile["top_cpu"]) + 1 and "not profiled" not in "".join(section)


def test_profile_names_a_training_configuration_that_runs(capsys):
    for argv, error in [(["--profile", "inference"], "--profile 'inference' is none of: upstream script, fp16;"),
                        (["--only", "defaults, fp16", "--profile", "defaults, bf16"],
                         "--profile 'defaults, bf16' is not one of the configurations --only runs")]:  # fmt: skip
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--dry-run", *argv])
        assert error in capsys.readouterr().err


def test_repeat_runs_the_rows_in_turn_and_pools_their_steps(tiny_sd, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeat", "0"])
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
    # Each child is made up here: its one timed step takes as many seconds as children ran before it.
    started = []

    def child(kind, spec, launch=None, env=None, timeout=None, log=None, name=None):
        started.append(name)
        if kind == "inference":
            return {"status": "ok", "seconds": {"PNDM, 50 steps": 1.0}, "dtype": "float32", "wall_s": 1.0}
        return {"status": "ok", "step_seconds": [float(len(started))], "max_allocated_gb": None, "wall_s": 1.0}

    monkeypatch.setattr(gpu_check, "run_child", child)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd)
    only = ["--only", "defaults, fp16", "--only", "upstream path, fp16", "--only", "inference"]
    gpu_check.main(["--dry-run", "--repeat", "2", "--models", str(tmp_path / "models"), "--out",
                    str(tmp_path / "GPU_CHECK.md"), *only])  # fmt: skip
    assert started == ["defaults, fp16", "upstream path, fp16", "inference", "defaults, fp16", "upstream path, fp16"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["train"]["defaults, fp16"]["step_seconds"] == [1.0, 4.0]
    assert report["train"]["upstream path, fp16"]["process_medians"] == [2.0, 5.0]
    assert (
        "| defaults, fp16 | ok, 2 processes (medians 1.000, 4.000) | 2.500 | 1.000–4.000 |"
        in (tmp_path / "GPU_CHECK.md").read_text()
    )


def test_pooled_rows_keep_the_higher_memory_peaks():
    first = {"status": "ok", "step_seconds": [1.0, 3.0], "max_allocated_gb": 9.0, "max_reserved_gb": 10.0,
             "later_max_allocated_gb": None, "phases_s": {"steps": 4.0}}  # fmt: skip
    then = {"status": "ok", "step_seconds": [5.0], "max_allocated_gb": 8.0, "max_reserved_gb": 11.0,
            "later_max_allocated_gb": 6.0, "phases_s": {"steps": 5.0}}  # fmt: skip
    row = gpu_check.pooled(gpu_check.pooled(first, then), {**then, "step_seconds": [7.0]})
    assert row["step_seconds"] == [1.0, 3.0, 5.0, 7.0] and row["process_medians"] == [2.0, 5.0, 7.0]
    assert (row["max_allocated_gb"], row["max_reserved_gb"], row["later_max_allocated_gb"]) == (9.0, 11.0, 6.0)
    assert row["phases_s"] == {"steps": 4.0}


def test_a_profiled_step_is_summed_as_on_a_gpu():
    # What torch.profiler gives on CUDA, made up: two kernels (3 ms and 5 ms), launched by two CPU calls, under
    # three aten operations; the summary adds them up and ranks the operations.
    from types import SimpleNamespace as Event

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernel = "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>" * 2

    def event(name, device, ms=0.5):  # a CPU event's time is CPU time, not the GPU's
        return Event(name=name, device_type=device, time_range=Event(elapsed_us=lambda: ms * 1000))

    events = [event("aten::mm", cpu), event("aten::add", cpu), event("aten::mm", cpu), event("cudaLaunchKernel", cpu),
              event("cuLaunchKernel", cpu), event(kernel, cuda, 3.0), event("elementwise", cuda, 5.0)]  # fmt: skip
    averages = [Event(key="aten::mm", count=2, self_cpu_time_total=900.0, self_device_time_total=0.0),
                Event(key=kernel, count=1, self_cpu_time_total=0.0, self_device_time_total=3000.0),
                Event(key="elementwise", count=1, self_cpu_time_total=0.0, self_device_time_total=5000.0)]  # fmt: skip
    profiler = Event(events=lambda: events, key_averages=lambda: averages)
    summary = gpu_check.profile_summary(profiler)
    assert (summary["kernel_ms"], summary["kernel_launches"], summary["operations"]) == (8.0, 2, 3)
    assert summary["top_cpu"] == [["aten::mm", 2, 0.9]]
    assert summary["top_gpu"] == [["elementwise", 1, 5.0], [gpu_check.cell(kernel), 1, 3.0]]
    section = gpu_check.profile_section([("defaults, fp16", {"step_seconds": [0.016], "profile": summary})])
    assert section[3].startswith("**defaults, fp16**: GPU kernels ran 8 ms (50% of the median step); 2 kernel")


def test_a_long_kernel_name_fits_its_table_cell():
    kernel = "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>(Params)" * 3
    assert len(gpu_check.cell(kernel)) == 80 and gpu_check.cell(kernel).endswith("…")
    assert gpu_check.cell("aten::mm") == "aten::mm" and gpu_check.cell("a|b") == "a/b"  # no cell break
