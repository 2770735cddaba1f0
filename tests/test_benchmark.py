"""benchmark.py runs end to end on the tiny workload and writes its table (the sd-v1-4 workload is `make bench`)."""

import subprocess
import sys

import pytest

import benchmark
from tests.conftest import REPO

# All off and all on only, to keep it short (every configuration runs in `make bench`); start-up on 3 images in one
# of the layouts (make bench has all three), and the disk cache on the tiny model; all at 32 px, not 64.
SMALL = """
import sys
import benchmark
benchmark.CONFIGS = [benchmark.CONFIGS[0], benchmark.CONFIGS[4]]
benchmark.LORA_CONFIGS = benchmark.LORA_CONFIGS[:1]
benchmark.STARTUP_COUNTS = [3]
benchmark.STARTUP_LAYOUTS = benchmark.STARTUP_LAYOUTS[:1]
benchmark.WORKLOADS["tiny"]["resolution"] = 32
benchmark.CACHE_WORKLOAD = ("tiny", 32)
benchmark.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_benchmark_writes_a_table_for_the_tiny_workload(tiny_sd, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    # The tests' tiny pipeline where the benchmark would build its own (as `make demo` builds it).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd)
    # In a process of its own whose children fork from it (--fork): the same child functions, without importing
    # torch again for each. (Not from the test's process: a fork of a process whose OpenMP threads have run can hang.)
    result = subprocess.run([sys.executable, "-c", SMALL, "--workloads", "tiny", "--steps", "1", "--warmup", "1",
                             "--models", str(tmp_path / "models"), "--out", str(out), "--fork"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "### tiny: `tiny` preset at 32 px" in text
    for name, _ in (benchmark.CONFIGS[0], benchmark.CONFIGS[4]):
        assert f"| {name} |" in text
    assert "| limit (bare UNet fwd+bwd x4 + fused AdamW) |" in text
    assert "| square crops (defaults) |" in text and "| aspect-ratio buckets |" in text
    assert "| all on + --shuffle_tags |" in text
    # LoRA trains fewer weights than the full fine-tune and writes its adapter files instead of a pipeline.
    full, lora = (next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
                  for name in ("full fine-tune (defaults)", "LoRA rank 4"))  # fmt: skip
    assert 0 < int(lora.split("|")[2].replace(",", "")) < int(full.split("|")[2].replace(",", "")) / 10
    assert "unet/diffusion_pytorch_model.safetensors" in full and "pytorch_lora_weights_kohya.safetensors" in lora
    row = next(line for line in text.splitlines() if line.startswith("| all off"))
    seconds = float(row.split("|")[2])
    assert 0 < seconds < 30
    for layout in benchmark.STARTUP_LAYOUTS[:1]:
        assert f"| {layout} | 3 |" in text
    first, second = (
        next(line for line in text.splitlines() if line.startswith(f"| {run}")) for run in ("first", "second")
    )
    assert 0 <= float(second.split("|")[2]) < float(first.split("|")[2])  # reading the cache beats encoding it
