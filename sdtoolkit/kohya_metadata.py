"""kohya-ss's fine-tuning metadata (`--in_json`, or a dataset config's `metadata_file`): one JSON file that captions
a folder of images, as sd-scripts' fine_tune.py reads it, so a kohya-ss user's prepared data trains here as it is:

    {
      "dragon1": {"caption": "a green dragon in the sky", "tags": "dragon, flying, watercolor"},
      "dragon2": {"caption": "a red dragon on a rock"}
    }

or the same as JSON lines, one image a line: {"image_path": "dragon1.png", "caption": "...", "tags": "..."}.

A key is an image's path, absolute or relative to the images' folder (--train_data_dir, or the subset's image_dir),
with its extension or without it (sd-scripts' merge_captions_to_metadata.py writes the file name without it, or
the whole path with --full_path).
An image's caption is its "caption", then its "tags" after a comma, as sd-scripts joins them with its default
caption separator; with --enable_wildcard, each line of a caption of several lines gets the tags, as sd-scripts
does, since one line is drawn per example (a caption with no lines is then the tags alone, where sd-scripts drops
them). Other fields (image_size, train_resolution) are sizes for sd-scripts' buckets: the images are
read here, so they are not needed.

`read_kohya_metadata` returns the images and captions as a `datasets.Dataset` with the columns a caption-file
folder gives (image, text, repeats; see sdtoolkit/caption_folders.py), so training treats it as any other data.
"""

import glob
import json
import os

from datasets import Dataset
from datasets import Image as ImageFeature

from sdtoolkit.caption_folders import IMAGE_FILES
from sdtoolkit.errors import UserError

CAPTION_SEPARATOR = ","  # sd-scripts' default --caption_separator, between an image's caption and its tags


def read_metadata_file(path, name):
    """{key: entry} of a metadata .json (an object of objects) or .jsonl (objects with an "image_path"), in the
    file's order; UserError naming what is wrong with it, the file called `name`."""
    if not os.path.isfile(path):
        raise UserError(f"{name}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
            if path.lower().endswith(".jsonl"):
                metadata = {}
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
                        raise UserError(f"{name}, line {number}: each line must be an object with an"
                                        " \"image_path\"")  # fmt: skip
                    metadata[entry["image_path"]] = entry
            else:
                metadata = json.load(f)
    except UnicodeDecodeError as err:
        raise UserError(f"{name} is not UTF-8 text ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{name} is not valid JSON: {err}") from err
    if not isinstance(metadata, dict) or not all(isinstance(entry, dict) for entry in metadata.values()):
        raise UserError(
            f"{name} must hold one object that maps each image's key to an object of its fields (caption,"
            " tags), as sd-scripts' merge_captions_to_metadata.py writes"
        )
    for key, entry in metadata.items():
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise UserError(f"{name}: the {field} of {key!r} must be text, got {entry[field]!r}")
    return metadata


def caption_of(entry, wildcard=False):
    """An entry's caption as sd-scripts makes it: its caption, then its tags after a comma; with wildcard
    (--enable_wildcard), each non-empty line of the caption, then the tags made one line."""
    caption, tags = entry.get("caption") or "", entry.get("tags") or ""
    if not tags:
        return caption
    if wildcard:
        tags = tags.replace("\n", CAPTION_SEPARATOR)
        lines = [line for line in caption.split("\n") if line.strip()]
        return "\n".join(line + CAPTION_SEPARATOR + tags for line in lines) if lines else tags
    return caption + CAPTION_SEPARATOR + tags if caption else tags


class ImageFinder:
    """Finds the image a key names: the file itself, or the image file whose name is the key plus an image
    extension (any case). Each folder is listed once."""

    def __init__(self):
        self.folders = {}  # folder -> {name: file name, name without extension: file name}

    def listing(self, folder):
        if folder not in self.folders:
            names = {}
            if os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    stem, extension = os.path.splitext(name)
                    if extension.lower() in IMAGE_FILES and os.path.isfile(os.path.join(folder, name)):
                        names[name] = name
                        names.setdefault(stem, name)
            self.folders[folder] = names
        return self.folders[folder]

    def find(self, path):
        folder, name = os.path.split(os.path.normpath(path))
        found = self.listing(folder).get(name)
        return None if found is None else os.path.join(folder, found)


def read_kohya_metadata(path, image_dir=None, *, allow_missing_captions=False, repeats=1, subset=None, wildcard=False):
    """The images and captions of the metadata file `path` as a Dataset (image, text, repeats), and what to tell
    the user, as read_caption_folder returns them. Relative keys are looked up in image_dir. An entry whose image is
    not found is an error listing the first few; so is an empty caption, unless allow_missing_captions. wildcard:
    --enable_wildcard, which puts the tags on each line of a caption (caption_of).

    subset: where a --dataset_config names the file ("[[datasets.subsets]] 1 of [[datasets]] 1"), for messages;
    None for --in_json."""
    name = f"--in_json {path}" if subset is None else f"the metadata_file {path} of {subset}"
    folder_option = "--train_data_dir" if subset is None else "the subset's image_dir"
    metadata = read_metadata_file(path, name)
    if not metadata:
        raise UserError(f"{name} lists no images")
    finder = ImageFinder()
    rows, missing, empty, cached = [], [], [], []
    for key, entry in metadata.items():
        if os.path.isabs(key):
            image = finder.find(key)
        else:
            image = finder.find(os.path.join(image_dir, key)) if image_dir is not None else None
        if image is None:
            missing.append(key)
            where = key if os.path.isabs(key) or image_dir is None else os.path.join(image_dir, key)
            if glob.glob(glob.escape(os.path.splitext(where)[0]) + "*.npz"):  # <stem>.npz, or <stem>_<size>_sd.npz
                cached.append(key)
            continue
        caption = caption_of(entry, wildcard)
        if not caption:
            empty.append(key)
        rows.append((image, caption))

    def listed(keys):
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    if missing:
        if image_dir is None and any(not os.path.isabs(key) for key in missing):
            raise UserError(
                f"{name} names its images by relative paths ({listed(missing)}): give the folder they are in as"
                f" {folder_option}"
            )
        latents = (
            f"; {len(cached)} have sd-scripts' cached latents (.npz) beside them, which are not read here: the"
            " images themselves must be there"
            if cached
            else ""
        )
        raise UserError(
            f"{len(missing)} of the {len(metadata)} images {name} lists are not found"
            f"{f' in {image_dir}' if image_dir else ''}: {listed(missing)}{latents}"
        )
    if empty and not allow_missing_captions:
        raise UserError(
            f"{len(empty)} images of {name} have neither a caption nor tags: {listed(empty)} -- write"
            " their captions, or pass --allow_missing_captions to train those images with an empty caption"
        )
    with_tags = sum(1 for entry in metadata.values() if entry.get("tags"))
    notes = [
        f"Read {name}: {len(rows)} images"
        + (f" in {image_dir}" if image_dir else "")
        + (f", {with_tags} with tags after their caption" if with_tags else "")
        + (f", each {repeats} times per epoch" if repeats > 1 else "")
    ]
    if empty:
        notes.append(f"--allow_missing_captions: {len(empty)} images train with an empty caption")
    dataset = Dataset.from_dict(
        {"image": [image for image, _ in rows], "text": [text for _, text in rows], "repeats": [repeats] * len(rows)}
    )
    return dataset.cast_column("image", ImageFeature()), notes
