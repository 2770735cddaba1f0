"""--lora_type loha and lokr: LyCORIS's LoHa and LoKr adapters trained on the frozen UNet (and text encoder), saved in
LyCORIS's kohya-ss keys, served and exported as they trained, resumed bit for bit."""

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.export import export_single_file
from sdtoolkit.inference import load_pipeline
from sdtoolkit.lora import KOHYA_WEIGHTS_NAME, WEIGHTS_NAME
from sdtoolkit.lycoris import lycoris_ranks
from tests.conftest import example_args, reset_accelerate_state, train, train_whole_and_resumed, unet_weights

# alpha differs from the rank, so a file that stores the wrong alpha scales the update wrongly. On the tiny models
# every LoKr layer's second factor is 8 x 8: at rank 2 it is a low-rank product (the layer scaled by alpha / rank),
# at rank 4 a full matrix (the layer not scaled, as LyCORIS trains it).
RUNS = {
    "loha": ["--lora_type", "loha", "--lora_rank", "4", "--lora_alpha", "2", "--learning_rate", "1e-2"],
    "lokr": ["--lora_type", "lokr", "--lora_rank", "2", "--lora_alpha", "3", "--learning_rate", "1e-2"],
    "lokr-full": ["--lora_type", "lokr", "--lora_rank", "4", "--lora_alpha", "2", "--learning_rate", "1e-2"],
}
# LoHa on the ResNet blocks' 3x3 convolutions too, at a rank and alpha of their own.
RUNS["loha-conv"] = [*RUNS["loha"], "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                     "--lora_conv_rank", "2", "--lora_conv_alpha", "1"]  # fmt: skip


def keep_the_models(monkeypatch):
    """The models training adds adapters to (the UNet, then the text encoder), as they are at the end of training."""
    models = []
    add_lycoris = train_text_to_image.add_lycoris

    def keep(model, *args, **kwargs):
        models.append(model)
        return add_lycoris(model, *args, **kwargs)

    monkeypatch.setattr(train_text_to_image, "add_lycoris", keep)
    return models


def outputs(unet, text_encoder, tokenizer):
    """The UNet's prediction for fixed inputs and a caption encoded by the text encoder."""
    ids = tokenizer(["a pink creature"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text_encoder(ids)[0]).sample


@pytest.mark.parametrize("run", ["loha", "lokr", "lokr-full", "loha-conv"])
def test_the_adapter_trained_is_the_one_the_server_and_the_export_apply(tiny_sd, tmp_path, monkeypatch, caplog, run):
    models = keep_the_models(monkeypatch)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        train(tiny_sd, out, *RUNS[run], "--train_text_encoder", "--max_train_steps", "3")
    kind = run.removesuffix("-full").removesuffix("-conv")
    name = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    assert f"Saved the {name} adapter to {out}" in caplog.text
    unet, text_encoder = (model.eval() for model in models)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    trained = outputs(unet, text_encoder, tokenizer)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert (trained - outputs(base.unet, base.text_encoder, tokenizer)).abs().max() > 1e-3

    # The files hold the adapter alone, in LyCORIS's keys, each layer with its alpha.
    state = load_file(out / KOHYA_WEIGHTS_NAME)
    tensors = {"loha": "hada_w1_a", "lokr": "lokr_w1"}[kind]
    assert {key.split(".")[1] for key in state} >= {tensors, "alpha"} and all(key.startswith("lora_") for key in state)
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for key in state)
    if kind == "lokr":  # a low-rank second factor and its alpha, or a full one and alpha = rank (no scaling)
        factor = "lokr_w2" if run == "lokr-full" else "lokr_w2_a"
        layers = {key.split(".")[0] for key in state}
        assert all(f"{layer}.{factor}" in state for layer in layers)
        assert all(state[f"{layer}.alpha"].item() == (4 if run == "lokr-full" else 3) for layer in layers)
    if run == "loha-conv":
        convolutions = {key.split(".")[0] for key in state if "_conv1." in key or "_conv2." in key}
        assert convolutions and all(state[f"{layer}.hada_w1_b"].shape[0] == 2 for layer in convolutions)
        assert all(state[f"{layer}.alpha"].item() == 1 for layer in convolutions)
    assert load_file(out / WEIGHTS_NAME).keys() == state.keys()
    with safe_open(str(out / KOHYA_WEIGHTS_NAME), "pt") as f:
        header = f.metadata()
    network_args = {"algo": kind, **({"conv_dim": "2", "conv_alpha": "1.0"} if run == "loha-conv" else {})}
    assert header["ss_network_module"] == "lycoris.kohya" and json.loads(header["ss_network_args"]) == network_args
    assert header["ss_network_dim"] == RUNS[run][3]

    # gradio_app.py and metrics.py load the run's folder (its base model from the header) and its kohya file:
    # the UNet and text encoder as training left them.
    for path in (out, out / KOHYA_WEIGHTS_NAME):
        pipeline = load_pipeline(str(path), torch.device("cpu"), torch.float32)
        assert (outputs(pipeline.unet, pipeline.text_encoder, tokenizer) - trained).abs().max() <= 1e-5, path
    # Exported as one file, the adapters merged into the weights.
    merged = tmp_path / "merged.safetensors"
    export_single_file(str(out), str(merged), half=False)
    single = StableDiffusionPipeline.from_single_file(str(merged), config=str(tiny_sd), local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    assert (outputs(single.unet, single.text_encoder, tokenizer) - trained).abs().max() <= 1e-4
    card = (out / "README.md").read_text()
    assert f"* LoRA: {name} (LyCORIS), rank {RUNS[run][3]}" in card and f"gradio_app.py --model_path {out}" in card
    assert "and the text encoder's k_proj out_proj q_proj v_proj" in card


def test_only_the_adapter_trains(tiny_sd, tmp_path, monkeypatch):
    models = keep_the_models(monkeypatch)
    train(tiny_sd, tmp_path / "out", *RUNS["loha"], "--train_text_encoder", "--max_train_steps", "2")
    for model, base in zip(models, (unet_weights(Path(tiny_sd) / "unet"),
                                    CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").state_dict())):  # fmt: skip
        state = model.state_dict()
        for key, value in base.items():
            wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(state[key] if key in state else state[wrapped], value), key
        # LoHa starts at a zero update (hada_w2_b zero), which training moves.
        assert all(value.abs().sum() > 0 for key, value in state.items() if "hada_w2_b" in key)


@pytest.mark.parametrize("kind, extra", [("loha", ["--use_ema"]), ("lokr", ["--use_ema"]),
                                         ("loha", ["--fp8_base", "--gradient_checkpointing"])],
                         ids=["loha", "lokr", "loha-fp8-base"])  # fmt: skip
def test_resume_is_bitwise(tiny_sd, tmp_path, kind, extra):
    flags = [*RUNS[kind], "--checkpointing_steps", "2", "--train_text_encoder", *extra]
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    for folder in (".", "checkpoint-4"):
        whole = load_file(tmp_path / "whole" / folder / WEIGHTS_NAME)
        parts = load_file(tmp_path / "parts" / folder / WEIGHTS_NAME)
        assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole), folder


def test_a_checkpoint_resumes_only_as_the_kind_it_holds(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path / "loha", *RUNS["loha"], "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="holds a LoHa adapter; resume it with --lora_type loha"):
        train(tiny_sd, tmp_path / "loha", "--lora_rank", "4", "--max_train_steps", "4", "--resume_from_checkpoint",
              "latest")  # fmt: skip
    train(tiny_sd, tmp_path / "lora", "--lora_rank", "4", "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="holds a LoRA adapter; resume it with --lora_type lora"):
        train(tiny_sd, tmp_path / "lora", *RUNS["lokr-full"][:4], "--max_train_steps", "4", "--resume_from_checkpoint",
              "latest")  # fmt: skip
    # A checkpoint of adapters on other layers: one line, for a LoRA's and for a LoHa's.
    for run, flags in (("loha", RUNS["loha"]), ("lora", ["--lora_rank", "4"])):
        with pytest.raises(UserError, match=r"could not resume from .*checkpoint-2: .* -- resume it with the flags"):
            train(tiny_sd, tmp_path / run, *flags, "--lora_target_modules", "to_q", "--max_train_steps", "4",
                  "--resume_from_checkpoint", "latest")  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_type", "loha"], "--lora_type loha trains a LoHa adapter of --lora_rank N: give its rank"),
        ([*RUNS["lokr"], "--lora_dropout", "0.1"], "--lora_type lokr: --lora_dropout works on LoRA adapters only"),
        ([*RUNS["loha"], "--scale_weight_norms", "1"], "--scale_weight_norms works on LoRA adapters only, not LoHa"),
    ],
)
def test_what_loha_and_lokr_do_not_take_is_one_line(tiny_sd, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(tiny_sd, tmp_path / "out", *flags, "--max_train_steps", "1")


@pytest.fixture(scope="module")
def lycoris_files(tiny_sd, tmp_path_factory):
    """{kind: the kohya file of a short LoHa or LoKr run on the UNet and the text encoder}, as a user downloads one."""
    root = tmp_path_factory.mktemp("lycoris-files")
    for kind in ("loha", "lokr"):
        train(tiny_sd, root / kind, *RUNS[kind], "--train_text_encoder", "--max_train_steps", "2")
    return {kind: root / kind / KOHYA_WEIGHTS_NAME for kind in ("loha", "lokr")}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_init_lora_goes_on_training_a_loha_or_lokr_file(tiny_sd, lycoris_files, tmp_path, caplog, kind):
    source = lycoris_files[kind]
    # A step this small moves no weight: what is saved is what training started from. Its kind and rank are the
    # file's; under bf16 the adapter is float32, the file's weights as they are.
    still = ["--learning_rate", "1e-30", "--max_train_steps", "1", "--train_text_encoder"]
    reset_accelerate_state()
    with caplog.at_level(logging.INFO):
        train(tiny_sd, tmp_path / "on", "--init_lora", str(source), *still, "--mixed_precision", "bf16")
    name = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    alpha = " alpha 2.0, on to_k to_out.0 to_q to_v" if kind == "loha" else ""
    assert f"--init_lora: training on from {source} ({name}, rank {RUNS[kind][3]},{alpha}" in caplog.text
    started, original = load_file(tmp_path / "on" / KOHYA_WEIGHTS_NAME), load_file(source)
    if kind == "loha":
        assert started.keys() == original.keys()
        assert all(started[k].dtype == torch.float32 and torch.equal(started[k], original[k]) for k in original)
    else:  # diffusers' reading of a LoKr file folds a low-rank layer's alpha / rank into its first factor
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
        a, b = (load_pipeline(str(path), torch.device("cpu"), torch.float32) for path in (source, tmp_path / "on"))
        difference = outputs(a.unet, a.text_encoder, tokenizer) - outputs(b.unet, b.text_encoder, tokenizer)
        assert difference.abs().max() <= 1e-6
    # It trains on, and resumes bit for bit.
    reset_accelerate_state()
    flags = ["--init_lora", str(source), "--train_text_encoder", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]  # fmt: skip
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    whole, parts = (load_file(tmp_path / run / KOHYA_WEIGHTS_NAME) for run in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert any(not torch.equal(whole[k], started[k]) for k in whole if not k.endswith(".alpha"))
    # Another kind, a rank of its own, or its text encoder adapter left out: one line each.
    other = "lokr" if kind == "loha" else "loha"
    for flags, message in ((["--lora_type", other], f"is a {name}; leave --lora_type out or give {kind}"),
                           (["--lora_rank", "7"], f"is a {name} of rank {RUNS[kind][3]}; leave --lora_rank out"),
                           ([], f"holds a {name} on the text encoder too; add --train_text_encoder")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            train(tiny_sd, tmp_path / "refused", "--init_lora", str(source), *flags, "--max_train_steps", "1")


def test_the_rank_of_a_lycoris_file_is_read_from_its_layers():
    # LoHa: hada_w1_b's rows; LoKr: a low-rank factor's inner size, or for two full factors the second one's longer
    # side, the least rank at which PEFT makes that factor full again.
    zeros = torch.zeros
    layers = {
        "loha": {"hada_w1_a": zeros(8, 3), "hada_w1_b": zeros(3, 8)},
        "lokr-low-rank": {"lokr_w1": zeros(4, 4), "lokr_w2_a": zeros(8, 2), "lokr_w2_b": zeros(2, 8)},
        "lokr-full": {"lokr_w1": zeros(4, 4), "lokr_w2": zeros(6, 8)},
    }
    assert lycoris_ranks(layers) == [3, 2, 8]


def test_a_pushed_loha_cards_usage_fetches_the_file_and_serves_it_on_its_base(tmp_path):
    # diffusers' load_lora_weights reads no LoHa: the card shows how this toolkit's server loads it from the hub.
    out = tmp_path / "sd-loha"
    out.mkdir()
    args = example_args(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4", lora_rank=4, lora_type="loha",
                        push_to_hub=True, output_dir=str(out))  # fmt: skip
    train_text_to_image.save_model_card(args, "me/sd-loha", images=[])
    card = (out / "README.md").read_text()
    assert f"hf download me/sd-loha {KOHYA_WEIGHTS_NAME} --local-dir sd-loha\n" in card
    assert (
        f"python gradio_app.py --model_path CompVis/stable-diffusion-v1-4 --lora sd-loha/{KOHYA_WEIGHTS_NAME}" in card
    )
    assert "load_lora_weights(" not in card
