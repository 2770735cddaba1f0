"""The one-line errors the scripts show people instead of a traceback.

A script raises `UserError("what is wrong; what to do")` wherever input is bad, and its entry point runs
`main` through `run_main`, which prints `error: ...` on one line and exits with code 2. Tests call `main`
directly and see the exception.

Training that stops before its end on purpose (SIGTERM, Ctrl-C, a NaN loss) raises `TrainingStopped` with
the exit code to use; `run_main` prints `stopped: ...` and exits with it.
"""

import sys


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line for the person running the script."""


class TrainingStopped(Exception):
    """Training ended early with a checkpoint to resume from (or the reason there is none)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main):
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def first_line(err):
    """The first non-empty line of an exception's message, for wrapping library errors in a UserError."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
