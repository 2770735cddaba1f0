"""kohya-ss's --dataset_config: a TOML (or JSON) file that lists a run's image folders and sets its data options,
read as sd-scripts reads it, so a kohya-ss user's file trains here as it is:

    [general]
    shuffle_caption = true
    keep_tokens = 1
    caption_extension = ".txt"

    [[datasets]]
    resolution = 512
    batch_size = 2
    enable_bucket = true

      [[datasets.subsets]]
      image_dir = "img/dragons"      # its images (not those of its sub-folders), captioned by same-named files
      num_repeats = 10
      class_tokens = "sks dragon"    # the caption of an image with no caption file

      [[datasets.subsets]]
      image_dir = "reg/dragons"
      is_reg = true                  # regularization images (--reg_data_dir's, weighed by --prior_loss_weight)

    [[datasets]]                     # a fine-tuning dataset: its subsets' captions come from a metadata file
      [[datasets.subsets]]
      metadata_file = "meta_cap.json"   # kohya-ss's fine-tuning metadata (see sdtoolkit/kohya_metadata.py)
      image_dir = "img/others"          # where its relative keys are

A value is looked up in the subset, then its dataset, then [general], as sd-scripts does. What is a folder's own
(`FOLDER_KEYS`: image_dir, metadata_file, num_repeats, class_tokens, ...) may differ between subsets; every other option is one
of this script's flags (`FLAGS`) and must come out the same for every subset, since it holds for the whole run. sd-scripts' options this toolkit does not have are accepted at their sd-scripts default and refused at any
other value, in one line, as is any key sd-scripts does not know either.

`read_dataset_config` returns the flags' values and the folders. The file's values win over the command line's, as
in sd-scripts (so train.sh's recipe gives way to them), and the log lists them. `read_folders` reads the folders'
images and captions into one dataset, for training and for metrics.py's caption accuracy alike.
"""

import json
import os
import tomllib
from dataclasses import dataclass

from datasets import concatenate_datasets

from sdtoolkit.caption_folders import read_caption_folder
from sdtoolkit.data import with_affixes, with_caption_lines
from sdtoolkit.errors import UserError
from sdtoolkit.kohya_metadata import read_kohya_metadata

# sd-scripts' option -> (this script's flag, the value the flag takes from the option's). random_crop is the
# opposite of --center_crop: sd-scripts center-crops unless told to crop at random.
FLAGS = {
    "resolution": ("resolution", None),
    "batch_size": ("train_batch_size", None),
    "enable_bucket": ("aspect_buckets", None),
    "min_bucket_reso": ("min_bucket_side", None),
    "max_bucket_reso": ("max_bucket_side", None),
    "bucket_reso_steps": ("bucket_step", None),
    "bucket_no_upscale": ("bucket_no_upscale", None),
    "validation_split": ("validation_split", None),
    "shuffle_caption": ("shuffle_tags", None),
    "keep_tokens": ("keep_tags", None),
    "keep_tokens_separator": ("keep_tags_separator", lambda separator: separator or None),  # "" is none
    "flip_aug": ("random_flip", None),
    "random_crop": ("center_crop", lambda random_crop: not random_crop),
    "caption_dropout_rate": ("caption_dropout_rate", None),
    "caption_tag_dropout_rate": ("caption_tag_dropout_rate", None),
    "alpha_mask": ("masked_loss", None),
    "enable_wildcard": ("enable_wildcard", None),
}
# A folder's own options (see Folder).
FOLDER_KEYS = {"image_dir", "metadata_file", "num_repeats", "class_tokens", "caption_extension", "is_reg",
               "caption_prefix", "caption_suffix"}  # fmt: skip
