"""metrics.py: torchmetrics' CLIP score, reproducible, side by side, with its images and reports."""

import csv
import json
import re
import shutil
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.functional.multimodal import clip_score
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel

import metrics
from sdtoolkit.errors import UserError
from sdtoolkit.inference import load_pipeline
from sdtoolkit.learning_check import caption_errors, read_caption_data
from tests.conftest import DEMO_DATA, demo_image, image_folder, recorded_model, run_entry_point, run_script

FAST = ["--num_inference_steps", "2", "--resolution", "32", "--device", "cpu"]
TWO_PROMPTS = ["a round green creature", "a tall red creature with a long tail"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TWO_PROMPTS) + "\n\n")
    return str(path)


def score(tiny_sd, tiny_clip, tmp_path, *extra, prompts_file=None):
    argv = ["--model_path", tiny_sd, "--clip_model", tiny_clip, "--output_dir", str(tmp_path / "scores"), *FAST]
    if prompts_file:
        argv += ["--prompts_file", prompts_file]
    return metrics.main(argv + list(extra))


def test_defaults_are_the_seeds_setup():
    args = metrics.parse_args([])
    assert args.model_path == ["sd-pokemon-model"]
    assert args.clip_model == "openai/clip-vit-base-patch16"
    assert metrics.load_prompts(None) == (metrics.PROMPTS, None) and len(metrics.PROMPTS) == 6
    assert metrics.parse_args(["--clip_backend", "open_clip"]).clip_model == "ViT-B-16/openai"


def test_score_equals_torchmetrics_and_a_direct_computation(tiny_sd, tiny_clip, prompts_file):
    args = metrics.parse_args(["--model_path", tiny_sd, "--seeds", "0", "1", "--prompts_file", prompts_file, *FAST])
    pipeline = load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    images = metrics.generate_images(pipeline, TWO_PROMPTS, None, args)
    per_prompt, overall = metrics.score_model(images, TWO_PROMPTS, metrics.load_clip("transformers", tiny_clip), "cpu")

    tensors = [metrics.to_tensor(image) for row in images for image in row]
    texts = [prompt for prompt, row in zip(TWO_PROMPTS, images) for _ in row]
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    reference = clip_score(
        tensors, texts, model_name_or_path=lambda: (metrics.TransformersCLIPFeatures(model), processor)
    ).item()
    assert overall == pytest.approx(reference, abs=1e-4)

    # The same number from CLIP's embeddings directly: mean of 100 * cos(image, text), floored at 0.
    with torch.no_grad():
        inputs = processor(text=texts, images=tensors, return_tensors="pt", padding=True)
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_model_out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text_embeds = model.text_projection(text_model_out.pooler_output)
    cosines = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    assert overall == pytest.approx(max(100 * cosines.mean().item(), 0.0), abs=1e-4)
    assert overall > 1.0  # a real number, not the floor
    flat = [s for row in per_prompt for s in row]
    assert flat == pytest.approx((100 * cosines).clamp(min=0).tolist(), abs=1e-4)


@pytest.mark.xfail(raises=AttributeError, strict=True, reason="torchmetrics 1.9.0 + transformers 5; PR #3408")
def test_raw_transformers_clip_model_still_breaks_torchmetrics(tiny_clip):
    # When this starts passing (a torchmetrics release with the fix), TransformersCLIPFeatures can go.
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    clip_score(image, "a cat", model_name_or_path=lambda: (model, processor))


def test_open_clip_backend_equals_a_direct_computation(tiny_sd, tiny_open_clip, prompts_file, tmp_path):
    import open_clip

    report = metrics.main(
        ["--model_path", tiny_sd, "--clip_backend", "open_clip", "--clip_model", tiny_open_clip,
         "--prompts_file", prompts_file, "--output_dir", str(tmp_path), *FAST]
    )  # fmt: skip
    model, preprocess = open_clip.create_model_from_pretrained("local-dir:" + tiny_open_clip)
    tokenizer = open_clip.get_tokenizer("local-dir:" + tiny_open_clip)
    args = metrics.parse_args(["--model_path", tiny_sd, *FAST])
    images = metrics.generate_images(
        load_pipeline(tiny_sd, torch.device("cpu"), torch.float32), TWO_PROMPTS, None, args
    )
    with torch.no_grad():
        image_embeds = model.encode_image(torch.stack([preprocess(row[0]) for row in images]))
        text_embeds = model.encode_text(tokenizer(TWO_PROMPTS))
    cosines = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    assert report["models"][0]["clip_score"] == pytest.approx(100 * cosines.mean().item(), abs=1e-4)
    assert report["models"][0]["clip_score"] > 1.0


