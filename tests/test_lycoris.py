"""LyCORIS files (LoHa, LoKr) in kohya-ss keys, as AUTOMATIC1111 applies them: each gives the image of its update,
computed here by hand from LyCORIS's formulas and added to the weights, at any strength; in --lora_dir they are
tags like any LoRA's; what they can't be used for is one line."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtoolkit.errors import UserError
from sdtoolkit.inference import load_lora_dir, load_pipeline
from sdtoolkit.serving import ImageService, RequestQueue
from tests.conftest import train

RANK = 2


def layers(pipeline):
    """The layers the files below adapt: two UNet attention projections, a 3x3 UNet convolution, a CLIP projection;
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
    for i, (part, module_path, name, module) in enumerate(layers(pipeline)):
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


def pixels(pipeline):
    result = pipeline(prompt="a red creature", num_inference_steps=3, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    return result.images[0]


@pytest.mark.parametrize("kind", ["LoHa", "LoHa Tucker", "LoKr"])
def test_a_lycoris_file_gives_the_image_of_its_update_added_by_hand(tiny_sd, tmp_path, kind):
    base = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    deltas = lycoris_file(base, kind, tmp_path / "style.safetensors")
    base_pixels = pixels(base)
    for strength in (1.0, 0.5):
        served = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(tmp_path / "style.safetensors"),
                               lora_scale=strength)  # fmt: skip
        by_hand = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            for (part, module_path), delta in deltas.items():
                getattr(by_hand, part).get_submodule(module_path).weight += strength * delta
        ours, theirs = pixels(served), pixels(by_hand)
        assert np.abs(ours - base_pixels).max() > 1e-3  # the update shows
        assert np.abs(ours - theirs).max() < 1e-4, (kind, strength)


def test_lycoris_files_in_lora_dir_are_tags_like_a_loras(tiny_sd, tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    lycoris_file(pipeline, "LoHa", folder / "soft.safetensors", seed=1)
    lycoris_file(pipeline, "LoKr", folder / "sharp.safetensors", seed=2)
    names, skipped = load_lora_dir(pipeline, str(folder))
    assert sorted(names) == ["sharp", "soft"] and skipped == []
    service = ImageService(pipeline, model_name="tiny-sd", queue=RequestQueue(concurrency=1, max_queue=1), loras=names)

    def image(prompt, service=service):
        (result,) = service.generate(prompt=prompt, negative_prompt="", steps=3, guidance_scale=7.5, seed=3,
                                     scheduler="DPM-Solver++", width=64, height=64, num_images=1)  # fmt: skip
        return np.asarray(result).astype(int)

    for name in ("soft", "sharp"):
        alone = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(folder / f"{name}.safetensors"),
                              lora_scale=0.7)  # fmt: skip
        served = ImageService(
            alone, model_name="tiny-sd", lora_scale=0.7, queue=RequestQueue(concurrency=1, max_queue=1)
        )
        assert np.abs(image(f"<lora:{name}:0.7> a creature") - image("a creature", served)).max() <= 1
    mixed, untagged = image("<lora:soft:1> <lora:sharp:1> a creature"), image("a creature")
    base = ImageService(load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32), model_name="tiny-sd",
                        queue=RequestQueue(concurrency=1, max_queue=1))  # fmt: skip
    assert np.array_equal(untagged, image("a creature", base))  # the tags' adapters are off again
    assert not np.array_equal(mixed, image("<lora:soft:1> a creature"))


def test_what_a_lycoris_file_cant_be_used_for_is_one_line(tiny_sd, tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    pipeline = load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    lycoris_file(pipeline, "LoHa", tmp_path / "good.safetensors")
    good = load_file(tmp_path / "good.safetensors")
    name = next(key for key in good if key.startswith("lora_unet_")).split(".")[0]
    save_file({**good, f"{name}.dora_scale": torch.ones(1)}, folder / "dora.safetensors")
    renamed = {key.replace("lora_unet_down_blocks_0", "lora_unet_input_blocks_1"): v for key, v in good.items()}
    save_file(renamed, folder / "sdxl.safetensors")
    lycoris_file(pipeline, "LoHa Tucker", tmp_path / "tucker.safetensors")
    tucker = load_file(tmp_path / "tucker.safetensors")
    save_file({key: v for key, v in tucker.items() if not key.endswith(".hada_t2")}, folder / "no-t2.safetensors")
    names, skipped = load_lora_dir(pipeline, str(folder))
    reasons = dict(skipped)
    assert names == {} and pipeline.get_list_adapters() in ({}, {"unet": [], "text_encoder": []})
    assert "dora_scale, which this server can't apply" in reasons["dora.safetensors"]
    assert (
        "lora_unet_input_blocks_1_" in reasons["sdxl.safetensors"]
        and "no layer of this model" in reasons["sdxl.safetensors"]
    )
    # Training goes on from such a file too (tests/test_lycoris_training.py), at its own rank.
    with pytest.raises(UserError, match="good.safetensors is a LoHa of rank 2; leave --lora_rank out or give 2"):
        train(tiny_sd, tmp_path / "out", "--lora_rank", "4", "--init_lora", str(tmp_path / "good.safetensors"),
              "--max_train_steps", "1")  # fmt: skip
    train(tiny_sd, tmp_path / "out", "--init_lora", str(tmp_path / "good.safetensors"), "--train_text_encoder",
          "--max_train_steps", "1")  # fmt: skip
    assert (
        load_file(tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors").keys()
        == load_file(tmp_path / "good.safetensors").keys()
    )
