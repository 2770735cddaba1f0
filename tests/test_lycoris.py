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
from tests.conftest import lycoris_file, train


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
