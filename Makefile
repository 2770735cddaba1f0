# make setup  - create .venv, install requirements.txt and sdtoolkit (done by demo and test when missing or stale)
# make demo   - fine-tune the tiny offline pipeline on the bundled data, score it, say where things are
# make test   - the offline test suite (HF_HUB_OFFLINE=1), slow tests included
# make lint   - ruff lint and format check
# make bench  - measure the speed and memory options, write BENCHMARKS.md (about 35 minutes on 2 CPU cores)
# make gpu-check  - on a CUDA GPU: the seed's recipe at 512 px per configuration, write GPU_CHECK.md
# make gpu-wheels - download into .whl/ the wheels gpu_check.py needs on a GPU machine without network

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint bench gpu-check gpu-wheels

setup: $(STAMP)

# pip byte-compiles what it installs on one core (a minute and a half here); compileall does it on every core, in
# about 40 s. (Its exit code is not 0: a few test files of torch's are for newer Pythons, as pip also finds.)
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	$(BIN)/python -m pip install -qq --no-deps -e .
	touch $(STAMP)

$(DEMO)/tiny-sd: | $(STAMP)
	$(BIN)/python -m sdtoolkit.fixtures --preset tiny --out $(DEMO)/tiny-sd

$(DEMO)/tiny-clip: | $(STAMP)
	$(BIN)/python -m sdtoolkit.fixtures --preset tiny-clip --out $(DEMO)/tiny-clip

demo: $(STAMP) $(DEMO)/tiny-sd $(DEMO)/tiny-clip
	rm -rf $(DEMO)/sd-demo-model $(DEMO)/clip-scores
	LAUNCH_ARGS="--num_processes=1 --num_machines=1 --mixed_precision=no --dynamo_backend=no" \
	MODEL_NAME=$(DEMO)/tiny-sd DATASET_NAME=data/creatures OUTPUT_DIR=$(DEMO)/sd-demo-model \
	bash train.sh --mixed_precision=no --resolution=32 --train_batch_size=8 --gradient_accumulation_steps=1 \
		--max_train_steps=600 --checkpointing_steps=300 --learning_rate=2e-3 --seed=0 \
		--validation_epochs=50 --validation_prompts "a round green creature with two eyes" \
		"a tall red creature with pointy ears and a long tail"
	$(BIN)/python metrics.py --model_path $(DEMO)/tiny-sd $(DEMO)/sd-demo-model/checkpoint-300 $(DEMO)/sd-demo-model \
		--clip_model $(DEMO)/tiny-clip \
		--seeds 0 1 --num_inference_steps 10 --resolution 32 --caption_data data/creatures \
		--reference_data data/creatures --output_dir $(DEMO)/clip-scores
	@echo
	@echo "Demo done. Everything is under $(DEMO)/:"
	@echo "  fine-tuned pipeline:  $(DEMO)/sd-demo-model  (StableDiffusionPipeline.from_pretrained loads it)"
	@echo "  checkpoints:          $(DEMO)/sd-demo-model/checkpoint-300, checkpoint-600"
	@echo "  validation images:    $(DEMO)/sd-demo-model/validation/  and val_imgs_grid.png"
	@echo "  model card:           $(DEMO)/sd-demo-model/README.md"
	@echo "  evaluation:           $(DEMO)/clip-scores/report.md, scores.json, scores.csv, grid-*.png, nearest-*.png"
	@echo "  TensorBoard logs:     $(DEMO)/sd-demo-model/logs  (tensorboard --logdir $(DEMO)/sd-demo-model/logs)"
	@echo "  base (random) model:  $(DEMO)/tiny-sd, scored with the random CLIP model $(DEMO)/tiny-clip"
	@echo "  serve it:             $(BIN)/python gradio_app.py --model_path $(DEMO)/sd-demo-model  (page, OpenAI-compatible /v1, AUTOMATIC1111's /sdapi/v1)"
	@echo
	@echo "What the numbers mean: caption accuracy is the share of the 32 training images for which the model,"
	@echo "used as a diffusion classifier, picks the image's own caption out of all 32 (chance 1/32); its rise from"
	@echo "base to checkpoint-300 (half way, with its EMA weights) to fine-tuned shows the model learned its"
	@echo "captions, and each 'Paired caption accuracy' line says whether its rise over the base is more than 32"
	@echo "images can show by chance. It does not show image quality or any skill beyond the training images. The"
	@echo "CLIP scores, the distances to the data and the near-copy share come from a random CLIP model, which sees"
	@echo "every image as a near-copy: mechanics, not quality."

# Everything this machine can run, the slow tests included (plain `pytest` skips those for quick runs), in
# TEST_WORKERS processes (pytest-xdist; a test file stays in one, the longest files first: tests/conftest.py) with
# one torch thread each: on 2 cores, 10 to 11.5 min (2026-11-29); one process with two threads took 16 min at 434
# tests.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# 8-bit AdamW on a CPU comes from torchao, which only the benchmark needs (GPU users get bitsandbytes).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet torchao==0.18.0
	$(BIN)/python benchmark.py

# The GPU check runs with whatever python has torch (a GPU machine's own, with the wheels below on its path).
gpu-check:
	$(PYTHON) gpu_check.py

# What a GPU machine with torch, accelerate, transformers, huggingface_hub, tensorboard and pyarrow still lacks,
# for its Python (GPU_PYTHON): bitsandbytes (43 MB) for --use_8bit_adam, as upstream (torchao, the CPU's 8-bit
# AdamW, compiles for minutes there). transformers is left to the machine's own (5.17 there, which the tests pass
# with): with it, the wheels would not fit a 64 MiB transfer. DeepSpeed (for gpu_check.py --distributed) and its
# needs go to .whl/distributed/, to install only for that: accelerate imports DeepSpeed whenever transformers
# saves a model. DeepSpeed is built here as a pure-Python wheel; its ops compile there with nvcc. About 59 MB.
GPU_PYTHON ?= 3.12
GPU_WHEELS := diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.0 \
	open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 bitsandbytes==0.50.2
GPU_DISTRIBUTED_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_PLATFORMS := --python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d .whl/distributed \
		$(GPU_DISTRIBUTED_WHEELS)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl/distributed deepspeed==0.19.8
