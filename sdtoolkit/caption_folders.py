"""Folders of images with their captions in same-named text files, the layout kohya-ss/sd-scripts, OneTrainer,
SimpleTuner and EveryDream2 read:

    my-data/
      10_dragons/            a sub-folder named N_name repeats its images N times per epoch (kohya's convention)
        dragon1.png
        dragon1.txt          "a green dragon, flying, watercolor"
      40_sks dog/            an image with no caption file in an N_name folder takes the name as its caption
        photo1.jpg           "sks dog" (kohya's class tokens, DreamBooth's usual layout)
      cats/photo.jpg
      cats/photo.txt

With from_filename (--caption_from_filename), an image without a caption file is captioned by its file name
instead, as SimpleTuner's caption_strategy "filename" and OneTrainer read a folder of images named by what they
show: "a_red_dragon.png" is "a red dragon" (its stem, underscores as spaces).

`read_caption_folder` turns such a folder (searched recursively) into a `datasets.Dataset` with an `image`
column (decoded like any imagefolder's), a `text` column and a `repeats` column, so the rest of training
treats it like any other dataset.
"""

import os
import re

from datasets import Dataset
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

from sdtoolkit.errors import UserError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# The images a folder is read for: those a datasets imagefolder reads, and phones' AVIF and HEIC photos, so that
# none is left out unsaid (Pillow reads AVIF; HEIC it can't, and the check of every image before training names
# them).
IMAGE_FILES = set(IMAGE_EXTENSIONS) | {".avif", ".heic", ".heif"}


def repeat_folder(relative_dir):
    """(N, name) for the nearest enclosing folder named N_name (kohya's repeats and class tokens), else (1, None)."""
    for part in reversed(relative_dir.split(os.sep) if relative_dir else []):
        match = REPEAT_FOLDER.match(part)
        if match:
            return int(match.group(1)), match.group(2).strip()
    return 1, None


def find_images_and_captions(folder, caption_extension, recursive=True):
    """(images, caption files, orphan caption files): paths relative to folder, sorted; with recursive=False,
    only the folder's own files, not its sub-folders' (as sd-scripts reads a dataset config's image_dir)."""
    images, captions = [], set()
    for root, dirs, files in os.walk(folder):
        if not recursive:
            dirs.clear()
        for name in files:
            path = os.path.relpath(os.path.join(root, name), folder)
            if name.endswith(caption_extension):
                captions.add(path)
            elif os.path.splitext(name)[1].lower() in IMAGE_FILES:
                images.append(path)
    images.sort()
    stems = {os.path.splitext(path)[0] for path in images}
    orphans = sorted(path for path in captions if path[: -len(caption_extension)] not in stems)
    return images, captions, orphans


def has_captioned_images(folder, caption_extension=".txt", from_filename=False):
    """Whether the folder (searched recursively) holds at least one image with a caption: a same-named caption
    file, or the name of an N_name folder it is in, or with from_filename any image at all."""
    images, captions, _ = find_images_and_captions(folder, caption_extension)
    return any(
        from_filename
        or os.path.splitext(path)[0] + caption_extension in captions
        or repeat_folder(os.path.dirname(path))[1]
        for path in images
    )


def filename_caption(path):
    """An image's file name as its caption: the stem, underscores as spaces ("a_red_dragon.png": "a red dragon")."""
    return " ".join(os.path.splitext(os.path.basename(path))[0].replace("_", " ").split())


