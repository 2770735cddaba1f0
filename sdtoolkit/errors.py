"""The one-line errors the scripts show people instead of a traceback.

A script raises `UserError("what is wrong; what to do")` wherever input is bad, and its entry point runs
`main` through `run_main`, which prints `error: ...` on one line and exits with code 2. Tests call `main`
directly and see the exception.

Training that stops before its end on purpose (SIGTERM, Ctrl-C, a NaN loss) raises `TrainingStopped` with
the exit code to use; `run_main` prints `stopped: ...` and exits with it.

Under `python -m sdtoolkit.launch` (what train.sh runs), that last line and its exit code are also appended
to the file named by SDTOOLKIT_LAST_LINE_FILE, so that the launcher can repeat them after the launch's own
report of the failure: the user's last line is the script's, and so is the exit code. With several processes,
the others then fail too, wherever they were waiting for the one that stopped (a barrier, a collective); a
process that fails after another has left its line there exits quietly, without a traceback that would bury
the reason.
"""

import argparse
import difflib
import json
import os
import re
import sys

LAST_LINE_FILE = "SDTOOLKIT_LAST_LINE_FILE"
# An unknown flag whose value may be a secret (--huggingface_token, --wandb_api_key, AUTOMATIC1111's --api-auth
# user:password, ...): its value is not repeated.
SECRET_FLAG = re.compile(r"^--[\w-]*(token|api[_-]?key|password|secret|auth)$", re.IGNORECASE)


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line for the person running the script."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a flag without its value, an unknown flag) are UserErrors: the usage, then
    the one `error:` line with exit code 2, which the launcher repeats last like any other bad input.

    An unknown flag that another trainer has (known_elsewhere: {"--flag": "what it is here"}) is named with what
    does its work here, and one that is a near miss of a flag of this parser with that flag. The value of an
    unknown flag named like a secret (a token, an API key, a password) is shown as *** (SECRET_FLAG): the line is
    printed and kept by the launcher."""

    def __init__(self, *args, known_elsewhere=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.known_elsewhere = known_elsewhere or {}

    def error(self, message):
        self.print_usage(sys.stderr)
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix) :].split(" ")
            for i, word in enumerate(words):
                name, equals, _ = word.partition("=")
                if SECRET_FLAG.match(name):
                    if equals:
                        words[i] = f"{name}=***"
                    elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                        words[i + 1] = "***"
            message = prefix + " ".join(words)
            flags = [word.split("=")[0] for word in words if word.startswith("--")]
            ours = [flag for action in self._actions for flag in action.option_strings]
            hints = []
            for flag in dict.fromkeys(flags):
                # "--learning-rate" -> "--learning_rate": hyphens inside a name are the commonest near miss.
                near = difflib.get_close_matches("--" + flag[2:].replace("-", "_"), ours, n=1, cutoff=0.85)
                if flag in self.known_elsewhere:
                    hints.append(f"{flag} is {self.known_elsewhere[flag]}")
                elif near:
                    hints.append(f"did you mean {near[0]}?")
            if hints:
                message += " -- " + "; ".join(hints)
        raise UserError(message)


class TrainingStopped(Exception):
    """Training ended early with a checkpoint to resume from (or the reason there is none)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main):
    try:
        main()
    except UserError as err:
        last_words(f"error: {err}", 2)
    except TrainingStopped as err:
        last_words(f"stopped: {err}", err.exit_code)
    except KeyboardInterrupt:
        last_words("error: interrupted", 130)
    except Exception:
        if not another_process_stopped():
            raise
        sys.exit(2)


def another_process_stopped():
    """Whether a process of the same launch has already stopped with its last line (see last_words)."""
    record = os.environ.get(LAST_LINE_FILE)
    return bool(record) and os.path.isfile(record) and os.path.getsize(record) > 0


def last_words(line, exit_code):
    """Print the script's last line, record it for the launcher if there is one, and exit."""
    # One write, newline included: the processes of a launch share stderr, and print's two writes (the text, then
    # the newline) let another process's line in between ("...latest" + "stopped: ..." on one line).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    record = os.environ.get(LAST_LINE_FILE)
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"line": line, "exit_code": exit_code}) + "\n")
    sys.exit(exit_code)


def first_line(err):
    """The first non-empty line of an exception's message, for wrapping library errors in a UserError."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