# What only the subsets of images with caption files (sd-scripts' DreamBooth subsets) take, not fine-tuning subsets.
CAPTION_FILE_ONLY = {"class_tokens", "caption_extension", "is_reg", "cache_info"}
# sd-scripts' options that this toolkit does not have, at the values that ask for nothing.
NOT_DONE_HERE = {
    "color_aug": False, "face_crop_aug_range": None, "secondary_separator": None,
    "caption_separator": ",", "token_warmup_min": 1, "token_warmup_step": 0,
    "custom_attributes": None, "caption_dropout_every_n_epochs": 0,
    "network_multiplier": 1.0, "debug_dataset": False, "resize_interpolation": None,
    "conditioning_data_dir": None,
}  # fmt: skip
# A cache of image sizes for sd-scripts' start-up, and the seed of its held-out split (here the split is drawn from
# the images' contents, see sdtoolkit/held_out.py): nothing trains differently without them, so any value is read.
IGNORED = {"cache_info", "validation_seed"}
# Options that only a dataset or [general] may set, as in sd-scripts.
DATASET_ONLY = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale", "validation_split", "network_multiplier", "debug_dataset", "validation_seed"}  # fmt: skip
SUBSET_ONLY = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"}
TYPES = {"resolution": int, "batch_size": int, "min_bucket_reso": int, "max_bucket_reso": int, "bucket_reso_steps": int,
         "keep_tokens": int, "num_repeats": int, "validation_split": float, "caption_dropout_rate": float,
         "caption_tag_dropout_rate": float, "image_dir": str, "class_tokens": str, "caption_extension": str,
         "caption_prefix": str, "caption_suffix": str, "metadata_file": str, "keep_tokens_separator": str}  # fmt: skip
BOOLEANS = {"enable_bucket", "bucket_no_upscale", "shuffle_caption", "flip_aug", "random_crop", "alpha_mask", "is_reg",
            "enable_wildcard"}  # fmt: skip


@dataclass
class Folder:
    """One subset: a folder of images, how many times each counts per epoch, and how it is captioned."""

    image_dir: str | None  # None: a metadata file's images, named by their whole paths
    metadata_file: str | None  # kohya-ss's fine-tuning metadata, which captions the images; None: caption files
    num_repeats: int
    class_tokens: str | None
    caption_extension: str
    is_reg: bool
    caption_prefix: str | None  # None: --caption_prefix's
    caption_suffix: str | None
    name: str  # where it is in the file, for messages: "[[datasets.subsets]] 2 of [[datasets]] 1"


def load_file(path):
    """The file's tables, or UserError naming what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"--dataset_config {path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is skipped
            if suffix == ".toml":
                return tomllib.loads(f.read())
            if suffix == ".json":
                return json.load(f)
    except (tomllib.TOMLDecodeError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise UserError(f"--dataset_config {path} is not valid {suffix[1:].upper()}: {err}") from err
    raise UserError(f"--dataset_config {path}: give a .toml or .json file, as sd-scripts reads")


def check_value(path, where, key, value):
    """The value, checked against the type sd-scripts' schema gives the key (an int is a float too)."""
    if key in BOOLEANS and not isinstance(value, bool):
        raise UserError(f"--dataset_config {path}: {where} sets {key} = {value!r}; it must be true or false")
    kind = TYPES.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key == "resolution" and isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]  # [512, 512] is 512
    if key == "resolution" and isinstance(value, list):
        raise UserError(
            f"--dataset_config {path}: {where} sets resolution = {value}; this toolkit trains at one square"
            " resolution (other aspect ratios go in buckets: enable_bucket = true), so give one number"
        )
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UserError(f"--dataset_config {path}: {where} sets {key} = {value!r}; it must be a {kind.__name__}")
    return value


def check_table(path, where, table, level):
    """Refuse keys sd-scripts does not know at this level and options this toolkit does not have."""
    known = set(FLAGS) | FOLDER_KEYS | set(NOT_DONE_HERE) | IGNORED
    for key, value in table.items():
        if key == "subsets" and level == "dataset":
            continue
        if key not in known:
            raise UserError(f"--dataset_config {path}: {where} has {key}, which is not an sd-scripts dataset option")
        if level == "subset" and key in DATASET_ONLY:
            raise UserError(
                f"--dataset_config {path}: {where} sets {key}, which only a [[datasets]] or [general] may set"
            )
        if level != "subset" and key in SUBSET_ONLY:
            raise UserError(f"--dataset_config {path}: {where} sets {key}, which only a [[datasets.subsets]] may set")
        if key in NOT_DONE_HERE and value != NOT_DONE_HERE[key]:
            raise UserError(
                f"--dataset_config {path}: {where} sets {key} = {value!r}, which this toolkit does not do;"
                " remove it to train without it"
            )