def read_caption(path):
    """A caption file's text, stripped; a file that is not UTF-8 is an error naming it. A byte-order mark, which
    Windows tools often write first, is not part of the text (CLIP would read it as three tokens)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().strip()
    except UnicodeDecodeError as err:
        raise UserError(f"caption file {path} is not UTF-8 text ({err.reason}); save it as UTF-8") from err


def read_caption_folder(folder, *, caption_extension=".txt", allow_missing_captions=False, subset=None,
                        from_filename=False):  # fmt: skip
    """The folder's images and captions as a Dataset (image, text, repeats), and what to tell the user.

    Returns (dataset, notes): notes is a list of log lines (counts, orphan caption files, captions missing or
    empty when allowed). An image with no caption file is captioned by its file name with from_filename, else in
    an N_name folder by the name, as kohya-ss does (its class tokens). Without allow_missing_captions, any other
    image with no caption file, or an empty one, is an error listing the first few.

    subset: a --dataset_config folder (sdtoolkit/dataset_config.Folder): then only the folder's own images are
    read, its num_repeats and class_tokens stand for the N_name folders', and folder names mean nothing.
    """
    images, captions, orphans = find_images_and_captions(folder, caption_extension, recursive=subset is None)
    rows, missing, empty, by_folder, by_filename = [], [], [], 0, 0
    for path in images:
        caption_path = os.path.splitext(path)[0] + caption_extension
        if subset is None:
            repeats, folder_name = repeat_folder(os.path.dirname(path))
        else:
            repeats, folder_name = subset.num_repeats, subset.class_tokens
        text = read_caption(os.path.join(folder, caption_path)) if caption_path in captions else None
        if text is None and from_filename:
            text, by_filename = filename_caption(path), by_filename + 1
        if text is None and folder_name:
            text, by_folder = folder_name, by_folder + 1
        if text is None:
            missing.append(path)
        elif not text:
            empty.append(caption_path)
        rows.append((path, text or "", repeats))

    def listed(paths):
        return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

    # photo.jpg.txt, as some captioning tools name it, is not photo.jpg's caption file: photo.txt is.
    listed_images = set(images)
    named = [path for path in orphans if path[: -len(caption_extension)] in listed_images]
    naming = ""
    if named:
        image = named[0][: -len(caption_extension)]
        naming = (
            f" (an image's caption file is named without the image's extension: {image} reads"
            f" {os.path.splitext(image)[0] + caption_extension}, not {named[0]})"
        )

    if (missing or empty) and not allow_missing_captions:
        problems = []
        if missing:
            problems.append(f"{len(missing)} images have no {caption_extension} caption file: {listed(missing)}")
        if empty:
            problems.append(f"{len(empty)} caption files are empty: {listed(empty)}")
        class_tokens = f", give its {subset.name} class_tokens" if subset is not None else ""
        raise UserError(
            f"{'; '.join(problems)} (in {folder}){naming} -- write their captions{class_tokens}, or pass"
            " --allow_missing_captions to train those images with an empty caption"
        )

    repeated = sum(1 for _, _, n in rows if n > 1)
    with_file = len(images) - len(missing) - by_folder - by_filename
    by_name = f", {by_filename} captioned by their file name" if by_filename else ""
    if subset is None:
        notes = [
            f"Read {folder} as a caption-file folder: {len(images)} images, {with_file} with a {caption_extension}"
            " caption"
            + by_name
            + (f", {by_folder} captioned by their N_name folder's name" if by_folder else "")
            + (f", {repeated} in N_name repeat folders" if repeated else "")
        ]
    else:
        notes = [
            f"Read {folder} ({subset.name}): {len(images)} images, {with_file} with a {caption_extension} caption"
            + by_name
            + (f", {by_folder} captioned by class_tokens" if by_folder else "")
            + (f", each {subset.num_repeats} times per epoch" if subset.num_repeats > 1 else "")
        ]
    if missing or empty:
        notes.append(f"--allow_missing_captions: {len(missing) + len(empty)} images train with an empty caption")
    if orphans:
        notes.append(
            f"{len(orphans)} caption files have no image beside them and are not used: {listed(orphans)}{naming}"
        )
    dataset = Dataset.from_dict(
        {
            "image": [os.path.join(folder, path) for path, _, _ in rows],
            "text": [text for _, text, _ in rows],
            "repeats": [n for _, _, n in rows],
        }
    )
    return dataset.cast_column("image", ImageFeature()), notes
