"""kohya-ss's --sample_prompts: the validation prompts from a text file, each with its own settings, as sd-scripts
reads a .txt prompt file, so a kohya-ss user's file draws the same kind of images here:

    # a comment; blank lines are skipped too
    a pikachu in a hat --n blurry, low quality --w 512 --h 768 --d 42 --l 7.5 --s 28
    a charmander on a beach

After each prompt, ` --n` is its negative prompt, `--w` and `--h` its size, `--d` its seed, `--l` its guidance
scale and `--s` its steps; a prompt without them takes the script's (--resolution, 20 steps, guidance 7.5, the
run's seed). sd-scripts' options for other models and samplers (--ss, --cn, ...) are refused by name rather than
ignored, as are its .toml and .json prompt files.

    read_sample_prompts(path) -> [(prompt, {"negative_prompt", "width", "height", "seed", "guidance_scale",
                                            "num_inference_steps"}: those the line sets)]
"""

import os
import re

from sdtoolkit.errors import UserError

# sd-scripts' options for SD 1.x, each as (what it sets, how its value is read).
OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("num_inference_steps", int),
}
# The others sd-scripts reads, which mean nothing for validation here.
OTHER_OPTIONS = {
    "ss": "a sampler of its own (validation images use the pipeline's scheduler)",
    "cn": "a ControlNet image",
    "g": "another model's guidance scale (--l is SD's)",
    "ctr": "a CFG truncation ratio",
    "rcfg": "a CFG renormalization",
    "fs": "a flow shift",
}


def read_sample_prompts(path):
    """[(prompt, settings)] of the prompt file at `path`, in its order; UserError naming the line at fault."""
    if not path.lower().endswith(".txt"):
        raise UserError(
            f"--sample_prompts {path}: this toolkit reads sd-scripts' .txt prompt files (one prompt a line, with"
            " --n, --w, --h, --d, --l and --s); write it as one"
        )
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--sample_prompts {path} is not UTF-8 text ({err.reason})") from err
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--sample_prompts {path}, line {number}"
        prompt, *options = line.split(" --")  # sd-scripts splits a line as this
        settings = {}
        for option in options:
            match = re.fullmatch(r"(\w+)\s+(.*)", option.strip(), re.DOTALL)
            name = match.group(1).lower() if match else option.strip()
            if name in OTHER_OPTIONS:
                raise UserError(f"{where}: --{name} is {OTHER_OPTIONS[name]}, which this toolkit does not use")
            if name not in OPTIONS or not match:
                raise UserError(f"{where}: --{option.strip()} is not an option; give --n, --w, --h, --d, --l or --s")
            key, kind = OPTIONS[name]
            try:
                value = kind(match.group(2).strip())
            except ValueError:
                raise UserError(f"{where}: --{name} takes a {kind.__name__}, got {match.group(2).strip()!r}") from None
            settings[key] = value
        for side in ("width", "height"):
            if side in settings and (settings[side] < 8 or settings[side] % 8):
                raise UserError(f"{where}: --{side[0]} must be a positive multiple of 8, got {settings[side]}")
        if settings.get("num_inference_steps", 1) < 1 or settings.get("guidance_scale", 0) < 0:
            raise UserError(f"{where}: --s must be at least 1 and --l at least 0")
        if not prompt.strip():
            raise UserError(f"{where}: the line has options but no prompt")
        prompts.append((prompt.strip(), settings))
    if not prompts:
        raise UserError(f"--sample_prompts {path} holds no prompts (one a line; # starts a comment)")
    return prompts
