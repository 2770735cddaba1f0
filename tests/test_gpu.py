"""On a CUDA GPU (marked `gpu`, skipped elsewhere): half-precision training (the text encoder's too), the held-out
loss in fp16, 8-bit AdamW, xformers, and metrics.py and gradio_app.py in fp16. `pytest -m gpu` runs these and the
other files' gpu tests."""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import metrics
from sdtoolkit.extract_lora import main as extract_lora
from sdtoolkit.inference import load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import cutout_folder, logged_losses, rank_two_change, train, tuned_copy, unet_weights

pytestmark = pytest.mark.gpu


def trains(tiny_sd, out, *flags, **data):
    """Two steps with EMA and gradient checkpointing; the losses are finite and the UNet moved."""
    train(tiny_sd, out, "--max_train_steps", "2", "--gradient_checkpointing", "--use_ema", "--learning_rate", "1e-3",
          *flags, **data)  # fmt: skip
    losses = [loss for _, loss in logged_losses(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    base, tuned = unet_weights(Path(tiny_sd) / "unet"), unet_weights(Path(out) / "unet")
    assert tuned["conv_in.weight"].dtype == torch.float32
    assert not torch.equal(base["conv_in.weight"], tuned["conv_in.weight"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_half_precision_step_trains_and_validates(tiny_sd, tmp_path, precision):
    trains(tiny_sd, tmp_path, "--mixed_precision", precision, "--validation_prompts", "a creature")
    image = Image.open(tmp_path / "validation" / "final" / "00.png")
    assert image.size == (32, 32) and len(set(image.getdata())) > 1  # a picture, not a blank (NaN) one


def test_the_whole_text_encoder_trains_in_fp16(tiny_sd, tmp_path):
    # float32 weights under fp16 autocast and the gradient scaler, with its EMA and gradient checkpointing.
    trains(
        tiny_sd, tmp_path, "--mixed_precision", "fp16", "--train_text_encoder", "--validation_prompts", "a creature"
    )
    base, tuned = (
        load_file(str(Path(folder) / "text_encoder" / "model.safetensors")) for folder in (tiny_sd, tmp_path)
    )
    assert all(torch.isfinite(tuned[key]).all() and tuned[key].dtype == torch.float32 for key in tuned)
    assert not all(torch.equal(base[key], tuned[key]) for key in base)


def test_masked_loss_trains_in_fp16_from_the_cache(tiny_sd, tmp_path):
    # Center crops: the masks come from the latent cache, stored in float16 beside the latents.
    trains(tiny_sd, tmp_path / "out", "--mixed_precision", "fp16", "--masked_loss", "--center_crop", "--random_flip",
           data=cutout_folder(tmp_path / "data"))  # fmt: skip


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]], ids=["full", "lora"])
def test_the_held_out_loss_is_measured_in_fp16(tiny_sd, tmp_path, lora):
    train(tiny_sd, tmp_path, "--max_train_steps", "2", "--use_ema", "--gradient_checkpointing", "--mixed_precision",
          "fp16", "--validation_split", "0.25", *lora)  # fmt: skip
    losses = logged_losses(tmp_path, tag="validation_loss")
    assert [step for step, _ in losses] == [0, 2] and all(torch.isfinite(torch.tensor([v for _, v in losses])))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_attention_trains(tiny_sd, tmp_path):
    trains(tiny_sd, tmp_path, "--mixed_precision", "fp16", "--enable_xformers_memory_efficient_attention")


def test_metrics_scores_in_fp16_on_cuda(tiny_sd, tiny_clip, tmp_path):
    common = ["--clip_model", tiny_clip, "--num_inference_steps", "2", "--resolution", "32", "--device", "cuda"]
    half = metrics.main(["--model_path", tiny_sd, "--output_dir", str(tmp_path / "half"), *common])
    full = metrics.main(
        ["--model_path", tiny_sd, "--output_dir", str(tmp_path / "full"), *common, "--dtype", "float32"]
    )
    # fp16 and fp32 make nearly the same images, so nearly the same score; a NaN image would not.
    assert half["models"][0]["clip_score"] == pytest.approx(full["models"][0]["clip_score"], abs=1.0)


def test_the_demos_image_service_generates_in_fp16_on_cuda(tiny_sd):
    # What the demo's page and its APIs call, without Gradio (which a GPU machine without network may lack: its
    # wheels are too big to carry there).
    pipeline = load_pipeline(tiny_sd, torch.device("cuda"), torch.float16)
    service = ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=1))
    images = service.generate(prompt="pikachu", negative_prompt="", steps=3, guidance_scale=7.5, seed=7,
                              scheduler="DPM-Solver++", width=64, height=64, num_images=2)  # fmt: skip
    assert [image.size for image in images] == [(64, 64)] * 2 and all(len(set(i.getdata())) > 1 for i in images)


def test_the_demo_generates_in_fp16_on_cuda(tiny_sd):
    pytest.importorskip("gradio")
    from gradio_client import Client

    import gradio_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = gradio_app.parse_args(["--model_path", tiny_sd, "--port", str(port), "--device", "cuda"])
    app = gradio_app.launch(args, block=False)
    try:
        gallery, _ = Client(app.local_url, verbose=False).predict(
            "pikachu", "", 3, 7.5, "7", "DPM-Solver++", 64, 64, 1, api_name="/generate"
        )
        image = Image.open(gallery[0]["image"])
        assert image.size == (64, 64) and len(set(image.getdata())) > 1
    finally:
        app.close()


# Last: torchao's 8-bit AdamW compiles its step the first time, which takes a while on a fresh machine.
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None and importlib.util.find_spec("torchao") is None,
    reason="needs bitsandbytes or torchao",
)
def test_8bit_adamw_trains_on_the_gpu(tiny_sd, tmp_path):
    trains(tiny_sd, tmp_path, "--mixed_precision", "fp16", "--use_8bit_adam")


def test_a_lora_is_extracted_on_cuda_as_on_the_cpu(tiny_sd, tmp_path):
    """sdtoolkit/extract_lora.py's decompositions on the GPU (--device cuda) give the CPU's adapters."""
    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", rank_two_change)
    for device in ("cpu", "cuda"):
        extract_lora(
            [str(tiny_sd), str(tuned), str(tmp_path / f"{device}.safetensors"), "--rank", "2", "--device", device]
        )
    on_cpu, on_cuda = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "cuda.safetensors")
    # Each direction's sign is the decomposition's choice: compare the products up @ down.
    for key in (k for k in on_cpu if k.endswith("lora_up.weight")):
        down = key.replace("lora_up", "lora_down")
        torch.testing.assert_close(
            on_cuda[key].flatten(1) @ on_cuda[down].flatten(1), on_cpu[key].flatten(1) @ on_cpu[down].flatten(1),
            atol=1e-4, rtol=1e-3,
        )  # fmt: skip
