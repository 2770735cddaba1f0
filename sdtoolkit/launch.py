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

Ctrl-C stops the script after its current step with a checkpoint (see StopRequest in train_text_to_image.py), and
the launcher waits for that, so that the script's `stopped:` line, with how to resume, is the last thing printed
and the command does not return while the checkpoint is still being written:

- One process: a terminal's Ctrl-C reaches the script as it reaches the launcher. The launcher leaves it to the
  script and goes on waiting (accelerate's own launcher would end at once with a KeyboardInterrupt traceback,
  the script still writing behind the prompt). A second Ctrl-C still interrupts the script.
- Several processes: torch's elastic agent, in the launcher, starts each in a session of its own, which a
  terminal's Ctrl-C does not reach; the agent passes the signal on (SIGTERM too), then kills the processes that
  have not ended within TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds. Its default, 30, is shorter than writing SD v1-4's
  checkpoint (about 14 GB with EMA and AdamW) takes on a slow disk: here it is 600 unless set.

A hangup (the terminal or ssh session closed) stops the script the same way. Under `nohup` it is ignored, and
stays so: torch's agent, which would catch it even then (the "Received 1 death signal, shutting down workers" of
`nohup accelerate launch` on several GPUs), is told to leave it alone.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

from accelerate.commands.launch import launch_command, launch_command_parser

from sdtoolkit.errors import LAST_LINE_FILE, first_line


def leave_ctrl_c_to_the_script(signum, frame):
    """The script's processes got the same Ctrl-C, and stop by themselves: keep waiting for them."""


def main(argv=None):
    args = launch_command_parser().parse_args(argv)
    # A handler, not SIG_IGN, which the script's process would inherit and Ctrl-C would then not reach it. (With
    # several processes, torch's elastic agent puts its own in place.)
    signal.signal(signal.SIGINT, leave_ctrl_c_to_the_script)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    # Under nohup, a hangup is ignored; torch's elastic agent would catch it anyway and stop every process. Its
    # signals_to_handle option comes from accelerate's options (accelerate hands torch every option it knows).
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        args.signals_to_handle = "SIGTERM,SIGINT,SIGQUIT"
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
