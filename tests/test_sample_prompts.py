"""--sample_prompts: kohya-ss's .txt, .toml and .json prompt files, each validation prompt with its own negative
prompt, size, seed, guidance scale and steps."""

import json
import logging
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

import train_text_to_image
from sdtoolkit.errors import UserError
from sdtoolkit.sample_prompts import read_sample_prompts
from tests.conftest import train

FILE = """# sample prompts, as kohya-ss writes them
a blue square

a red disc --n blurry, dark --w 48 --h 32 --d 5 --l 4 --s 3 --ss Euler_A
"""


def test_a_prompt_file_is_read_as_sd_scripts_reads_it(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(FILE)
    assert read_sample_prompts(str(path)) == [
        ("a blue square", {}),
        ("a red disc", {"negative_prompt": "blurry, dark", "width": 48, "height": 32, "seed": 5, "guidance_scale": 4.0,
                        "num_inference_steps": 3, "sampler": "euler_a"}),
    ]  # fmt: skip


def test_toml_and_json_prompt_files_are_read_as_sd_scripts_reads_them(tmp_path):
    # A .toml's [prompt] values stand for each [[prompt.subset]]'s, which win; a .json lists tables or lines.
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nsample_steps = 3\nscale = 4\nnegative_prompt = "blurry"\n'
                    '[[prompt.subset]]\nprompt = "a blue square"\n'
                    '[[prompt.subset]]\nprompt = "a red disc"\nwidth = 48\nheight = 32\nseed = 5\nsample_steps = 2\n'
                    'sample_sampler = "k_dpm_2_a"\n')  # fmt: skip
    assert read_sample_prompts(str(toml)) == [
        ("a blue square", {"num_inference_steps": 3, "guidance_scale": 4.0, "negative_prompt": "blurry"}),
        ("a red disc", {"num_inference_steps": 2, "guidance_scale": 4.0, "negative_prompt": "blurry", "width": 48,
                        "height": 32, "seed": 5, "sampler": "k_dpm_2_a"}),
    ]  # fmt: skip
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([{"prompt": "a red disc", "width": 48, "scale": 4.5}, "a blue square --s 3"]))
    assert read_sample_prompts(str(listed)) == [
        ("a red disc", {"width": 48, "guidance_scale": 4.5}), ("a blue square", {"num_inference_steps": 3})]  # fmt: skip


