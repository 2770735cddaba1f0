"""`accelerate launch`, with the training script's own last line and exit code.

When a script started by `accelerate launch` fails, accelerate (and, for several processes, torch's elastic
agent) reports the failed child process with a traceback of its own and exit code 1, printed after the
script's one-line `error: ...`. This runs accelerate's own launch command, with the same options and config
files, and when the script ended with its `error:` or `stopped:` line, prints that line last and exits with
the script's code (2 for an error) instead of accelerate's traceback. train.sh launches through it:

    python -m sdtoolkit.launch [accelerate launch options] train_text_to_image.py [script options]

A script that crashed with a traceback of its own (a bug, not bad input) leaves no such line, and gets
accelerate's full report as usual. What accelerate refuses before it starts the script (a config file that is
not there or holds a value it does not know, DeepSpeed's config without DeepSpeed installed) is bad input too:
one `error:` line and exit code 2.
"""

import json
import os
import subprocess
import sys
import tempfile

from accelerate.commands.launch import launch_command, launch_command_parser

from sdtoolkit.errors import LAST_LINE_FILE, first_line


def main(argv=None):
    args = launch_command_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        record = os.path.join(scratch, "last-lines.jsonl")
        os.environ[LAST_LINE_FILE] = record  # inherited by every process accelerate starts
        try:
            launch_command(args)
        except (Exception, SystemExit) as err:
            # The first process to fail says why; the others were stopped because of it.
            if not os.path.exists(record):
                # No process has run: accelerate's own checks of its options and config file failed.
                if isinstance(err, (FileNotFoundError, ImportError, ValueError)):
                    print(f"error: {first_line(err)}", file=sys.stderr)
                    sys.exit(2)
                raise
            with open(record) as f:
                first = json.loads(f.readline())
            # One process runs as a plain subprocess and its line was the last printed; with several, torch's
            # elastic agent has reported the failure after it.
            if not isinstance(err, subprocess.CalledProcessError):
                print(first["line"], file=sys.stderr)
            sys.exit(first["exit_code"])


if __name__ == "__main__":
    main()