def test_same_seeds_give_the_same_score_and_batching_does_not_matter(tiny_sd, tiny_clip, prompts_file, tmp_path):
    first = score(tiny_sd, tiny_clip, tmp_path, "--seeds", "0", "1", prompts_file=prompts_file)
    again = score(tiny_sd, tiny_clip, tmp_path, "--seeds", "0", "1", "--batch_size", "2", prompts_file=prompts_file)
    other = score(tiny_sd, tiny_clip, tmp_path, "--seeds", "5", "6", prompts_file=prompts_file)
    # Batched and unbatched UNet calls may round differently in the last float bits, nothing more.
    scores = [s for row in first["models"][0]["per_prompt"] for s in row["scores"]]
    batched = [s for row in again["models"][0]["per_prompt"] for s in row["scores"]]
    assert batched == pytest.approx(scores, abs=1e-3)
    repeat = score(tiny_sd, tiny_clip, tmp_path, "--seeds", "0", "1", prompts_file=prompts_file)
    assert repeat["models"][0]["clip_score"] == first["models"][0]["clip_score"]
    assert other["models"][0]["clip_score"] != first["models"][0]["clip_score"]


def test_two_models_side_by_side_with_files(tiny_sd, tiny_clip, prompts_file, tmp_path, capsys):
    other = tmp_path / "other-model"
    from sdtoolkit.fixtures import build_sd_pipeline

    build_sd_pipeline(other, preset="tiny", seed=1)
    out = tmp_path / "scores"
    report = metrics.main(
        ["--model_path", tiny_sd, str(other), "--clip_model", tiny_clip, "--prompts_file", prompts_file,
         "--seeds", "0", "1", "2", "--num_images_per_prompt", "2", "--output_dir", str(out), *FAST]
    )  # fmt: skip
    a, b = report["models"]
    assert report["difference"]["clip_score"] == pytest.approx(b["clip_score"] - a["clip_score"])
    assert all(len(row["scores"]) == 6 for row in a["per_prompt"])  # 3 seeds x 2 images

    printed = capsys.readouterr().out
    assert f"CLIP score ({tiny_sd}): {round(a['clip_score'], 4)}" in printed
    assert "Difference (" in printed and TWO_PROMPTS[0] in printed

    assert json.loads((out / "scores.json").read_text())["models"][1]["model_path"] == str(other)
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "model_path,prompt,mean,std,n" and len(rows) == 1 + 2 * 3
    grid = Image.open(out / "grid-other-model.png")
    assert grid.size == (32 * 6, 32 * 2)  # columns: seeds x images; rows: prompts
    for name in ("scores.json", "scores.csv", "grid-tiny-sd.png", "grid-other-model.png"):
        assert f"wrote {out / name}" in printed


def test_single_model_prints_the_seeds_line(tiny_sd, tiny_clip, prompts_file, tmp_path, capsys):
    report = score(tiny_sd, tiny_clip, tmp_path, prompts_file=prompts_file)
    assert f"CLIP score: {round(report['models'][0]['clip_score'], 4)}\n" in capsys.readouterr().out


def run_cli(*args):
    return run_script("metrics.py", *args)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-1000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last


def test_missing_model_folder_is_one_line(tiny_clip, tmp_path):
    result = run_cli("--model_path", str(tmp_path / "nope"), "--clip_model", tiny_clip, *FAST)
    assert_one_line_error(result, "no model folder", "make demo")


