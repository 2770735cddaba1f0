"""Writing a file so that it is never seen half-written: under a temporary name beside it, renamed when complete.

    with written_atomically("model.safetensors") as partial:
        save_file(tensors, partial)      # model.safetensors appears whole, or not at all

A failure (or an interruption) inside the block leaves the file as it was, and no temporary file behind.
"""

import os
from contextlib import contextmanager


@contextmanager
def written_atomically(path):
    """A temporary name beside `path` to write to, renamed to `path` when the block ends; removed if it fails."""
    partial = f"{path}.partial-{os.getpid()}"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
