"""kohya-ss's --sample_prompts: the validation prompts from a file, each with its own settings, read as sd-scripts reads
its three kinds of prompt file, so a kohya-ss user's file draws the same kind of images here.

A .txt file holds a prompt a line, its settings after it:

    # a comment; blank lines are skipped too
    a pikachu in a hat --n blurry, low quality --w 512 --h 768 --d 42 --l 7.5 --s 28
    a charmander on a beach

After each prompt, ` --n` is its negative prompt, `--w` and `--h` its size, `--d` its seed, `--l` its guidance
scale, `--s` its steps and `--ss` its sampler (sd-scripts' names: euler_a, dpmsolver++, ...; see SAMPLERS). A .toml
file holds them by name, a [prompt] table's values standing for every prompt's (a prompt's own win):

    [prompt]
    sample_steps = 28
    negative_prompt = "blurry"
    [[prompt.subset]]
    prompt = "a pikachu in a hat"
    width = 512
    height = 768

and a .json file a list of such tables (prompt, negative_prompt, width, height, seed, scale, sample_steps,
sample_sampler), or of lines as a .txt file writes them. A prompt without a setting takes the script's
(--resolution, 20 steps, guidance 7.5, the run's seed, --sample_sampler or else the model's own scheduler).
sd-scripts' settings for other models (--cn, --g, ...) are refused by name rather than ignored.

    read_sample_prompts(path) -> [(prompt, {"negative_prompt", "width", "height", "seed", "guidance_scale",
                                            "num_inference_steps", "sampler"}: those the file sets)]
    sampler_scheduler("euler_a", pipeline.scheduler.config)   # the scheduler that sampler draws with
"""

import json
import os
import re
import tomllib

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

from sdtoolkit.errors import UserError

# sd-scripts' sampler names (its --sample_sampler's choices, and a prompt's --ss), each as the diffusers scheduler
# it samples with: (class, settings). The "k_" names are the same schedulers as the others.
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {}),
}
SAMPLERS.update({f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})

# sd-scripts' options for SD 1.x, each as (what it sets, how its value is read).
OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("num_inference_steps", int),
    "ss": ("sampler", str),
}
# The others sd-scripts reads, which mean nothing for validation here.
OTHER_OPTIONS = {
    "cn": "a ControlNet image",
    "g": "another model's guidance scale (--l is SD's)",
    "ctr": "a CFG truncation ratio",
    "rcfg": "a CFG renormalization",
    "fs": "a flow shift",
}


# The same settings by name, in a .toml or .json prompt file, and the names of the others.
KEYS = {
    "negative_prompt": ("negative_prompt", str),
    "width": ("width", int),
    "height": ("height", int),
    "seed": ("seed", int),
    "scale": ("guidance_scale", float),
    "sample_steps": ("num_inference_steps", int),
    "sample_sampler": ("sampler", str),
}
OTHER_KEYS = {
    "controlnet_image": OTHER_OPTIONS["cn"],
    "guidance_scale": OTHER_OPTIONS["g"],
    "cfg_trunc_ratio": OTHER_OPTIONS["ctr"],
    "renorm_cfg": OTHER_OPTIONS["rcfg"],
    "flow_shift": OTHER_OPTIONS["fs"],
}