def read_dataset_config(path, *, caption_extension):
    """Read a kohya-ss dataset config: ({flag: value}, [Folder, ...]), or UserError.

    caption_extension: --caption_extension, for subsets that set none (sd-scripts' own default is ".caption")."""
    config = load_file(path)

    def tables(value, where, many):
        """The table (or with many, the array of tables) at `where`, or one line saying what it should be."""
        if (many and isinstance(value, list) and all(isinstance(v, dict) for v in value)) or (
            not many and isinstance(value, dict)
        ):
            return value
        shape = "an array of tables ([[...]])" if many else "a table ([...])"
        raise UserError(f"--dataset_config {path}: {where} must be {shape}, as sd-scripts reads it")

    config = tables(config, "the file", many=False)
    unknown = set(config) - {"general", "datasets"}
    entries = [value for value in config.values() if isinstance(value, dict)]
    if unknown and len(entries) == len(config) and any("caption" in e or "tags" in e for e in entries):
        raise UserError(
            f"--dataset_config {path} is kohya-ss's fine-tuning metadata (each image's caption), not a dataset config:"
            " give it as --in_json, with the folder of its images as --train_data_dir"
        )
    if unknown:
        raise UserError(
            f"--dataset_config {path} has [{sorted(unknown)[0]}]; sd-scripts reads [general] and [[datasets]]"
        )
    general = tables(config.get("general", {}), "general", many=False)
    check_table(path, "[general]", general, "general")
    datasets = tables(config.get("datasets", []), "datasets", many=True)
    folders, settings = [], []  # settings: each subset's (where, {flag: value}) for the options it has
    for d, dataset in enumerate(datasets, start=1):
        check_table(path, f"[[datasets]] {d}", dataset, "dataset")
        subsets = tables(dataset.get("subsets", []), f"the subsets of [[datasets]] {d}", many=True)
        if not subsets:
            raise UserError(f"--dataset_config {path}: [[datasets]] {d} has no [[datasets.subsets]] (image folders)")
        # A dataset is of fine-tuning subsets (each with a metadata_file) or of caption-file ones, as in sd-scripts.
        fine_tuning = ["metadata_file" in subset for subset in subsets]
        if any(fine_tuning) and not all(fine_tuning):
            raise UserError(
                f"--dataset_config {path}: [[datasets]] {d} mixes subsets with a metadata_file and subsets without;"
                " as in sd-scripts, give each kind a [[datasets]] of its own"
            )
        refused = sorted(CAPTION_FILE_ONLY & set(dataset)) if all(fine_tuning) else []
        if refused:
            raise UserError(
                f"--dataset_config {path}: [[datasets]] {d} sets {refused[0]}, which its fine-tuning subsets"
                " (metadata_file) do not take, as in sd-scripts"
            )
        for s, subset in enumerate(subsets, start=1):
            where = f"[[datasets.subsets]] {s} of [[datasets]] {d}"
            check_table(path, where, subset, "subset")
            refused = sorted(CAPTION_FILE_ONLY & set(subset)) if "metadata_file" in subset else []
            if refused:
                raise UserError(
                    f"--dataset_config {path}: {where} sets {refused[0]}, which a fine-tuning subset (metadata_file)"
                    " does not take, as in sd-scripts"
                )
            # Each value from the subset, else its dataset, else [general], as sd-scripts looks it up.
            values = {}
            for table in (general, dataset, subset):
                values.update({k: check_value(path, where, k, v) for k, v in table.items() if k != "subsets"})
            if values.get("image_dir") is None and values.get("metadata_file") is None:
                raise UserError(f"--dataset_config {path}: {where} has no image_dir (or metadata_file)")
            if values.get("num_repeats", 1) < 1:
                raise UserError(
                    f"--dataset_config {path}: {where} sets num_repeats = {values['num_repeats']}; give 1 or more"
                )
            folders.append(
                Folder(
                    image_dir=values.get("image_dir"),
                    metadata_file=values.get("metadata_file"),
                    num_repeats=values.get("num_repeats", 1),
                    class_tokens=values.get("class_tokens"),
                    caption_extension=values.get("caption_extension", caption_extension),
                    is_reg=values.get("is_reg", False),
                    caption_prefix=values.get("caption_prefix"),
                    caption_suffix=values.get("caption_suffix"),
                    name=where,
                )
            )
            settings.append((where, {FLAGS[k][0]: FLAGS[k][1](v) if FLAGS[k][1] else v
                                     for k, v in values.items() if k in FLAGS}))  # fmt: skip

    # The flags hold for the whole run: every subset must give each the same value. A subset that leaves one out
    # would take the command line's in sd-scripts, so leaving it out in some subsets only is refused too.
    flags = {}
    for key, (flag, _) in FLAGS.items():
        given = [(where, subset_flags.get(flag)) for where, subset_flags in settings]
        differing = [(where, value) for where, value in given if value != given[0][1]]
        if differing:
            (first, value), (other, other_value) = given[0], differing[0]
            shown = {None: "not set"}
            raise UserError(
                f"--dataset_config {path}: {key} is {shown.get(value, value)} in {first} and"
                f" {shown.get(other_value, other_value)} in {other}; here it holds for the whole run, so set it once"
                " in [general] (or the same in every subset)"
            )
        if given and given[0][1] is not None:
            flags[flag] = given[0][1]
    if not any(not folder.is_reg for folder in folders):
        raise UserError(f"--dataset_config {path} lists no training images (a [[datasets.subsets]] without is_reg)")
    return flags, folders