def test_unknown_clip_model_names_itself_and_how_to_get_a_local_copy(tiny_sd, capsys):
    result = run_entry_point(metrics.main, "--model_path", tiny_sd, "--clip_model", "openai/clip-vit-base-patch16",
                             *FAST, capsys=capsys)  # fmt: skip
    assert_one_line_error(result, "'openai/clip-vit-base-patch16'", "HF_HUB_OFFLINE=1", "save_pretrained")


def test_unknown_open_clip_architecture(tiny_sd):
    with pytest.raises(UserError, match="unknown open_clip architecture 'ViT-Nope'"):
        metrics.main(["--model_path", tiny_sd, "--clip_backend", "open_clip", "--clip_model", "ViT-Nope/openai"])


def test_empty_prompts_file(tiny_sd, tiny_clip, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="has no prompts"):
        score(tiny_sd, tiny_clip, tmp_path, prompts_file=str(empty))


def test_the_training_scripts_flags_are_named_with_what_does_their_work_here(capsys):
    # As the training script's parser: the usage, then one error line, exit code 2.
    result = run_entry_point(metrics.main, "--pretrained_model_name_or_path", "sd-pokemon-model", "--clip-model",
                             "x", capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unrecognized arguments: --pretrained_model_name_or_path sd-pokemon-model --clip-model x --"
        " --pretrained_model_name_or_path is --model_path here (several, to score them side by side); did you mean"
        " --clip_model?"
    )
    with pytest.raises(SystemExit):
        metrics.parse_args(["--help"])
    ours = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, flags=re.MULTILINE))
    assert {"--model_path", "--seeds", "--prompts_file"} <= ours
    for theirs, here in metrics.KNOWN_ELSEWHERE.items():
        named = re.findall(r"--[\w-]+", here)
        assert theirs not in ours and named and all(flag in ours for flag in named), (theirs, here)


def test_resolution_not_divisible_by_8():
    with pytest.raises(UserError, match="multiple of 8"):
        metrics.parse_args(["--resolution", "100"])


