"""sdtoolkit.export: a diffusers pipeline as one SD 1.x .safetensors file, judged by diffusers' own single-file
loader."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from gradio_client import Client
from PIL import Image
from safetensors import safe_open

import gradio_app
import metrics
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file, ldm_config
from sdtoolkit.export import main as export_main
from sdtoolkit.extract_lora import main as extract_lora
from sdtoolkit.fixtures import PRESETS, sd_scheduler
from sdtoolkit.inference import load_pipeline
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME
from tests.conftest import (
    generated_image,
    installed_toolkit_env,
    rank_two_change,
    train,
    tuned_copy,
    unet_weights,
)


@pytest.fixture(scope="module")
def sd1_layout(tiny_sd, tmp_path_factory):
    """The tiny pipeline with a UNet of SD v1's block layout (four blocks, attention in the first three down and
    last three up, two layers each), so every kind of original key is exercised; small channels."""
    folder = tmp_path_factory.mktemp("sd1") / "pipeline"
    shutil.copytree(tiny_sd, folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
    )  # fmt: skip
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def test_diffusers_single_file_loader_reads_the_same_pipeline(sd1_layout, tmp_path):
    out = tmp_path / "model.safetensors"
    export_single_file(str(sd1_layout), str(out), half=False)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        # The original VAE's attention projections are 1x1 convolutions (diffusers' loader takes either shape).
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape() == [64, 64, 1, 1]
    # An upsampler after an attention layer, a resnet's skip connection, the text encoder under text_model.
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in keys
    assert "model.diffusion_model.input_blocks.7.0.skip_connection.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys

    folder = StableDiffusionPipeline.from_pretrained(sd1_layout, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(str(out), config=str(sd1_layout), local_files_only=True,
                                                      safety_checker=None)  # fmt: skip
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # Measured: 0.0 with two torch threads, 3.4e-05 with one (make test's workers), of pixels from 0 to 1.
    assert abs(generated_image(folder, 64) - generated_image(single, 64)).max() <= 1e-4


def test_a_trained_checkpoints_ema_weights_export_from_the_command_line(tiny_sd, tmp_path):
    out = tmp_path / "run"
    train(tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--use_ema", "--learning_rate", "1e-2")
    target = tmp_path / "elsewhere" / "ema.safetensors"
    target.parent.mkdir()
    # From the user's own folder, as a module of the installed toolkit.
    # The EMA weights by default, as the run's final save would hold them.
    done = subprocess.run([sys.executable, "-m", "sdtoolkit.export", str(out / "checkpoint-2"), "ema.safetensors"],
                          cwd=target.parent, capture_output=True, text=True, env=installed_toolkit_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Wrote ema.safetensors" in done.stdout
    ema = unet_weights(out / "checkpoint-2" / "unet_ema")
    with safe_open(str(target), "pt") as f:
        metadata = f.metadata()
        conv_in = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert conv_in.dtype == torch.float16  # the default
    assert torch.equal(conv_in, ema["conv_in.weight"].half())
    assert not torch.equal(ema["conv_in.weight"], unet_weights(out / "checkpoint-2" / "unet")["conv_in.weight"])
    assert metadata["sdtoolkit.global_step"] == "2" and metadata["sdtoolkit.model"] == str(tiny_sd)
    # --no-ema: the trained weights.
    export_single_file(str(out / "checkpoint-2"), str(tmp_path / "raw.safetensors"), ema=False)
    with safe_open(str(tmp_path / "raw.safetensors"), "pt") as f:
        raw = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert torch.equal(raw, unet_weights(out / "checkpoint-2" / "unet")["conv_in.weight"].half())


def test_a_checkpoint_of_a_run_on_a_hub_model_exports_and_loads(tiny_sd, tiny_sd_on_the_hub, tmp_path, capsys):
    # The seed's recipe trains from a hub id; its checkpoints hold only the UNet, and export takes the VAE and
    # text encoder from the hub (here its local cache, offline).
    out = tmp_path / "run"
    train(tiny_sd_on_the_hub, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--use_ema",
          "--learning_rate", "1e-2")  # fmt: skip
    export_single_file(str(out / "checkpoint-2"), str(tmp_path / "from-hub.safetensors"))
    # The same file as a checkpoint of the same run on the local folder gives, but for the model it names.
    local = tmp_path / "local"
    train(
        tiny_sd, local, "--max_train_steps", "2", "--checkpointing_steps", "2", "--use_ema", "--learning_rate", "1e-2"
    )
    export_single_file(str(local / "checkpoint-2"), str(tmp_path / "from-folder.safetensors"))
    with safe_open(str(tmp_path / "from-hub.safetensors"), "pt") as a, safe_open(str(tmp_path / "from-folder.safetensors"), "pt") as b:  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert a.metadata()["sdtoolkit.model"] == tiny_sd_on_the_hub
    # metrics.py and gradio_app.py load the checkpoint on its hub base too.
    hub, folder = (generated_image(load_pipeline(str(run / "checkpoint-2"), torch.device("cpu"), torch.float32), 32)
                   for run in (out, local))  # fmt: skip
    assert abs(hub - folder).max() == 0
    assert f"its unet_ema/ on its base model {tiny_sd_on_the_hub}" in capsys.readouterr().out


def test_a_pipeline_that_is_not_sd1_gets_one_line_and_no_file(sd1_layout, tmp_path):
    folder = shutil.copytree(sd1_layout, tmp_path / "sd2-like")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["use_linear_projection"] = True
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"is not a Stable Diffusion 1.x pipeline \(linear attention projections"):
        export_single_file(str(folder), str(tmp_path / "out.safetensors"))
    assert os.listdir(tmp_path) == ["sd2-like"]


def test_training_with_export_single_file_writes_a_file_the_loader_reads(tiny_sd, tmp_path):
    out = tmp_path / "my-model"
    train(tiny_sd, out, "--max_train_steps", "2", "--use_ema", "--export_single_file")
    single = out / "my-model.safetensors"
    with safe_open(str(single), "pt") as f:
        metadata = f.metadata()
    assert metadata["sdtoolkit.global_step"] == "2" and metadata["sdtoolkit.resolution"] == "32"
    assert metadata["sdtoolkit.learning_rate"] == "0.0001"
    pipeline = StableDiffusionPipeline.from_single_file(str(single), config=str(out), local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    saved = unet_weights(out / "unet")  # the EMA weights, as the pipeline folder holds them
    assert all(torch.equal(v, saved[k].half().float()) for k, v in pipeline.unet.state_dict().items())
    # A new run into the folder deletes it with the rest of the earlier run.
    train(tiny_sd, out, "--max_train_steps", "1", "--overwrite_output_dir")
    assert not single.exists()


def test_a_lora_exports_merged_into_its_base_model(tiny_sd, tmp_path):
    # The tiny pipeline, not sd1_layout: at 32 px that UNet's 1x1 bottleneck turns the float rounding between a
    # merged and an unmerged adapter (1e-7) into visible differences.
    out = tmp_path / "my-lora"
    train(tiny_sd, out, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--use_ema",
          "--max_train_steps", "2", "--checkpointing_steps", "2", "--export_single_file")  # fmt: skip
    cpu = torch.device("cpu")
    with_lora = generated_image(load_pipeline(str(out), cpu, torch.float32), 32)
    moved = abs(with_lora - generated_image(load_pipeline(str(tiny_sd), cpu, torch.float32), 32)).max()
    assert moved > 1e-2

    # From the command line, float32, a LoRA checkpoint (its adapter's EMA weights): the same pipeline.
    exported = tmp_path / "step2.safetensors"
    export_single_file(str(out / "checkpoint-2"), str(exported), half=False)
    pipeline = StableDiffusionPipeline.from_single_file(str(exported), config=str(tiny_sd), local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    assert abs(generated_image(pipeline, 32) - with_lora).max() <= 1e-4

    # From training, float16: that pipeline with its weights rounded to float16. Its configs come from the base
    # model its header names.
    single = out / "my-lora.safetensors"
    with safe_open(str(single), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["sdtoolkit.global_step"] == "2" and metadata["sdtoolkit.model"] == str(tiny_sd)
    assert not any("lora" in key for key in keys)  # merged, not carried
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        for parameter in model.parameters():
            parameter.data = parameter.data.half().float()
    half = generated_image(load_pipeline(str(single), cpu, torch.float32), 32)
    assert abs(half - generated_image(pipeline, 32)).max() <= 1e-5
    # The kohya file alone: the run's facts come from its header.
    export_single_file(str(out / KOHYA_WEIGHTS_NAME), str(tmp_path / "k.safetensors"))
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.metadata()["sdtoolkit.global_step"] == "2" and f.metadata()["sdtoolkit.model"] == str(tiny_sd)
    with pytest.raises(UserError, match="--ema and --no-ema are for full fine-tuning checkpoints"):
        export_single_file(str(out / "checkpoint-2"), str(tmp_path / "x.safetensors"), ema=False)


def test_loras_from_elsewhere_merge_into_a_model_at_their_ratios(tiny_sd, tmp_path):
    """--lora (kohya-ss's merge_lora.py): a LoRA that names no base model, merged at 0.5 into the model given."""
    tuned = tuned_copy(tiny_sd, tmp_path / "tuned", rank_two_change)
    lora = str(tmp_path / "lora.safetensors")
    extract_lora([str(tiny_sd), str(tuned), lora, "--rank", "2", "--clamp_quantile", "1"])  # exactly the change
    out = tmp_path / "merged.safetensors"
    export_main([str(tiny_sd), str(out), "--no-half", "--lora", lora, "--ratios", "0.5"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["sdtoolkit.merged_loras"] == lora and f.metadata()["sdtoolkit.model"] == str(tiny_sd)
    merged = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd), local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    # By hand: the base's weights and half of the tuned model's change.
    base, changed = (
        UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
        UNet2DConditionModel.from_pretrained(tuned / "unet"),
    )
    for (name, ours), theirs, tuned_weight in zip(
        merged.unet.named_parameters(), base.parameters(), changed.parameters()
    ):
        torch.testing.assert_close(ours, theirs + 0.5 * (tuned_weight - theirs), atol=1e-5, rtol=0, msg=name)

    with pytest.raises(UserError, match="--ratios gives 2 strengths for 1 LoRAs"):
        export_main([str(tiny_sd), str(out), "--lora", lora, "--ratios", "0.5", "1"])
    with pytest.raises(UserError, match="is a LoRA; give the model to merge --lora into"):
        export_main([lora, str(out), "--lora", lora])
    with pytest.raises(UserError, match="--model_config is for a model that is one file, which only --lora"):
        export_main([str(tiny_sd), str(out), "--model_config", str(tiny_sd)])


def test_export_single_file_with_a_base_that_is_not_sd1_stops_before_training(sd1_layout, tmp_path):
    # SD 2.x's UNet projects attention inputs with linear layers.
    folder = shutil.copytree(sd1_layout, tmp_path / "sd2-like")
    config = UNet2DConditionModel.load_config(folder / "unet")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config({**config, "use_linear_projection": True}).save_pretrained(folder / "unet")
    with pytest.raises(UserError, match="is not a Stable Diffusion 1.x pipeline"):
        train(folder, tmp_path / "out", "--max_train_steps", "1", "--export_single_file")
    assert not (tmp_path / "out" / "unet").exists()


def test_metrics_scores_a_single_file_as_its_folder(tiny_sd, tiny_clip, tmp_path, capsys):
    single = tmp_path / "files" / "tiny.safetensors"
    single.parent.mkdir()
    export_single_file(str(tiny_sd), str(single), half=False)
    common = ["--clip_model", str(tiny_clip), "--num_inference_steps", "2", "--resolution", "32", "--device", "cpu"]
    report = metrics.main(["--model_path", str(tiny_sd), str(single), "--model_config", str(tiny_sd),
                           "--output_dir", str(tmp_path / "scores"), *common])  # fmt: skip
    folder, file = report["models"]
    assert file["clip_score"] == folder["clip_score"]
    # Alone in a folder, with no base model named in its metadata, it needs --model_config: one line says so.
    with pytest.raises(UserError, match="pass --model_config with a diffusers SD 1.x pipeline folder"):
        metrics.main(["--model_path", str(single), "--output_dir", str(tmp_path / "again"), *common])


def test_the_demo_serves_a_single_file_found_in_its_pipeline_folder(tiny_sd, tmp_path, client_downloads):
    folder = shutil.copytree(tiny_sd, tmp_path / "pipeline")
    export_single_file(str(folder), str(folder / "pipeline.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = gradio_app.parse_args(["--model_path", str(folder / "pipeline.safetensors"), "--port", str(port),
                                  "--device", "cpu"])  # fmt: skip
    app = gradio_app.launch(args, block=False)
    try:
        gallery, _ = Client(app.local_url, verbose=False).predict(
            "pikachu", "", 2, 7.5, "7", "DPM-Solver++", 64, 64, 1, api_name="/generate"
        )
        assert Image.open(gallery[0]["image"]).size == (64, 64)
    finally:
        app.close()


def test_a_v_prediction_export_brings_the_config_automatic1111_reads_beside_it(sd1_layout, tmp_path, capsys):
    # SD v1-4's architecture gives the values of the original code's v1-inference.yaml (CompVis's, which
    # AUTOMATIC1111 ships), with parameterization "v".
    sd14 = PRESETS["sd-v1-4"]
    params = ldm_config(sd14["unet"], sd14["vae"], dict(sd_scheduler().config))["model"]["params"]
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]
    assert params["parameterization"] == "v" and params["timesteps"] == 1000 and params["scale_factor"] == 0.18215
    assert (params["linear_start"], params["linear_end"], params["image_size"], params["channels"]) == (
        0.00085, 0.012, 64, 4)  # fmt: skip
    assert unet == {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
                    "use_checkpoint": False, "legacy": False}  # fmt: skip
    assert vae["embed_dim"] == 4 and vae["ddconfig"] == {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip

    # A v-prediction pipeline's export writes it beside the file, with the model's own sizes.
    v_model = tmp_path / "v-model"
    shutil.copytree(sd1_layout, v_model)
    config_path = v_model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    out = tmp_path / "exported.safetensors"
    export_main([str(v_model), str(out)])
    assert f"Wrote {tmp_path / 'exported.yaml'} beside it: the model predicts v" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "exported.yaml").read_text())["model"]["params"]
    assert written["parameterization"] == "v"
    assert written["unet_config"]["params"]["channel_mult"] == [1, 1, 2, 2]  # sd1_layout's 32, 32, 64, 64 channels
    # An epsilon model exported to the same name takes away the .yaml an earlier export wrote; a user's own stays.
    export_single_file(str(sd1_layout), str(out), half=False)
    assert not (tmp_path / "exported.yaml").exists()
    (tmp_path / "exported.yaml").write_text("model: {}\n")
    export_single_file(str(sd1_layout), str(out), half=False)
    assert (tmp_path / "exported.yaml").read_text() == "model: {}\n"


def test_a_failed_write_leaves_the_earlier_file_as_it_was_and_nothing_beside_it(sd1_layout, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the earlier export")

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half of it")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sdtoolkit.export.save_file", full_disk)
    with pytest.raises(UserError, match="could not write .*model.safetensors: No space left on device"):
        export_single_file(str(sd1_layout), str(out), half=False)
    assert out.read_bytes() == b"the earlier export" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