def describe_flag(flag, value):
    """A flag as the log shows it: --resolution 512, --random_flip, no --center_crop."""
    if isinstance(value, bool):
        return f"--{flag}" if value else f"no --{flag}"
    return f"--{flag} {value}"


def read_folders(folders, *, allow_missing_captions=False, wildcard=False, caption_prefix=None, caption_suffix=None,
                 from_filename=False):  # fmt: skip
    """The folders (Folder) as one caption-file dataset (image, text, repeats), in the file's order, and per folder
    the lines its reading has to tell the user (the first a summary, the others warnings). A folder that is missing
    or holds no images is an error naming it. A fine-tuning subset's images are those its metadata_file lists.
    A subset's caption_prefix and caption_suffix stand for caption_prefix's and caption_suffix's (the command
    line's), as in sd-scripts; with wildcard (--enable_wildcard), each line of a caption gets them. With
    from_filename (--caption_from_filename), an image folder's images without a caption file are captioned by
    their file name."""
    parts, notes = [], []
    for folder in folders:
        if folder.metadata_file is not None:
            # A fine-tuning subset: its metadata file captions its images (see sdtoolkit/kohya_metadata.py).
            part, folder_notes = read_kohya_metadata(
                folder.metadata_file, folder.image_dir, allow_missing_captions=allow_missing_captions,
                repeats=folder.num_repeats, subset=folder.name, wildcard=wildcard,
            )  # fmt: skip
        else:
            if not os.path.isdir(folder.image_dir):
                raise UserError(f"--dataset_config: the image_dir {folder.image_dir} of {folder.name} is not a folder")
            part, folder_notes = read_caption_folder(
                folder.image_dir, caption_extension=folder.caption_extension,
                allow_missing_captions=allow_missing_captions, subset=folder, from_filename=from_filename,
            )  # fmt: skip
            if len(part) == 0:
                raise UserError(
                    f"--dataset_config: the image_dir {folder.image_dir} of {folder.name} holds no images (its"
                    " sub-folders' are not read, as in sd-scripts: give each its own subset)"
                )
        notes.append(folder_notes)
        prefix = folder.caption_prefix if folder.caption_prefix is not None else caption_prefix
        suffix = folder.caption_suffix if folder.caption_suffix is not None else caption_suffix
        if wildcard:
            part = with_caption_lines(part, "text")
        parts.append(with_affixes(part, "text", prefix, suffix))
    return concatenate_datasets(parts), notes