def test_two_models_with_the_same_folder_name_get_their_own_grids(tiny_sd, tiny_clip, prompts_file, tmp_path, capsys):
    for run in ("exp1", "exp2"):
        shutil.copytree(tiny_sd, tmp_path / run / "model")
    out = tmp_path / "scores"
    report = metrics.main(["--model_path", str(tmp_path / "exp1" / "model"), str(tmp_path / "exp2" / "model"),
                           "--clip_model", tiny_clip, "--prompts_file", prompts_file, "--output_dir", str(out),
                           *FAST])  # fmt: skip
    assert [m["label"] for m in report["models"]] == ["exp1/model", "exp2/model"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-exp1_model.png", "grid-exp2_model.png"]
    assert "exp1/model" in capsys.readouterr().out


def test_labels_stay_distinct_for_the_same_model_given_twice():
    assert metrics.model_labels(["a/m", "b/m", "c"]) == ["a/m", "b/m", "c"]
    assert metrics.model_labels(["x/m", "x/m"]) == ["x/m (1)", "x/m (2)"]


def test_an_unusable_output_dir_fails_before_generating(tiny_sd, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    # The CLIP model named here does not exist either: the output folder is checked first, before anything loads.
    result = run_entry_point(metrics.main, "--model_path", tiny_sd, "--clip_model", tmp_path / "no-clip",
                             "--output_dir", tmp_path / "a_file" / "scores", *FAST, capsys=capsys)  # fmt: skip
    assert_one_line_error(result, "cannot write to --output_dir")


def test_one_seed_has_no_spread_and_comments_are_not_prompts(tiny_sd, tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na round green creature\n  # not this one either\n")
    report = score(tiny_sd, tiny_clip, tmp_path, prompts_file=str(prompts))
    assert [row["prompt"] for row in report["models"][0]["per_prompt"]] == ["a round green creature"]
    assert report["models"][0]["per_prompt"][0]["std"] is None
    printed = capsys.readouterr().out
    assert "± n/a" in printed and "± 0.0000" not in printed


def test_a_model_folder_missing_a_part_names_it(tiny_sd, tiny_clip, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "unet")
    result = run_entry_point(metrics.main, "--model_path", broken, "--clip_model", tiny_clip, *FAST, capsys=capsys)
    assert_one_line_error(result, f"the pipeline folder '{broken}' lacks unet/")


def test_out_of_gpu_memory_while_generating_is_one_line_with_what_to_try(tiny_sd, tiny_clip, tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB.")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", out_of_memory)
    with pytest.raises(UserError) as error:
        score(tiny_sd, tiny_clip, tmp_path, "--batch_size", "2", "--dtype", "float32")
    assert str(error.value) == (
        "out of GPU memory (CUDA out of memory. Tried to allocate 1.50 GiB.); try --batch_size 1 (the same images),"
        " --dtype float16"
    )
    with pytest.raises(UserError, match=r"; try a lower --resolution or --num_images_per_prompt \(other images\)$"):
        score(tiny_sd, tiny_clip, tmp_path)


def pixels(images):
    """The first image of each prompt, as integers."""
    return [np.asarray(row[0], dtype=int) for row in images]


def test_prompts_are_read_as_the_server_reads_them_in_any_batch(tiny_sd):
    pipeline = load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    long = ", ".join(["a red creature"] * 30)  # 120 tokens: two of CLIP's windows
    prompts = ["a (red:1.0) creature", "a red creature", "a (red:1.8) creature", long]
    args = SimpleNamespace(seeds=[3], batch_size=2, num_images_per_prompt=1, num_inference_steps=2,
                           guidance_scale=7.5, resolution=32)  # fmt: skip
    batched = pixels(metrics.generate_images(pipeline, prompts, None, args))  # the last two in calls of their own
    args.batch_size = 1
    one_by_one = pixels(metrics.generate_images(pipeline, prompts, None, args))
    for a, b in zip(batched, one_by_one):
        assert np.abs(a - b).max() <= 1  # batched maths may round differently, nothing more
    # Emphasis weighs words (a weight of 1 is the plain prompt), and a long prompt is read whole, not cut at 77.
    assert np.array_equal(one_by_one[0], one_by_one[1]) and not np.array_equal(one_by_one[1], one_by_one[2])
    generator = torch.Generator().manual_seed(3)
    cut = pipeline(long, num_inference_steps=2, height=32, width=32, generator=generator).images
    assert not np.array_equal(one_by_one[3], pixels([cut])[0])
    # Clip skip 2 reads what the text encoder without its last layer outputs.
    skipped = pixels(metrics.generate_images(pipeline, prompts[1:2], None, args, clip_skip=2))
    shorter = StableDiffusionPipeline.from_pretrained(
        tiny_sd, text_encoder=CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder", num_hidden_layers=1),
        safety_checker=None,
    )  # fmt: skip
    assert np.array_equal(skipped[0], pixels(metrics.generate_images(shorter, prompts[1:2], None, args))[0])
    assert not np.array_equal(skipped[0], one_by_one[1])


def test_each_model_is_prompted_as_its_run_recorded_with_the_embeddings_asked_for(tiny_sd, tiny_clip, tmp_path):
    recorded = recorded_model(tiny_sd, tmp_path, 2)  # the same weights, with a clip skip of 2 on record
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    (blue,) = pipeline.tokenizer("blue", add_special_tokens=False).input_ids
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": pipeline.text_encoder.get_input_embeddings().weight[blue][None].detach().clone()},
              tmp_path / "embeddings" / "zorbly.safetensors")  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zorbly creature\na (red:1.3) creature\n")

    def scores(*extra):
        argv = ["--model_path", tiny_sd, recorded, "--prompts_file", str(prompts), "--clip_model", tiny_clip,
                "--output_dir", str(tmp_path / "scores"), *FAST, *extra]  # fmt: skip
        report = metrics.main(argv)
        models = report["models"]
        table = (tmp_path / "scores" / "report.md").read_text()
        return [m["clip_skip"] for m in models], [[row["scores"] for row in m["per_prompt"]] for m in models], table

    clip_skips, (base, skipped), table = scores()
    assert clip_skips == [1, 2] and base != skipped and "| clip skip |" in table
    clip_skips, (base_again, same), table = scores(
        "--clip_skip", "1", "--embeddings_dir", str(tmp_path / "embeddings")
    )
    assert clip_skips == [1, 1] and base_again == same and "clip skip" not in table
    # The embedding changes what the first prompt says, not the second.
    assert base_again[0] != base[0] and base_again[1] == base[1]
    # CLIP scores an image against the prompt's words: emphasis is an instruction to the generating model.
    clip, red = metrics.load_clip("transformers", tiny_clip), Image.new("RGB", (32, 32), "red")
    weighted, plain = (metrics.score_model([[red]], [p], clip, "cpu")[1] for p in ("a (red:1.3) cat", "a red cat"))
    assert weighted == plain

    prompts.write_text("a creature <lora:style:0.8>\n")
    with pytest.raises(UserError, match="prompt 1: <lora:...> tags are for gradio_app.py; score a LoRA with --lora"):
        scores()
    prompts.write_text("a creature\na [creature|dragon]\n")  # AUTOMATIC1111 syntax not read here
    with pytest.raises(UserError, match=r"prompt 2: '\[creature\|dragon\]' is AUTOMATIC1111's alternation"):
        scores()
    with pytest.raises(UserError, match="--doc_protocol samples as the page did: drop --clip_skip"):
        metrics.parse_args(["--doc_protocol", "--clip_skip", "2"])


# Caption accuracy on a training folder in each layout the training script reads.


def caption_layouts(root, count):
    """The first `count` bundled images and captions in three layouts: an imagefolder (metadata.jsonl), the same
    with a metadata.csv whose caption column is 'caption', and kohya-ss's caption-file folder (an N_name folder of
    images with .txt files). Each lists the images in the same order."""
    captions = [json.loads(line)["text"] for line in (DEMO_DATA / "metadata.jsonl").read_text().splitlines()[:count]]
    names = [f"{i:04d}.png" for i in range(count)]
    jsonl = image_folder(root / "jsonl", [(name, demo_image(i), captions[i]) for i, name in enumerate(names)])
    csv_folder, kohya = root / "csv" / "images", root / "kohya" / "10_creatures"
    for folder in (csv_folder, kohya):
        folder.mkdir(parents=True)
        for name in names:
            shutil.copy(jsonl / name, folder / name)
    rows = [{"file_name": f"images/{name}", "caption": caption} for name, caption in zip(names, captions)]
    with open(root / "csv" / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    for name, caption in zip(names, captions):
        (kohya / name).with_suffix(".txt").write_text(caption + "\n")
    return jsonl, root / "csv", kohya.parent, captions


def test_caption_data_is_read_alike_in_each_layout_training_reads(
    tiny_sd, tiny_clip, prompts_file, tmp_path, capsys, monkeypatch
):
    jsonl, csv_folder, kohya, captions = caption_layouts(tmp_path / "data", 6)
    read = [read_caption_data(str(jsonl)), read_caption_data(str(csv_folder), caption_column="caption"),
            read_caption_data(str(kohya))]  # fmt: skip
    for images, texts, rows, uncaptioned, unreadable in read:
        assert (texts, rows, uncaptioned, unreadable) == (captions, 6, 0, [])
        assert [np.asarray(image).tolist() for image in images] == [
            np.asarray(demo_image(i)).tolist() for i in range(6)
        ]
    report = score(tiny_sd, tiny_clip, tmp_path, "--caption_data", str(kohya), prompts_file=prompts_file)
    model, settings = report["models"][0], report["settings"]
    assert len(model["caption_hits"]) == 6 and model["caption_accuracy"] == pytest.approx(
        sum(model["caption_hits"]) / 6
    )
    assert (settings["caption_images"], settings["caption_rows"], settings["caption_candidates"]) == (6, 6, 6)
    assert f"Caption accuracy on {kohya}: all its images, each tried with 6 captions" in capsys.readouterr().out
    # The column is the training script's --caption_column: a metadata file without it is one line naming theirs.
    with pytest.raises(UserError, match="--caption_column 'text' is not a column of .*; it has: caption"):
        score(tiny_sd, tiny_clip, tmp_path, "--caption_data", str(csv_folder), prompts_file=prompts_file)
    flags = ["--caption_data", str(csv_folder), "--caption_column", "caption"]
    assert score(tiny_sd, tiny_clip, tmp_path, *flags, prompts_file=prompts_file)["models"][0] == model
    # With the run's --caption_prefix: the classifier tries the captions the model was trained on, and it is recorded.
    tried, real = [], metrics.caption_hits
    monkeypatch.setattr(metrics, "caption_hits", lambda *a, **k: tried.append(a[3]) or real(*a, **k))
    report = score(tiny_sd, tiny_clip, tmp_path, *flags, "--caption_prefix", "sks,", prompts_file=prompts_file)
    assert report["settings"]["caption_prefix"] == "sks," and tried == [sorted(f"sks, {c}" for c in captions)]
    with pytest.raises(UserError, match="--caption_suffix is for --caption_data's captions"):
        score(tiny_sd, tiny_clip, tmp_path, "--caption_suffix", "style", prompts_file=prompts_file)
    with pytest.raises(UserError, match="--caption_from_filename is for --caption_data's captions"):
        score(tiny_sd, tiny_clip, tmp_path, "--caption_from_filename", prompts_file=prompts_file)


def test_caption_and_reference_data_saved_with_save_to_disk_read_as_their_folder(tmp_path):
    jsonl, _, _, captions = caption_layouts(tmp_path / "data", 4)
    dataset = datasets.load_dataset("imagefolder", data_dir=str(jsonl), split="train")
    dataset.save_to_disk(tmp_path / "one")
    datasets.DatasetDict(train=dataset).save_to_disk(tmp_path / "dict")
    images = [np.asarray(demo_image(i)).tolist() for i in range(4)]
    for saved in (tmp_path / "one", tmp_path / "dict"):
        read, texts, rows, uncaptioned, unreadable = read_caption_data(str(saved))
        assert (texts, rows, uncaptioned, unreadable) == (captions, 4, 0, [])
        assert [np.asarray(image).tolist() for image in read] == images
        references, unreadable = metrics.read_reference_images(str(saved))
        assert [np.asarray(image).tolist() for image in references] == images and unreadable == []
    datasets.DatasetDict(test=dataset).save_to_disk(tmp_path / "no-train")
    with pytest.raises(UserError, match="--reference_data .*no-train has no 'train' split \\(it has: test\\)"):
        metrics.read_reference_images(str(tmp_path / "no-train"))
    dataset.rename_column("image", "picture").save_to_disk(tmp_path / "picture")
    with pytest.raises(UserError, match="--caption_data .*picture has no 'image' column; it has: picture, text"):
        read_caption_data(str(tmp_path / "picture"))
    with pytest.raises(
        UserError, match="--caption_column 'caption' is not a column of --caption_data .*; it has: text"
    ):
        read_caption_data(str(tmp_path / "one"), caption_column="caption")


def test_images_that_cant_be_read_are_left_out_and_named_and_photos_stand_as_training_sees_them(
    tiny_sd, tiny_clip, prompts_file, tmp_path, capsys
):
    # A caption-file folder as phones and scrapers leave it: a portrait photo stored sideways with an EXIF
    # orientation tag, and a JPEG cut short by a failed download.
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        demo_image(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"creature {i}")
    sideways = demo_image(3).resize((64, 48))
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways.save(folder / "3.jpg", exif=exif)
    (folder / "3.txt").write_text("creature 3")
    (folder / "4.jpg").write_bytes((folder / "3.jpg").read_bytes()[:300])
    (folder / "4.txt").write_text("creature 4")

    images, captions, rows, uncaptioned, unreadable = read_caption_data(str(folder))
    assert (captions, rows, uncaptioned) == (["creature 0", "creature 1", "creature 2", "creature 3"], 5, 0)
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{folder / '4.jpg'} (")
    assert images[3].size == (48, 64)  # upright, as training decodes it
    references, unreadable = metrics.read_reference_images(str(folder))
    assert [image.size for image in references][3] == (48, 64) and unreadable[0].startswith(str(folder / "4.jpg"))

    report = score(tiny_sd, tiny_clip, tmp_path, "--caption_data", str(folder), "--reference_data", str(folder),
                   prompts_file=prompts_file)  # fmt: skip
    out = capsys.readouterr().out
    assert f"Left out 1 image of {folder} that can't be read: {folder / '4.jpg'}" in out
    assert report["settings"]["caption_images"] == 4 and len(report["models"][0]["caption_hits"]) == 4
    assert report["settings"]["unreadable_images"] == {"caption_data": unreadable, "reference_data": unreadable}
    left_out = f"Left out, as they can't be read: {unreadable[0]}."
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"}\n{"file": "1.png"}\n')
    with pytest.raises(UserError, match="every line of its metadata.jsonl needs a file_name"):
        metrics.read_reference_images(str(folder))
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"\n')
    with pytest.raises(UserError, match="its metadata.jsonl can't be read: "):
        metrics.read_reference_images(str(folder))
    assert (tmp_path / "scores" / "report.md").read_text().count(left_out) == 2  # under each of the two sections


def test_a_large_caption_folder_is_sampled_with_a_seed_and_uncaptioned_images_are_left_out(tmp_path):
    jsonl, _, _, captions = caption_layouts(tmp_path / "data", 8)
    images, sampled, rows, uncaptioned, _ = read_caption_data(str(jsonl), max_images=5)
    assert (len(images), rows, uncaptioned) == (5, 8, 0)
    assert sampled == [caption for caption in captions if caption in sampled]  # in the folder's order
    assert sampled != captions[:5] and read_caption_data(str(jsonl), max_images=5)[1] == sampled
    assert read_caption_data(str(jsonl), max_images=8)[1] == captions  # a sample only of more than asked

    # Images without a caption are left out and counted; a folder with no captions at all is one line.
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    for i in range(3):
        demo_image(i).save(kohya / f"{i}.png")
    (kohya / "0.txt").write_text("a creature")
    (kohya / "1.txt").write_text("another creature")
    assert read_caption_data(str(kohya))[1:] == (["a creature", "another creature"], 2, 1, [])
    # The training run's --caption_prefix and --caption_suffix, around each caption as training put them.
    affixed = read_caption_data(str(kohya), caption_prefix="sks,", caption_suffix=", style")[1]
    assert affixed == ["sks, a creature , style", "sks, another creature , style"]
    lists = image_folder(tmp_path / "lists", [(f"{i}.png", demo_image(i), [] if i == 1 else ["first", "second"])
                                              for i in range(3)])  # fmt: skip
    assert read_caption_data(str(lists))[1:] == (["first", "first"], 2, 1, [])  # a list's first caption
    (kohya / "0.txt").unlink()
    with pytest.raises(UserError, match="needs at least 2 captioned images, found 1"):
        read_caption_data(str(kohya))
    (kohya / "1.txt").unlink()
    with pytest.raises(UserError, match="no metadata file .* and no images with .txt caption files"):
        read_caption_data(str(kohya))
    with pytest.raises(UserError, match="--max_caption_images must be 0 .all. or at least 2, got 1"):
        metrics.parse_args(["--caption_data", str(jsonl), "--max_caption_images", "1"])


def test_caption_errors_do_not_depend_on_how_many_images_go_through_at_once(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    images, candidates = [demo_image(i) for i in range(5)], ["a red creature", "a green creature", "a blue one"]
    whole = caption_errors(pipeline, images, candidates, resolution=32, timesteps=(300, 700))
    parts = caption_errors(pipeline, images, candidates, resolution=32, timesteps=(300, 700), batch_size=2)
    assert torch.allclose(parts, whole, rtol=1e-5, atol=1e-6) and whole.shape == (5, 3)
    assert len(set(whole.flatten().tolist())) == 15  # every image and caption its own error
