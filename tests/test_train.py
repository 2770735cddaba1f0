"""train_text_to_image.py end to end on the tiny offline pipeline and the bundled data."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.inference import load_pipeline
from tests.conftest import (
    DEMO_DATA,
    image_folder,
    logged_losses,
    run_entry_point,
    train,
    train_whole_and_resumed,
    unet_weights,
)


def test_two_step_run_writes_a_pipeline_that_loads_and_generates(tiny_sd, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "2", "--validation_prompts", "a green creature", "a red creature")

    pipeline = StableDiffusionPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a green creature", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    # The trained UNet is what was saved, not the base one.
    base, tuned = unet_weights(Path(tiny_sd) / "unet"), unet_weights(out / "unet")
    assert not torch.equal(base["conv_in.weight"], tuned["conv_in.weight"])

    # Validation images as files (during training and at the end), the grid, the model card.
    assert sorted(p.name for p in (out / "validation" / "final").iterdir()) == ["00.png", "01.png"]
    assert (out / "validation" / "step-2" / "00.png").exists()
    assert (out / "val_imgs_grid.png").exists()
    card = (out / "README.md").read_text()
    assert "Learning rate: 0.0001" in card and '"a green creature"; "a red creature"' in card
    # Local paths stay out of the card (they mean nothing elsewhere); its snippet loads the folder it is in.
    assert "base_model:" not in card and "datasets:" not in card and str(tiny_sd) not in card
    assert "fine-tuned from a local folder `tiny-sd`" in card
    # The validation prompts are the card's example prompts (the hub's `widget`, gradio_app.py's examples).
    widget = ModelCard.load(out / "README.md").data.widget
    assert widget == [{"text": "a green creature"}, {"text": "a red creature"}]
    assert f'StableDiffusionPipeline.from_pretrained("{out}"' in card
    assert [step for step, _ in logged_losses(out)] == [1, 2]


def test_validation_steps_draw_every_n_steps_instead_of_every_epoch(tiny_sd, tmp_path):
    # 32 images in batches of 2: the run ends inside its first epoch, where epoch-based validation would draw too.
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "5", "--validation_steps", "2", "--validation_prompts", "a creature")
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final", "step-2", "step-4"]
    with pytest.raises(UserError, match="--validation_steps draws the --validation_prompts"):
        train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "x",
                                        "--validation_steps", "2"])  # fmt: skip
    # Drawn as the server draws prompts, they are refused as it refuses AUTOMATIC1111 syntax it does not read.
    with pytest.raises(UserError, match=r"--validation_prompts: '\[cat\|dog\]' is AUTOMATIC1111's alternation"):
        train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "x",
                                        "--validation_prompts", "a creature", "a [cat|dog]"])  # fmt: skip


def test_sample_at_first_draws_the_base_models_images_and_trains_the_same(tiny_sd, tmp_path):
    # kohya-ss's --sample_at_first: validation/step-0 holds the base model's images, and training is unchanged.
    flags = ["--max_train_steps", "2", "--validation_steps", "2", "--validation_prompts", "a creature"]
    train(tiny_sd, tmp_path / "first", *flags, "--sample_at_first")
    assert sorted(p.name for p in (tmp_path / "first" / "validation").iterdir()) == ["final", "step-0", "step-2"]
    train(tiny_sd, tmp_path / "plain", *flags)
    a, b = unet_weights(tmp_path / "first" / "unet"), unet_weights(tmp_path / "plain" / "unet")
    assert all(torch.equal(a[key], b[key]) for key in a)
    # The base model's image is not the trained one's.
    base, trained = (np.asarray(Image.open(tmp_path / "first" / "validation" / step / "00.png")) for step in
                     ("step-0", "step-2"))  # fmt: skip
    assert not np.array_equal(base, trained)
    with pytest.raises(UserError, match="--sample_at_first draws the --validation_prompts"):
        train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "x",
                                        "--sample_at_first"])  # fmt: skip


def test_model_card_is_written_without_validation_prompts(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "1", "--caption_prefix", 'sks "toy",')
    card = (tmp_path / "README.md").read_text()
    assert "This pipeline was fine-tuned from" in card
    assert "None" not in card.split("## Training")[0]  # no "for the prompts None"
    # Its usage example prompts a caption it trained on, as trained (prefixed), as a Python string.
    first = 'sks \\"toy\\", a cartoon drawing of a tall pink creature with three eyes, pointy ears and a long tail'
    assert f'image = pipeline("{first} on a light blue background").images[0]' in card
    assert not (tmp_path / "validation").exists()


def test_checkpoints_in_the_upstream_layout(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert (tmp_path / "checkpoint-4" / name).exists()
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="checkpoint-2/unet")
    assert unet.config.cross_attention_dim == 32
    assert not (tmp_path / "checkpoint-2" / "unet_ema").exists()


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_use_ema_writes_unet_ema_and_saves_the_ema_weights(tiny_sd, tmp_path):
    train(
        tiny_sd,
        tmp_path,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--use_ema",
        "--learning_rate",
        "1e-3",
    )
    ema = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="checkpoint-2/unet_ema")
    raw = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="checkpoint-2/unet")
    final = unet_weights(tmp_path / "unet")
    # The final pipeline carries the EMA weights, which differ from the raw trained ones.
    assert torch.equal(final["conv_in.weight"], ema.conv_in.weight.detach())
    assert not torch.equal(ema.conv_in.weight, raw.conv_in.weight)


def test_train_text_encoder_trains_all_its_weights_averages_them_and_resumes_bitwise(tiny_sd, tmp_path):
    # kohya-ss's fine_tune.py --train_text_encoder: every text encoder weight trains with the UNet's, here with its
    # own EMA and gradient checkpointing, saved whole in checkpoints and in the pipeline.
    common = ["--use_ema", "--gradient_checkpointing", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    flags = ["--train_text_encoder", "--text_encoder_lr", "5e-4", *common]
    train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    def text_encoder(folder):
        return load_file(str(folder / "model.safetensors"))

    base, final = text_encoder(Path(tiny_sd) / "text_encoder"), text_encoder(whole / "text_encoder")
    assert all(not torch.equal(base[key], final[key]) for key in base)  # every weight moved, the embeddings too
    # Resumed at step 2 (its text encoder, its average and their optimizer state), it ends where one run does.
    for name, weights in (("text_encoder", text_encoder), ("unet", unet_weights)):
        one, two = weights(whole / name), weights(parts / name)
        assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    # The pipeline holds the average; the checkpoint both, and metrics.py and gradio_app.py load its average.
    checkpoint = whole / "checkpoint-4"
    average, raw = text_encoder(checkpoint / "text_encoder_ema"), text_encoder(checkpoint / "text_encoder")
    assert all(torch.equal(final[key], average[key]) for key in final)
    assert not all(torch.equal(raw[key], average[key]) for key in raw)
    loaded = load_pipeline(str(checkpoint), "cpu", torch.float32).text_encoder.state_dict()
    assert all(torch.equal(loaded[key], final[key]) for key in final)
    assert "all the text encoder's at learning rate 0.0005" in (whole / "README.md").read_text()
    # A checkpoint with a trained text encoder goes on only with it, and one without only without.
    resume = ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    with pytest.raises(UserError, match="holds a trained text encoder; resume it with --train_text_encoder"):
        train(tiny_sd, parts, *common, *resume)
    train(tiny_sd, tmp_path / "unet-only", "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(UserError, match="has no text encoder trained; resume it without --train_text_encoder"):
        train(tiny_sd, tmp_path / "unet-only", "--train_text_encoder", *resume)


def test_stop_text_encoder_training_keeps_it_from_that_step_on_and_resumes_across_it(tiny_sd, tmp_path, caplog):
    # kohya-ss's train_db.py flag: the text encoder trains for the first 3 optimizer steps, the UNet for all 4. A run
    # resumed at step 2 stops it at the same step.
    flags = ["--train_text_encoder", "--stop_text_encoder_training", "3", "--checkpointing_steps", "1",
             "--learning_rate", "1e-3"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        train_whole_and_resumed(tiny_sd, tmp_path, *flags)
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    def text_encoder(folder):
        return load_file(str(folder / "text_encoder" / "model.safetensors"))

    step_2, step_3, final = (text_encoder(whole / sub) for sub in ("checkpoint-2", "checkpoint-3", "."))
    assert not all(torch.equal(step_2[key], step_3[key]) for key in final)  # it trained at step 3
    assert all(torch.equal(step_3[key], final[key]) for key in final)  # and not at step 4
    unet_3, unet_4 = unet_weights(whole / "checkpoint-3" / "unet"), unet_weights(whole / "unet")
    assert not all(torch.equal(unet_3[key], unet_4[key]) for key in unet_4)
    resumed = text_encoder(parts)
    assert all(torch.equal(resumed[key], final[key]) for key in final)
    assert caplog.text.count("Step 3: the text encoder stops training (--stop_text_encoder_training)") == 2
    assert "all the text encoder's for the first 3 steps" in (whole / "README.md").read_text()


def test_save_every_n_epochs_checkpoints_each_epochs_end_and_resumes_from_it_bitwise(tiny_sd, tmp_path):
    # 8 images at batch 2: 4 steps an epoch, 3 epochs. The first two epochs end in checkpoints; the last in the
    # final save.
    run = ["--max_train_samples", "8", "--num_train_epochs", "3", "--save_every_n_epochs", "1", "--learning_rate",
           "1e-3"]  # fmt: skip
    train(tiny_sd, tmp_path, *run)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert [step for step, _ in logged_losses(tmp_path)] == list(range(1, 13))
    final = unet_weights(tmp_path / "unet")
    # Resumed from the end of the second epoch, the third epoch trains as it did.
    train(tiny_sd, tmp_path, *run, "--resume_from_checkpoint", "checkpoint-8")
    again = unet_weights(tmp_path / "unet")
    assert all(torch.equal(final[k], again[k]) for k in final)
    # Every second epoch (step 8), beside every third step's checkpoints.
    train(tiny_sd, tmp_path / "two", *run, "--save_every_n_epochs", "2", "--checkpointing_steps", "3")
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "two").glob("checkpoint-*"))
    assert steps == [3, 6, 8, 9, 12]


def test_save_state_on_train_end_checkpoints_the_last_step_to_go_on_from_bitwise(tiny_sd, tmp_path, caplog):
    # kohya-ss's flag: 3 steps with a checkpoint every 2 also end in checkpoint-3, and going on from it to step 5
    # trains as 5 steps in one run. A last step that was just saved, or resumed from, is not saved again.
    run = ["--checkpointing_steps", "2", "--learning_rate", "1e-3", "--use_ema", "--save_state_on_train_end"]
    parts = tmp_path / "parts"

    def saved(*flags):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train(tiny_sd, parts, *run, *flags)
        steps = sorted(int(p.name.split("-")[1]) for p in parts.glob("checkpoint-*"))
        return steps, "at the end of training" in caplog.text

    assert saved("--max_train_steps", "3") == ([2, 3], True)
    assert saved("--max_train_steps", "5", "--resume_from_checkpoint", "latest") == ([2, 3, 4, 5], True)
    train(tiny_sd, tmp_path / "whole", *run, "--max_train_steps", "5")
    a, b = unet_weights(parts / "unet"), unet_weights(tmp_path / "whole" / "unet")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert saved("--max_train_steps", "5", "--resume_from_checkpoint", "latest") == ([2, 3, 4, 5], False)
    assert saved("--max_train_steps", "6", "--resume_from_checkpoint", "latest") == ([2, 3, 4, 5, 6], False)


def test_resume_from_a_named_checkpoint_loads_its_weights(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    shutil.rmtree(tmp_path / "unet")
    # Resuming at step 4 of 4 trains no further, so the saved UNet is exactly checkpoint-4's.
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-4")
    saved, checkpoint = unet_weights(tmp_path / "unet"), unet_weights(tmp_path / "checkpoint-4" / "unet")
    assert all(torch.equal(saved[k], checkpoint[k]) for k in checkpoint)


def test_resume_from_latest_continues_the_step_count(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    train(
        tiny_sd, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"
    )
    assert [step for step, _ in logged_losses(tmp_path)] == [5, 6]
    assert (tmp_path / "checkpoint-6").exists()


def test_resume_from_latest_with_no_checkpoint_starts_fresh(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")
    assert [step for step, _ in logged_losses(tmp_path)] == [1]


def test_resume_from_a_missing_checkpoint_is_an_error(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(UserError, match="no such checkpoint.*available: checkpoint-2"):
        train(tiny_sd, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-3")


def test_training_on_one_image_lowers_the_loss(tiny_sd, tmp_path):
    data = image_folder(tmp_path / "one", [("0000.png", Image.open(DEMO_DATA / "0000.png"), "a pink creature")])
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "100", "--train_batch_size", "1", "--learning_rate", "1e-3",
          "--center_crop", data=data)  # fmt: skip
    # Single-step losses are noisy (random timesteps), so compare medians of the first and last 10 steps.
    losses = torch.tensor([loss for _, loss in logged_losses(out)])
    first, last = losses[:10].median().item(), losses[-10:].median().item()
    assert last < 0.5 * first, f"loss did not fall: median of first 10 steps {first:.3f}, of last 10 {last:.3f}"


def test_caption_lists_pick_one_caption_at_random_per_seed(tiny_sd, tmp_path, monkeypatch):
    rows = [(f"000{i}.png", Image.open(DEMO_DATA / f"000{i}.png"), [f"creature {i} alpha", f"creature {i} beta", f"creature {i} gamma"])
            for i in range(2)]  # fmt: skip
    data = image_folder(tmp_path / "lists", rows)

    # Note every caption the training examples tokenize (the uncached path, where captions are picked per step).
    seen = []
    getitem = train_text_to_image.TrainingExamples.__getitem__

    def getitem_and_note(self, index):
        example = getitem(self, index)
        seen.append(self.tokenizer.decode(example["input_ids"], skip_special_tokens=True))
        return example

    monkeypatch.setattr(train_text_to_image.TrainingExamples, "__getitem__", getitem_and_note)
    flags = ["--max_train_steps", "12", "--train_batch_size", "2", "--no-cache_latents"]
    train(tiny_sd, tmp_path / "a", *flags, data=data)
    first = list(seen)
    # Every caption of each list is used, not only the first: 24 draws of 3 captions each.
    for i in range(2):
        assert {c for c in first if c.startswith(f"creature {i}")} == {
            f"creature {i} {w}" for w in ("alpha", "beta", "gamma")
        }
    # The same seed draws the same captions; another seed others.
    seen.clear()
    train(tiny_sd, tmp_path / "b", *flags, data=data)
    assert seen == first
    seen.clear()
    train(tiny_sd, tmp_path / "c", *flags, "--seed", "1", data=data)
    assert seen != first


def test_missing_dataset_is_one_clear_line(tiny_sd, tmp_path, capsys):
    result = run_entry_point(train_text_to_image.main, "--pretrained_model_name_or_path", tiny_sd, "--dataset_name",
                             "lambdalabs/pokemon-blip-captions", "--output_dir", tmp_path, capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not load the dataset 'lambdalabs/pokemon-blip-captions'")
    assert "lambdalabs/naruto-blip-captions" in error and "--train_data_dir" in error
    assert "Traceback" not in result.stderr


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    # In this process, as the script's entry point runs it (tests/test_resilience.py runs the script itself).
    result = run_entry_point(train_text_to_image.main, "--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4",
                             "--train_data_dir", DEMO_DATA, "--output_dir", tmp_path, capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not load the model 'CompVis/stable-diffusion-v1-4'")
    assert "HF_HUB_OFFLINE=1" in error and "sdtoolkit.fixtures" in error
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
        (["--resolution", "512,768"], "give one side in pixels, not '512,768': training is at one square resolution"),
        ([], "need either --dataset_name"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--vae_batch_size", "0"], "--vae_batch_size must be at least 1"),
        (["--lr_scheduler", "cosine_restarts"], "argument --lr_scheduler: invalid choice: 'cosine_restarts'"),
        (["--prediction_type", "v"], "argument --prediction_type: invalid choice: 'v'"),
    ],
)
def test_bad_flags_fail_before_loading_anything(flags, message):
    argv = ["--pretrained_model_name_or_path", "x", *flags]
    if flags:
        argv += ["--train_data_dir", "x"]
    with pytest.raises(UserError, match=message):
        train_text_to_image.parse_args(argv)


def test_a_square_resolution_written_as_kohya_ss_writes_it_is_one_side():
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "x",
                                           "--resolution", "384,384"])  # fmt: skip
    assert args.resolution == 384


def test_missing_data_folder_is_an_error(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        train(tiny_sd, tmp_path, data=tmp_path / "nope")


def test_wrong_caption_column_lists_the_columns(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="--caption_column 'caption' is not a column.*image, text"):
        train(tiny_sd, tmp_path, "--caption_column", "caption")


UPSTREAM_FLAGS = """--pretrained_model_name_or_path --revision --variant --non_ema_revision --dataset_name
--dataset_config_name --train_data_dir --image_column --caption_column --max_train_samples --validation_prompts
--validation_epochs --output_dir --cache_dir --seed --resolution --center_crop --random_flip
--image_interpolation_mode --train_batch_size --num_train_epochs --max_train_steps --gradient_accumulation_steps
--gradient_checkpointing --learning_rate --scale_lr --lr_scheduler --lr_warmup_steps --snr_gamma --dream_training
--dream_detail_preservation --use_8bit_adam --allow_tf32 --use_ema --offload_ema --foreach_ema
--dataloader_num_workers --adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon --max_grad_norm --push_to_hub
--hub_token --hub_model_id --prediction_type --logging_dir --mixed_precision --report_to --local_rank
--checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint --enable_xformers_memory_efficient_attention
--noise_offset --input_perturbation --tracker_project_name""".split()


def test_every_upstream_flag_with_its_default():
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    for flag in UPSTREAM_FLAGS:
        assert hasattr(args, flag[2:]), flag
    defaults = dict(
        image_column="image", caption_column="text", validation_epochs=5, output_dir="sd-model-finetuned",
        resolution=512, image_interpolation_mode="lanczos", train_batch_size=16, num_train_epochs=100,
        gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500,
        dream_detail_preservation=1.0, dataloader_num_workers=0, adam_beta1=0.9, adam_beta2=0.999,
        adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0, logging_dir="logs", report_to="tensorboard",
        checkpointing_steps=500, noise_offset=0, input_perturbation=0, tracker_project_name="text2image-fine-tune",
        mixed_precision=None, seed=None, max_train_steps=None, snr_gamma=None, use_ema=False,
    )  # fmt: skip
    for name, value in defaults.items():
        assert getattr(args, name) == value, name


def test_hub_token_is_never_logged(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "1", "--hub_token", "hf_secret_do_not_log")
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".png"):
            assert b"hf_secret_do_not_log" not in path.read_bytes(), path


def test_snr_gamma_dream_and_noise_tricks_run(tiny_sd, tmp_path):
    train(tiny_sd, tmp_path, "--max_train_steps", "2", "--snr_gamma", "5.0", "--dream_training",
          "--noise_offset", "0.1", "--input_perturbation", "0.1", "--gradient_checkpointing",
          "--gradient_accumulation_steps", "2", "--use_ema", "--foreach_ema")  # fmt: skip
    assert [step for step, _ in logged_losses(tmp_path)] == [1, 2]


def test_max_grad_norm_0_is_no_clipping(tiny_sd, tmp_path):
    # kohya-ss's reading: 0 turns clipping off, which is training with a bound no gradient reaches; a bound of 0
    # would scale every gradient to nothing.
    def trained(name, norm):
        train(tiny_sd, tmp_path / name, "--max_train_steps", "2", "--learning_rate", "1e-3", "--max_grad_norm", norm)
        return unet_weights(tmp_path / name / "unet")

    off, unreached, tight = trained("off", "0"), trained("unreached", "1e9"), trained("tight", "1e-4")
    assert all(torch.equal(off[k], unreached[k]) for k in off)
    assert not all(torch.equal(off[k], tight[k]) for k in off)


def test_a_fraction_of_warmup_steps_is_that_share_of_the_training_steps(tiny_sd, tmp_path):
    # kohya-ss's reading of --lr_warmup_steps below 1: half of 4 steps is the warmup of 2 steps.
    schedule = ["--max_train_steps", "4", "--lr_scheduler", "linear", "--learning_rate", "1e-3"]
    train(tiny_sd, tmp_path / "share", *schedule, "--lr_warmup_steps", "0.5")
    train(tiny_sd, tmp_path / "steps", *schedule, "--lr_warmup_steps", "2")
    share, steps = logged_losses(tmp_path / "share", "lr"), logged_losses(tmp_path / "steps", "lr")
    assert share == steps and [lr for _, lr in share] == pytest.approx([5e-4, 1e-3, 5e-4, 0])
    assert "linear schedule, 50% of the steps as warmup" in (tmp_path / "share" / "README.md").read_text()
    for bad in ("1.5", "-0.1", "some"):
        with pytest.raises(UserError, match="give a whole number of steps, or a fraction below 1 of them"):
            train_text_to_image.parse_args(["--pretrained_model_name_or_path", "m", "--lr_warmup_steps", bad])