@pytest.mark.parametrize(
    "text, name, message",
    [
        ("a cat --ss turbo\n", "p.txt", "line 1: its sampler 'turbo' is not one of sd-scripts' samplers: ddim, pndm,"),
        ("a cat --cn edges.png\n", "p.txt", "line 1: --cn is a ControlNet image, which this toolkit does not use"),
        ("a cat --x 3\n", "p.txt", "line 1: --x 3 is not an option; give --n, --w, --h, --d, --l, --s or --ss"),
        ("a cat --w wide\n", "p.txt", "line 1: --w takes a int, got 'wide'"),
        ("a cat --w 50\n", "p.txt", "line 1: its width must be a positive multiple of 8, got 50"),
        ("a cat --s 0\n", "p.txt", "line 1: its steps must be at least 1 and its guidance scale at least 0"),
        ("# only a comment\n", "p.txt", "holds no prompts"),
        ("[prompt]\n", "p.toml", "sd-scripts' .toml holds a [prompt] table and a [[prompt.subset]] table for each"),
        ('[prompt]\nsample_sampler = "euler_b"\n[[prompt.subset]]\nprompt = "a cat"\n', "p.toml",
         "[[prompt.subset]] 1: its sampler 'euler_b' is not one of sd-scripts' samplers"),
        ('[prompt]\n[[prompt.subset]]\nprompt = "a cat"\nwidth = "wide"\n', "p.toml",
         "[[prompt.subset]] 1: width takes a int, got 'wide'"),
        ('[{"prompt": "a cat", "steps": 3}]', "p.json", "prompt 1: steps is not a setting; give prompt,"),
        ('[{"negative_prompt": "blur"}]', "p.json", "prompt 1: it has no prompt (a string)"),
        ('[{"prompt": "a cat", "width": 48.5}]', "p.json", "prompt 1: width takes a int, got 48.5"),
        ('{"prompt": "a cat"}', "p.json", "sd-scripts' .json holds a list of prompts"),
        ("[3]", "p.json", "prompt 1: a prompt is a table of its settings or a line, got 3"),
        ("a cat\n", "p.yaml", "give one of sd-scripts' prompt files, .txt, .toml or .json"),
    ],
    ids=["unknown-sampler", "controlnet", "unknown", "not-a-number", "not-multiple-of-8", "no-steps", "empty",
         "toml-no-subset", "toml-sampler", "toml-not-a-number", "json-unknown", "json-no-prompt", "json-fraction",
         "json-not-a-list", "json-not-a-prompt", "yaml"],
)  # fmt: skip
def test_what_cannot_be_read_is_one_line(tmp_path, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as error:
        read_sample_prompts(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validation_draws_each_prompt_with_its_settings(tiny_sd, tmp_path, monkeypatch):
    calls, negatives = [], []
    call, encode = StableDiffusionPipeline.__call__, train_text_to_image.encode_prompts

    def spy_call(self, *args, **kwargs):
        calls.append({key: kwargs[key] for key in ("num_inference_steps", "guidance_scale", "height", "width")})
        calls[-1]["seed"] = kwargs["generator"].initial_seed()
        calls[-1]["sampler"] = (type(self.scheduler).__name__, self.scheduler.config.get("algorithm_type"))
        return call(self, *args, **kwargs)

    def spy_encode(pipeline, prompt, negative, **kwargs):
        negatives.append(negative)
        return encode(pipeline, prompt, negative, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy_call)
    monkeypatch.setattr(train_text_to_image, "encode_prompts", spy_encode)
    (tmp_path / "prompts.txt").write_text(FILE)
    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "1", "--seed", "11", "--sample_prompts", str(tmp_path / "prompts.txt"),
          "--sample_sampler", "DPMSolver++")  # fmt: skip
    # Validated at the last step and at the end: each time the two prompts, the second with its own settings.
    own = {"num_inference_steps": 3, "guidance_scale": 4.0, "height": 32, "width": 48, "seed": 5,
           "sampler": ("EulerAncestralDiscreteScheduler", None)}  # fmt: skip
    default = {"num_inference_steps": 20, "guidance_scale": 7.5, "height": 32, "width": 32, "seed": 11,
               "sampler": ("DPMSolverMultistepScheduler", "dpmsolver++")}  # fmt: skip
    assert calls == [default, own] * 2 and negatives == [None, "blurry, dark"] * 2
    # The saved pipeline keeps the model's own scheduler.
    saved, base = (
        json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text()) for folder in (out, tiny_sd)
    )
    assert saved["_class_name"] == base["_class_name"]
    assert Image.open(out / "validation" / "final" / "00.png").size == (32, 32)
    assert Image.open(out / "validation" / "final" / "01.png").size == (48, 32)
    assert Image.open(out / "val_imgs_grid.png").size == (96, 32)  # two cells the size of the largest
    assert "a red disc" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="--sample_prompts and --validation_prompts both give the validation prompts"):
        train(tiny_sd, tmp_path / "both", "--sample_prompts", str(tmp_path / "prompts.txt"), "--validation_prompts",
              "x")  # fmt: skip


def test_a_sampler_that_cannot_sample_with_zero_terminal_snr_is_refused_before_training(tiny_sd, tmp_path, caplog):
    (tmp_path / "prompts.txt").write_text("a red disc --ss euler_a\na blue square --ss lms\n")
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match="the sampler k_dpm_2, lms .* cannot sample with zero terminal SNR, as this"
                                        " model trains; choose one of ddim, euler, euler_a, "):  # fmt: skip
        train(tiny_sd, tmp_path / "out", "--zero_terminal_snr", "--prediction_type", "v_prediction",
              "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_sampler", "k_dpm_2")  # fmt: skip
    assert "Running training" not in caplog.text
