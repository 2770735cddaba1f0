"""kohya-ss's --config_file and --output_config for the training script: its flags kept in a TOML file, one
`flag = value` a line, in any [sections] (sd-scripts' files group them so; the sections mean nothing):

    [model]
    pretrained_model_name_or_path = "CompVis/stable-diffusion-v1-4"
    [training]
    learning_rate = 1e-05
    use_ema = true                                    # a switch: true gives it, false leaves it off
    validation_prompts = ["a red creature", "a blue creature"]

`config_argv` turns the file into command-line arguments that go before the command line's, so a flag given on
the command line wins over the file's, as in sd-scripts; each value goes through the same checks as on the command
line. The keys are this script's flag names. A kohya-ss name that is another flag here (shuffle_caption) or that
this toolkit does not have is refused, all of them in one line with what each is here, so a kohya-ss file is
converted in one pass. `write_config` writes the flags a command line gave (those not at their defaults).
"""

import argparse
import json
import os
import tomllib

from sdtoolkit.atomic_files import written_atomically
from sdtoolkit.errors import UserError

# Flags never written to a file: where the file goes, and secrets.
NOT_WRITTEN = {"config_file", "output_config", "hub_token"}


def toml_path(path):
    """The file --config_file names: with .toml added when it has no such suffix, as sd-scripts reads it."""
    return path if path.endswith(".toml") else path + ".toml"


def config_argv(path, parser, known_elsewhere):
    """The command-line arguments the TOML file at `path` stands for, for `parser`; UserError for a file that
    can't be read, or naming every key that is not a flag of parser (with known_elsewhere's hints)."""
    path = toml_path(path)
    if not os.path.isfile(path):
        raise UserError(f"--config_file {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
            config = tomllib.loads(f.read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--config_file {path} is not valid TOML: {err}") from err
    # Every section's keys as one table, as sd-scripts merges them.
    flat = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})

    argv, refused = [], []
    for key, value in flat.items():
        option = f"--{key}"
        action = parser._option_string_actions.get(option)
        if key in NOT_WRITTEN:
            raise UserError(f"--config_file {path}: {key} is for the command line, not a file")
        if action is None:
            hint = known_elsewhere.get(option)
            refused.append(f"{key} ({option} is {hint})" if hint else key)
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"--config_file {path}: {key} = {value!r} must be true or false")
            argv.append(option if value else f"--no-{key}")
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"--config_file {path}: {key} = {value!r} must be true or false")
            argv += [option] if value else []
        elif isinstance(value, (dict, bool)) or (isinstance(value, list) and action.nargs not in ("+", "*")):
            raise UserError(f"--config_file {path}: {key} = {value!r} is not a value --{key} takes")
        elif isinstance(value, list):
            argv += [option, *(str(item) for item in value)]
        else:
            argv.append(f"{option}={value}")  # one token, so that a value starting with "-" stays a value
    if refused:
        raise UserError(
            f"--config_file {path}: {', '.join(refused)} {'is not a flag' if len(refused) == 1 else 'are not flags'}"
            " of this script; write the file with this script's flag names"
        )
    return argv


def write_config(path, parser, args):
    """Write the flags of `args` that are not at `parser`'s defaults to the TOML file `path` (with .toml added as
    sd-scripts adds it), one `flag = value` a line; an existing file is left as it is, as in sd-scripts. Returns
    the path written."""
    path = toml_path(path)
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} exists already; give --config_file a new file")
    lines = ["# The flags of a train_text_to_image.py run (--output_config); run it again with --config_file FILE."]
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_WRITTEN or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        value = list(value) if isinstance(value, tuple) else value
        key = action.option_strings[0].removeprefix("--")
        lines.append(f"{key} = {json.dumps(value)}")  # JSON's strings, numbers, booleans and arrays are TOML's
    try:
        with written_atomically(path) as partial, open(partial, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    except OSError as err:
        raise UserError(f"--output_config: could not write {path}: {err.strerror or err}") from err
    return path