def read_sample_prompts(path):
    """[(prompt, settings)] of the prompt file at `path`, in its order; UserError naming the prompt at fault."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".txt", ".toml", ".json"):
        raise UserError(f"--sample_prompts {path}: give one of sd-scripts' prompt files, .txt, .toml or .json")
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
            text = f.read()
    except UnicodeDecodeError as err:
        raise UserError(f"--sample_prompts {path} is not UTF-8 text ({err.reason})") from err
    # The file's prompts, each as (where it is, its line or its table).
    if kind == ".txt":
        entries = [(f"line {number}", line.strip()) for number, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.strip().startswith("#")]  # fmt: skip
    elif kind == ".toml":
        try:
            table = tomllib.loads(text).get("prompt")
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"--sample_prompts {path} is not valid TOML: {err}") from err
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise UserError(
                f"--sample_prompts {path}: sd-scripts' .toml holds a [prompt] table and a [[prompt.subset]] table"
                " for each prompt"
            )
        defaults = {key: value for key, value in table.items() if key != "subset"}
        entries = [(f"[[prompt.subset]] {number}", {**defaults, **subset} if isinstance(subset, dict) else subset)
                   for number, subset in enumerate(table["subset"], 1)]  # fmt: skip
    else:
        try:
            listed = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--sample_prompts {path} is not valid JSON: {err}") from err
        if not isinstance(listed, list):
            raise UserError(f"--sample_prompts {path}: sd-scripts' .json holds a list of prompts")
        entries = [(f"prompt {number}", entry) for number, entry in enumerate(listed, 1)]
    prompts = []
    for where, entry in entries:
        where = f"--sample_prompts {path}, {where}"
        if isinstance(entry, str):
            prompt, settings = line_settings(entry, where)
        elif isinstance(entry, dict):
            prompt, settings = table_settings(entry, where)
        else:
            raise UserError(f"{where}: a prompt is a table of its settings or a line, got {entry!r}")
        for side in ("width", "height"):
            if side in settings and (settings[side] < 8 or settings[side] % 8):
                raise UserError(f"{where}: its {side} must be a positive multiple of 8, got {settings[side]}")
        if settings.get("num_inference_steps", 1) < 1 or settings.get("guidance_scale", 0) < 0:
            raise UserError(f"{where}: its steps must be at least 1 and its guidance scale at least 0")
        if "sampler" in settings:
            settings["sampler"] = checked_sampler(settings["sampler"], f"{where}: its sampler")
        if not prompt.strip():
            raise UserError(f"{where}: it has settings but no prompt")
        prompts.append((prompt.strip(), settings))
    if not prompts:
        raise UserError(f"--sample_prompts {path} holds no prompts")
    return prompts


def line_settings(line, where):
    """(prompt, settings) of a prompt line: the prompt, then --n, --w, --h, --d, --l, --s and --ss options."""
    prompt, *options = line.split(" --")  # sd-scripts splits a line as this
    settings = {}
    for option in options:
        match = re.fullmatch(r"(\w+)\s+(.*)", option.strip(), re.DOTALL)
        name = match.group(1).lower() if match else option.strip()
        if name in OTHER_OPTIONS:
            raise UserError(f"{where}: --{name} is {OTHER_OPTIONS[name]}, which this toolkit does not use")
        if name not in OPTIONS or not match:
            raise UserError(f"{where}: --{option.strip()} is not an option; give --n, --w, --h, --d, --l, --s or --ss")
        key, kind = OPTIONS[name]
        try:
            settings[key] = kind(match.group(2).strip())
        except ValueError:
            raise UserError(f"{where}: --{name} takes a {kind.__name__}, got {match.group(2).strip()!r}") from None
    return prompt, settings


def table_settings(table, where):
    """(prompt, settings) of a prompt given by name, as a .toml or .json file gives it."""
    settings = {}
    for name, value in table.items():
        if name in OTHER_KEYS:
            raise UserError(f"{where}: {name} is {OTHER_KEYS[name]}, which this toolkit does not use")
        if name == "prompt":
            continue
        if name not in KEYS:
            raise UserError(f"{where}: {name} is not a setting; give prompt, {', '.join(KEYS)}")
        key, kind = KEYS[name]
        if kind is str:
            fits = isinstance(value, str)
        else:  # a number, not a bool (which Python counts as one); an int only when whole
            fits = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and (kind is float or value == int(value))
            )
        if not fits:
            raise UserError(f"{where}: {name} takes a {kind.__name__}, got {value!r}")
        settings[key] = kind(value)
    if not isinstance(table.get("prompt"), str):
        raise UserError(f"{where}: it has no prompt (a string)")
    return table["prompt"], settings


def checked_sampler(name, what):
    """sd-scripts' sampler `name`, in lower case; UserError listing the names for one it does not offer (where
    sd-scripts would quietly draw with DDIM)."""
    if name.strip().lower() not in SAMPLERS:
        raise UserError(f"{what} {name!r} is not one of sd-scripts' samplers: {', '.join(SAMPLERS)}")
    return name.strip().lower()


def sampler_scheduler(name, config):
    """The scheduler sd-scripts' sampler `name` draws with, made from the model's scheduler config: its betas and
    prediction type, as the model was trained (sd-scripts builds it from SD's defaults instead)."""
    kind, settings = SAMPLERS[name]
    return kind.from_config(config, **settings)
