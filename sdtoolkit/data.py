"""Training examples: checking a dataset before training, and turning rows into what the UNet trains on.

Every random choice made for an example -- its crop, its flip, which of its captions is used, the VAE
sample, the noise and the timestep -- comes from a generator seeded by (seed, epoch, row index), not from
the process's global random state. So an example looks the same whichever process, worker or batch loads
it, and a run resumed in the middle of an epoch sees exactly what the uninterrupted run saw.

With a cache (see sdtoolkit/latent_cache.py), an example carries the VAE's latent mean and std and the text encoder's
output instead of pixels and token ids; the random draws are the same, in the same order, so a cached run
trains on the same samples as an uncached one.
"""

import csv
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets import Image as ImageFeature
from datasets import List, Value
from PIL import Image
from torchvision.transforms import functional as TF

from sdtoolkit.buckets import cover_and_crop
from sdtoolkit.clip_windows import caption_windows, read_caption, unsupported_syntax
from sdtoolkit.errors import UserError

# The files in which an imagefolder names its images and their captions.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")

# Transparent pixels are laid on white: the pokemon-blip-captions images are drawings on white.
BACKGROUND = (255, 255, 255)
# The most pixels an image of the user's own data may have without a warning; twice as many is an error.
LARGEST_PHOTO = 500_000_000


def read_large_photos():
    """Let Pillow open the user's own photos of up to LARGEST_PHOTO pixels without a warning (twice that is an
    error). Its own limit, a guard against "decompression bombs" from strangers, warns at 89 megapixels and refuses
    179: less than phones take (200 megapixels, 16320 x 12240). Training and scoring read local data; the server,
    which decodes images sent to it, keeps Pillow's limit."""
    Image.MAX_IMAGE_PIXELS = LARGEST_PHOTO


def to_rgb(image):
    """Any PIL image (RGBA, LA, palette, greyscale, 16-bit, float, CMYK, ...) as 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16- and 32-bit greyscale: scale to 0..255 instead of clipping (which would turn most pixels white).
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        elif image.mode != "F":
            array = array / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def has_alpha(image):
    """Whether a PIL image has transparency."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def alpha_channel(image):
    """The image's transparency as an 8-bit greyscale image (255: opaque), or None when it has none."""
    return image.convert("RGBA").getchannel("A") if has_alpha(image) else None


def square_crop(image, resolution, interpolation, *, center, generator=None):
    """Resize a PIL image's shorter side to `resolution`, then crop a square of that side: from the center, or
    at a place drawn from `generator` (top, then left). (cover_and_crop does the same for a bucket's shape.)"""
    image = TF.resize(image, resolution, interpolation=interpolation)
    if center:
        return TF.center_crop(image, resolution)
    top = int(torch.randint(0, image.height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.width - resolution + 1, (1,), generator=generator))
    return TF.crop(image, top, left, resolution, resolution)


def latent_mask(alpha, latent_shape):
    """--masked_loss: the weight of each latent pixel in the loss, 1 x h x w. It is the mean opacity of the
    pixels the latent pixel stands for (an 8 x 8 block in SD), from the alpha channel cropped like its image.
    Without an alpha channel (None) every pixel weighs 1."""
    _, height, width = latent_shape
    if alpha is None:
        return torch.ones(1, height, width)
    return torch.nn.functional.interpolate(TF.to_tensor(alpha)[None], size=(height, width), mode="area")[0]


def available_memory():
    """Bytes of memory the system can give without swapping (MemAvailable); 0 where it can't be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def as_image_column(dataset, image_column):
    """The dataset with its image column decoded as images, as training reads it.

    A parquet file written by pyarrow or pandas (the usual way to keep a local copy of a hub dataset) stores
    images as plain {bytes, path} records, without the `datasets` feature that says they are images; they are
    cast to images here, so the check below and training decode them the same way.
    """
    feature = dataset.features[image_column]
    if isinstance(feature, ImageFeature):
        return dataset
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return dataset.cast_column(image_column, ImageFeature())
    raise UserError(
        f"--image_column '{image_column}' holds {feature}, not images; pass the column that holds the images"
        " (an Image feature, or {bytes, path} records as pyarrow and pandas write them)"
    )


def data_files(folder, extension, alongside):
    """The files of `folder` (searched recursively) that end in `extension`, when every other file there ends in
    one of `alongside` (the notes and metadata that come with such data); [] when other data is there too."""
    files, others = [], False
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.lower().endswith(extension):
                files.append(os.path.join(root, name))
            elif not name.startswith(".") and not name.lower().endswith(alongside):
                others = True
    return sorted(files) if files and not others else []


def parquet_files(source):
    """The .parquet files of a local --dataset_name: the file itself, or those in the folder (searched
    recursively) when the folder holds no other data. [] for anything else (a hub name, an imagefolder)."""
    if os.path.isfile(source):
        return [source] if source.lower().endswith(".parquet") else []
    if not os.path.isdir(source):
        return []
    return data_files(source, ".parquet", alongside=(".md", ".json", ".txt", ".gitattributes"))


# A WebDataset's image files, in the order a column is picked when --image_column is left at "image".
WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")


def webdataset_shards(source):
    """The .tar shards of a local WebDataset folder, searched recursively: img2dataset's output, where each shard
    holds key.jpg, key.txt and key.json for each image, beside per-shard .parquet and _stats.json files. [] when
    the folder holds other data too (images, an imagefolder), or is no folder."""
    if not os.path.isdir(source):
        return []
    return data_files(source, ".tar", alongside=(".parquet", ".json", ".md", ".txt"))


def webdataset_columns(column_names, image_column, caption_column):
    """(image column, caption column) of a WebDataset, whose columns are its files' extensions: the ones asked
    for, or, left at "image" and "text", the first image extension there and "txt"."""
    if image_column == "image" and image_column not in column_names:
        image_column = next((name for name in WEBDATASET_IMAGES if name in column_names), image_column)
    if caption_column == "text" and caption_column not in column_names and "txt" in column_names:
        caption_column = "txt"
    for flag, column, what in (("--image_column", image_column, "images"), ("--caption_column", caption_column,
                                                                          "captions")):  # fmt: skip
        if column not in column_names:
            raise UserError(
                f"the WebDataset shards hold no {what} for {flag} '{column}'; their files' extensions are:"
                f" {', '.join(name for name in column_names if not name.startswith('__'))}; name the column with"
                f" {flag}" + (" (captions are read from .txt files)" if what == "captions" else "")
            )
    return image_column, caption_column


def parquet_splits(source):
    """{split: [.parquet files]} of a local parquet dataset (see parquet_files), split by file name as
    `datasets` splits them (train-00000-of-00002.parquet, test-...): a single file is the train split."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if os.path.isfile(source):
        return {"train": [source]}
    splits = DataFilesDict.from_patterns(get_data_patterns(source), base_path=source)
    return {name: [str(f) for f in files if str(f).lower().endswith(".parquet")] for name, files in splits.items()}


def read_parquet_rows(paths, stamps):
    """Every row of the parquet files, 16 at a time. pyarrow's own reader, without pre-buffering, holds one row
    group and one batch; `datasets`' parquet builder holds more the bigger the file (measured: 0.2 GB of arrow
    memory for 100 images of 1 MB, 0.7 GB for 1,600). stamps: the files' sizes and times, for the cache key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=16):
            yield from batch.to_pylist()
            pa.default_memory_pool().release_unused()  # arrow's allocator would otherwise keep what it freed


def load_parquet(files, cache_dir=None):
    """A datasets.Dataset of local parquet files, converted to `datasets`' arrow cache in bounded memory.

    The columns' features come from the first file's schema (with the `datasets` metadata, an image column is
    an Image feature). The cache is keyed by the files' paths, sizes and modification times.
    """
    import pyarrow.parquet as pq
    from datasets import Dataset, Features

    features = Features.from_arrow_schema(pq.read_schema(files[0]))
    stamps = [(os.path.getsize(path), os.path.getmtime(path)) for path in files]
    return Dataset.from_generator(
        read_parquet_rows, gen_kwargs={"paths": files, "stamps": stamps}, features=features, cache_dir=cache_dir,
        writer_batch_size=16,
    )  # fmt: skip


# A row group is the smallest piece of a parquet file a reader can load; above this, say what it costs.
LARGE_ROW_GROUP_BYTES = 256 * 1024**2


def large_row_groups(files):
    """[(file, rows, bytes)] for the parquet files whose largest row group holds more than LARGE_ROW_GROUP_BYTES.

    pandas and pyarrow write a whole table as one row group unless told otherwise, and reading any row of it
    loads all of it: a 20 GB file in one row group needs 20 GB of memory several times over while loading.
    """
    import pyarrow.parquet as pq

    large = []
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        biggest = max(groups, key=lambda group: group.total_byte_size, default=None)
        if biggest is not None and biggest.total_byte_size > LARGE_ROW_GROUP_BYTES:
            large.append((path, biggest.num_rows, biggest.total_byte_size))
    return large


def scan_images(dataset, image_column, *, prepare=None, keep_bytes=0):
    """Decode every image once, as training does. Returns (unreadable, digests, sizes, kept, transparent).

    unreadable: [(row, name, reason)] for the rows whose image can't be decoded; name is the file's path or
    'row N'. digests: one sha256 of each row's image bytes, for the data's fingerprint (see `fingerprint`).
    sizes: each image's (width, height) as training sees it (EXIF orientation applied), None if unreadable.
    kept: with `prepare`, prepare(image) of every row (e.g. its center crop at the training size, so that
    caching need not decode it again), while they fit in keep_bytes; None when they did not. transparent: the
    number of images with an alpha channel.

    Rows are read 64 at a time and decoded in threads (PIL releases the GIL while it decodes), so the check
    holds a few images' bytes, not the whole column's.
    """
    feature = dataset.features[image_column]
    raw = dataset.cast_column(image_column, ImageFeature(decode=False))

    def check(index, value):
        name = (value or {}).get("path") or f"row {index}"
        data, size, problem, kept, alpha = b"", None, None, None, False
        try:
            if value is None:
                raise ValueError("no image")
            data = value.get("bytes")
            if not data:
                with open(value["path"], "rb") as f:
                    data = f.read()
            image = feature.decode_example({"path": None, "bytes": data})  # every pixel, as training will
            size, alpha = image.size, has_alpha(image)
            kept = prepare(image) if prepare is not None else None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if name.lower().endswith((".heic", ".heif")):
                reason = "HEIC, which Pillow reads only with a plugin: convert it to JPEG or PNG"
            problem = (index, name, reason)
        return problem, hashlib.sha256(data or b"").digest(), size, kept, alpha

    bad, digests, sizes, kept, kept_total, transparent = [], [], [], [] if prepare else None, 0, 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(raw), 64):
            values = raw[start : start + 64][image_column]
            for problem, digest, size, image, alpha in pool.map(check, range(start, start + len(values)), values):
                if problem:
                    bad.append(problem)
                digests.append(digest)
                sizes.append(size)
                transparent += alpha
                if kept is not None:
                    kept_total += image.width * image.height * len(image.getbands()) if image is not None else 0
                    kept = None if kept_total > keep_bytes else kept
                    if kept is not None:
                        kept.append(image)
    return bad, digests, sizes, kept, transparent


def fingerprint(image_digests, captions):
    """One hex digest of the training data: every row's image bytes and caption(s), in order."""
    total = hashlib.sha256()
    for digest, caption in zip(image_digests, captions):
        total.update(digest)
        total.update(json.dumps(caption).encode())
    return total.hexdigest()


def check_captions(dataset, caption_column):
    """Raise UserError at the first caption that is not a string or a non-empty list of strings.

    Returns the number of rows whose caption is empty or only whitespace (they train unconditioned).
    """
    empty = 0
    for index, caption in enumerate(dataset[caption_column]):
        if isinstance(caption, str):
            empty += not caption.strip()
            continue
        if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
            empty += not any(c.strip() for c in caption)
            continue
        shown = repr(caption)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(
            f"caption column '{caption_column}' must hold strings or lists of strings; row {index} holds"
            f" {type(caption).__name__} {shown}"
        )
    return empty


def affix_caption(caption, prefix, suffix):
    """kohya-ss's --caption_prefix and --caption_suffix: the caption (or each of a list) with words around it."""
    if not isinstance(caption, str):
        return [affix_caption(c, prefix, suffix) for c in caption]
    return " ".join(part for part in (prefix, caption, suffix) if part)


def with_affixes(dataset, caption_column, prefix, suffix):
    """The dataset with affix_caption applied to its captions. Only the caption column is rebuilt, so the images
    of a large dataset are neither read nor copied."""
    if not prefix and not suffix:
        return dataset
    captions = [affix_caption(caption, prefix, suffix) for caption in dataset[caption_column]]
    feature = dataset.features[caption_column]
    return dataset.remove_columns(caption_column).add_column(caption_column, captions, feature=feature)


def caption_lines(caption):
    """--enable_wildcard: the captions a caption stands for, one per non-empty line (each line of a caption file is
    a caption of its own, as kohya-ss reads it with its --enable_wildcard); a list's captions each split the same
    way. Always a non-empty list."""
    texts = [caption] if isinstance(caption, str) else caption
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return lines or [""]


def with_caption_lines(dataset, caption_column):
    """The dataset with every caption made the list of its lines (caption_lines), a list column whatever the
    column was, so that one line is drawn per example as one of a list's captions is."""
    captions = [caption_lines(caption) for caption in dataset[caption_column]]
    feature = List(Value("string"))
    return dataset.remove_columns(caption_column).add_column(caption_column, captions, feature=feature)


# kohya-ss's wildcards: "{red|blue|green}" is one of the three; "{{" and "}}" are braces.
WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def resolve_wildcards(caption, generator=None):
    """The caption with each {a|b|c} replaced by one of its options, drawn with `generator` (None: the first);
    {{ and }} become { and }. Draws nothing for a caption without wildcards."""

    def replace(match):
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        options = match.group(1).split("|")
        if generator is None:
            return options[0]
        return options[int(torch.randint(0, len(options), (1,), generator=generator))]

    return WILDCARD.sub(replace, caption)


def has_wildcards(caption):
    return any(match.group(1) is not None for match in WILDCARD.finditer(caption))


def all_captions(dataset, caption_column):
    """Every caption of every row, in order (a row may hold a list of them)."""
    captions = []
    for caption in dataset[caption_column]:
        captions.extend([caption] if isinstance(caption, str) else caption)
    return captions


# AUTOMATIC1111's explicit weight, "(word:1.2)": in a caption read literally, the brackets and number are words.
EXPLICIT_WEIGHT = re.compile(r"(?<!\\)\([^()]*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)")


def comma_in_brackets(caption):
    """Whether a comma of the caption is inside emphasis brackets, as in "(red hair, blue eyes:1.2)"."""
    depth = 0
    for match in re.finditer(r"\\.|[()\[\],]", caption):
        token = match.group(0)
        if token in "([":
            depth += 1
        elif token in ")]":
            depth = max(depth - 1, 0)
        elif token == "," and depth:
            return True
    return False


def check_caption_syntax(dataset, caption_column, *, weighted, shuffled=False):
    """With weighted (--weighted_captions), raise UserError at the first caption that holds AUTOMATIC1111 syntax
    the toolkit does not read (see unsupported_syntax), or, when its tags are shuffled or dropped (--shuffle_tags,
    --caption_tag_dropout_rate, which split captions at commas), a comma inside brackets. Returns how many
    captions hold an explicit weight such as "(word:1.2)": without weighted, they are read as text, which the
    caller says."""
    weights = 0
    for caption in all_captions(dataset, caption_column):
        shown = caption if len(caption) <= 60 else caption[:57] + "..."
        problem = unsupported_syntax(caption) if weighted else None
        if problem:
            raise UserError(f"--weighted_captions: the caption {shown!r} can't be read: {problem}")
        if weighted and shuffled and comma_in_brackets(caption):
            raise UserError(
                f"--weighted_captions with --shuffle_tags or --caption_tag_dropout_rate: the caption {shown!r} has a"
                " comma inside brackets, where those split it from its weight; weigh each tag on its own, e.g. (red"
                " hair:1.2), (blue eyes:1.2)"
            )
        weights += bool(EXPLICIT_WEIGHT.search(caption))
    return weights


def count_long_captions(dataset, caption_column, tokenizer, windows=1, weighted=False):
    """(captions longer than `windows` of CLIP's windows can hold, all captions): with one window, longer than the
    tokenizer's model_max_length, start and end tokens included (see sdtoolkit/clip_windows.py). weighted: the
    captions are read as prompts (--weighted_captions), their windows those of their words and BREAKs."""
    captions = all_captions(dataset, caption_column)
    if windows > 1 or weighted:
        return sum(len(read_caption(tokenizer, caption, weighted)) > windows for caption in captions), len(captions)
    # verbose=False: the caller says how many are cut; transformers would warn of indexing errors.
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False).input_ids]
    return sum(n > tokenizer.model_max_length for n in lengths), len(captions)


def example_seed(seed, epoch, index):
    """A well-mixed 64-bit seed for one example in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class TrainingExamples(torch.utils.data.Dataset):
    """Rows of a datasets.Dataset as training examples, with all per-example randomness drawn here.

    Each item holds `pixel_values` (3 x resolution x resolution, in [-1, 1]), `input_ids` (77 token ids),
    and the random draws the training step needs for it: `latent_noise` (to sample the VAE's latent
    distribution), `noise`, `timestep`, and, when asked for, `offset_noise` (with `offset_strength`, its share of
    --noise_offset, under --noise_offset_random_strength) and `perturbation`.
    Set `.epoch` before each epoch.

    repeats: how many examples each row makes per epoch (kohya's N_name folders, --dataset_repeats). Example i
    is row `rows[i]`, with the copies of a row next to each other. What depends on the image (its bucket, its
    cached latents and caption embeddings) is kept per row, so a repeated image is encoded once; what is drawn
    at random is drawn per example, so each repeat has its own crop, flip, caption and noise.
    loss_weights: each row's weight in the loss (--prior_loss_weight for regularization images), served as
    `loss_weight`; None: every example weighs the same, and items have no `loss_weight`.
    With --masked_loss each item also holds `loss_mask`, the weight of each latent pixel (see latent_mask).
    With --max_token_length above 75, a caption is read in windows (see sdtoolkit/clip_windows.py): `input_ids`
    is [windows, 77], or `encoder_hidden_states` [windows * 77, dim] from the cache, and `window_mask` says which
    windows are the caption's own. With --weighted_captions, `token_weights` (shaped as `input_ids`) holds each
    token's emphasis, which the training step applies to the text encoder's output (a cache holds it applied).
    """

    def __init__(
        self, dataset, image_column, caption_column, tokenizer, args, latent_shape, num_train_timesteps, repeats=None,
        loss_weights=None,
    ):  # fmt: skip
        self.dataset = dataset
        self.loss_weights = loss_weights
        repeats = repeats or [1] * len(dataset)
        self.rows = [row for row, count in enumerate(repeats) for _ in range(count)]
        self.latents = None  # set by use_cache: latents[row] = (mean, std), each [orientations, C, h, w]
        # set by use_cache: (embeddings [captions, 77 x windows, dim], per row: first, count, is_list; empty; per
        # caption: its number of windows, None with one window)
        self.text = None
        self.image_column = image_column
        self.caption_column = caption_column
        self.tokenizer = tokenizer
        self.resolution = args.resolution
        self.center_crop = args.center_crop
        self.random_flip = args.random_flip
        self.masked_loss = args.masked_loss
        self.windows = args.max_token_length // 75  # CLIP windows per caption (1: 77 tokens, as upstream)
        self.weighted_captions = args.weighted_captions  # captions read for emphasis, as prompts are
        self.clip_skip = args.clip_skip  # which of the text encoder's layers a cache encodes captions with
        self.interpolation = getattr(TF.InterpolationMode, args.image_interpolation_mode.upper())
        self.noise_offset = args.noise_offset
        self.multires_noise_iterations = args.multires_noise_iterations
        self.multires_noise_discount = args.multires_noise_discount
        self.noise_offset_random_strength = args.noise_offset_random_strength
        self.ip_noise_gamma_random_strength = args.ip_noise_gamma_random_strength
        self.input_perturbation = args.input_perturbation
        # Caption dropout trains a share of examples unconditioned, which classifier-free guidance needs;
        # tag shuffling reorders comma-separated tags after the first keep_tags (kohya's shuffle_caption), and
        # tag dropout leaves each of them out at a rate (kohya's caption_tag_dropout_rate).
        self.caption_dropout_rate = args.caption_dropout_rate
        self.shuffle_tags = args.shuffle_tags
        self.tag_dropout_rate = args.caption_tag_dropout_rate
        self.keep_tags = args.keep_tags
        self.keep_tags_separator = args.keep_tags_separator
        # kohya-ss's wildcards, {a|b|c}, each drawn per example with --enable_wildcard (a caption's lines are made
        # a list of captions as the data is read: see with_caption_lines).
        self.wildcards = args.enable_wildcard and any(map(has_wildcards, all_captions(dataset, caption_column)))
        self.bucket_sizes = None  # set by use_buckets: (width, height) per row
        self.seed = args.seed
        self.latent_shape = latent_shape
        # Timesteps are drawn from [low, high): the whole schedule unless --min_timestep/--max_timestep narrow it.
        self.timesteps = (args.min_timestep or 0, args.max_timestep or num_train_timesteps)
        self.epoch = 0

    def __len__(self):
        return len(self.rows)

    def use_buckets(self, sizes):
        """Train row i at sizes[i] = (width, height), a bucket's shape, instead of the resolution² square."""
        self.bucket_sizes = sizes

    def latent_shape_of(self, row):
        if self.bucket_sizes is None:
            return self.latent_shape
        width, height = self.bucket_sizes[row]
        factor = self.resolution // self.latent_shape[1]
        return (self.latent_shape[0], height // factor, width // factor)

    def use_cache(self, latents, text):
        """Serve cached latent distributions and/or text embeddings (either may be None) instead of encoding."""
        if text is not None and (self.shuffle_tags or self.tag_dropout_rate or self.wildcards):
            raise ValueError(
                "shuffled or dropped tags and wildcards can't come from a text cache: each draw is another caption"
            )
        self.latents, self.text = latents, text

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(example_seed(self.seed, self.epoch, index))
        example = {}
        image_row = self.rows[index]
        row = self.dataset[image_row] if self.latents is None or self.text is None else None

        # The image: shorter side to `resolution`, then a center or random square crop, maybe a flip. With
        # buckets: resized to cover the row's bucket, then cropped to it (see sdtoolkit/buckets.py).
        if self.latents is None:
            source = row[self.image_column]
            crop, size = square_crop, self.resolution
            if self.bucket_sizes is not None:
                crop, size = cover_and_crop, self.bucket_sizes[image_row]
            crop_draws = generator.get_state() if self.masked_loss else None
            image = crop(to_rgb(source), size, self.interpolation, center=self.center_crop, generator=generator)
            flipped = bool(self.random_flip and torch.rand(1, generator=generator) < 0.5)
            if flipped:
                image = TF.hflip(image)
            example["pixel_values"] = TF.normalize(TF.to_tensor(image), [0.5], [0.5])
            if self.masked_loss:
                # The alpha channel, cropped where the image was (its draws replayed) and flipped with it.
                alpha = alpha_channel(source)
                if alpha is not None:
                    replay = torch.Generator().set_state(crop_draws)
                    alpha = crop(alpha, size, self.interpolation, center=self.center_crop, generator=replay)
                    alpha = TF.hflip(alpha) if flipped else alpha
                example["loss_mask"] = latent_mask(alpha, self.latent_shape_of(image_row))
        else:
            # Cached latents exist only for center crops; orientation 1 is the flipped image.
            flipped = bool(self.random_flip and torch.rand(1, generator=generator) < 0.5)
            mean, std = self.latents[image_row]
            example["latent_mean"] = mean[int(flipped)]
            example["latent_std"] = std[int(flipped)]
            if self.masked_loss:
                example["loss_mask"] = self.latents.loss_mask(image_row)[int(flipped)].float()

        # The caption: a random one of several, if the row has a list.
        if self.text is None:
            caption = row[self.caption_column]
            if not isinstance(caption, str):
                caption = caption[int(torch.randint(0, len(caption), (1,), generator=generator))]
        else:
            embeddings, first, count, is_list, empty, own_windows = self.text
            choice = int(torch.randint(0, count[image_row], (1,), generator=generator)) if is_list[image_row] else 0

        # The diffusion draws for this example.
        latent_shape = self.latent_shape_of(image_row)
        example["latent_noise"] = torch.randn(latent_shape, generator=generator)
        example["noise"] = torch.randn(latent_shape, generator=generator)
        example["timestep"] = torch.randint(*self.timesteps, (), generator=generator)
        if self.noise_offset:
            example["offset_noise"] = torch.randn((latent_shape[0], 1, 1), generator=generator)
        if self.input_perturbation:
            example["perturbation"] = torch.randn(latent_shape, generator=generator)

        # Caption dropout, wildcards and tag shuffling, drawn last so that runs without them draw exactly as before.
        dropped = bool(self.caption_dropout_rate and torch.rand(1, generator=generator) < self.caption_dropout_rate)
        if self.text is None:
            if self.wildcards and not dropped:
                caption = resolve_wildcards(caption, generator)
            if dropped:
                caption = ""
            elif self.shuffle_tags or self.tag_dropout_rate:
                caption = edit_tags(
                    caption, keep=self.keep_tags, generator=generator, shuffle=self.shuffle_tags,
                    dropout=self.tag_dropout_rate, separator=self.keep_tags_separator,
                )  # fmt: skip
            if self.weighted_captions:  # read as a prompt: token ids with their weights (see emphasize)
                ids, mask, weights = caption_windows(self.tokenizer, caption, self.windows, weighted=True)
                one = self.windows == 1  # then [77], as upstream's input_ids
                example["input_ids"], example["token_weights"] = (ids[0], weights[0]) if one else (ids, weights)
                if not one:
                    example["window_mask"] = mask
            elif self.windows > 1:
                example["input_ids"], example["window_mask"], _ = caption_windows(
                    self.tokenizer, caption, self.windows
                )
            else:
                example["input_ids"] = self.tokenizer(
                    caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt",
                ).input_ids[0]  # fmt: skip
        else:
            caption = first[image_row] + choice
            example["encoder_hidden_states"] = empty if dropped else embeddings[caption]
            if self.windows > 1:
                own = 1 if dropped else own_windows[caption]
                example["window_mask"] = torch.tensor([1.0] * own + [0.0] * (self.windows - own))
        # Multi-resolution noise and random strengths, drawn after all else so that runs without them draw exactly as
        # before.
        if self.multires_noise_iterations:
            example["noise"] = multires_noise(
                example["noise"], generator, iterations=self.multires_noise_iterations,
                discount=self.multires_noise_discount,
            )  # fmt: skip
        if self.noise_offset and self.noise_offset_random_strength:  # from 0 to --noise_offset, applied in training
            example["offset_strength"] = torch.rand(1, generator=generator)
        if self.input_perturbation and self.ip_noise_gamma_random_strength:  # from 0 to --input_perturbation
            example["perturbation"] = example["perturbation"] * torch.rand(1, generator=generator)
        if self.loss_weights is not None:
            example["loss_weight"] = torch.tensor(self.loss_weights[image_row], dtype=torch.float32)
        return example


def multires_noise(noise, generator, *, iterations, discount):
    """kohya-ss's multi-resolution ("pyramid") noise: `noise` [C, h, w] plus, for i = 0, 1, ..., iterations - 1,
    noise drawn at a size (h, w) / r^i (r between 2 and 4, drawn each time; i = 0 is another full-size draw) and
    enlarged bilinearly, weighed discount^i, until a size of 1; the sum then scaled to unit standard deviation.
    Its low frequencies let the model learn to change an image's overall brightness and colour, which white noise
    hardly masks. (kohya-ss scales by the whole batch's standard deviation; here each example by its own, so that
    an example's noise does not depend on the batch it lands in.)"""
    channels, height, width = noise.shape
    total = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        size = (max(1, int(height / r**i)), max(1, int(width / r**i)))
        coarse = torch.randn((1, channels, *size), generator=generator)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**i
        if 1 in size:
            break
    return total / total.std()


def edit_tags(caption, *, keep, generator, shuffle=True, dropout=0.0, separator=None):
    """The caption's comma-separated tags, the first `keep` as they are; of the others, with shuffle, put in a
    random order, and with dropout, each one left out at that rate. A caption holding `separator` (kohya-ss's
    keep_tokens_separator, such as "|||") keeps the tags before it instead, and those after a second one, at the
    end; the separators are left out."""

    def split(text):
        return [tag.strip() for tag in text.split(",") if tag.strip()]

    if separator and separator in caption:
        head, _, rest = caption.partition(separator)
        middle, _, end = rest.partition(separator)
        head, tail, end = split(head), split(middle), split(end)
    else:
        tags = split(caption)
        head, tail, end = tags[:keep], tags[keep:], []
    if shuffle:
        order = torch.randperm(len(tail), generator=generator).tolist()
        tail = [tail[i] for i in order]
    if dropout:
        kept = (torch.rand(len(tail), generator=generator) >= dropout).tolist()
        tail = [tag for tag, keep_it in zip(tail, kept) if keep_it]
    return ", ".join(head + tail + end)


def balance_regularization(reg_repeats, num_examples):
    """How many examples each regularization image makes per epoch, so that they number about as many as the
    training examples (num_examples), as kohya-ss balances them: each image in turn at its own repeats until
    there are enough; if one round is not enough, more rounds add one repeat per image in turn. Images the count
    does not reach make 0 (kohya-ss warns that some are not used)."""
    repeats, total, first_round = [0] * len(reg_repeats), 0, True
    while reg_repeats and total < num_examples:
        for i, count in enumerate(reg_repeats):
            added = count if first_round else 1
            repeats[i] += added
            total += added
            if total >= num_examples:
                break
        first_round = False
    return repeats


def collate(examples):
    """Stack a list of examples into a batch of tensors."""
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch


def unlisted_images(folder):
    """Images in an imagefolder that no metadata file names: `datasets` leaves them out without a word.

    Returns their paths relative to folder, sorted; [] when the folder has no metadata file at all.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    listed, images, has_metadata = set(), [], False
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name in METADATA_FILES:
                has_metadata = True
                listed.update(os.path.normpath(os.path.join(root, n)) for n in metadata_file_names(path))
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(os.path.normpath(path))
    if not has_metadata:
        return []
    return sorted(os.path.relpath(path, folder) for path in images if path not in listed)


def metadata_file_names(path):
    """The file_name entries of an imagefolder metadata file (.jsonl, .csv or .parquet), read as datasets reads
    them: a byte-order mark first is not part of the text."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8-sig") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=["file_name"]).to_pylist()
    return [str(row["file_name"]) for row in rows if isinstance(row, dict) and row.get("file_name")]


def saved_with_save_to_disk(folder):
    """Whether a folder holds a DatasetDict or a Dataset that `datasets` wrote with save_to_disk (which
    load_dataset refuses or copies whole into its cache; load_from_disk maps it where it is)."""
    if os.path.isfile(os.path.join(folder, datasets.config.DATASETDICT_JSON_FILENAME)):
        return True
    state = os.path.join(folder, datasets.config.DATASET_STATE_JSON_FILENAME)
    return os.path.isfile(state) and os.path.isfile(os.path.join(folder, datasets.config.DATASET_INFO_FILENAME))


def load_saved_dataset(folder):
    """A dataset saved with save_to_disk, as its splits: a DatasetDict's, or the one Dataset as the train split.
    Mapped where it is (see saved_with_save_to_disk)."""
    dataset = datasets.load_from_disk(folder)
    return dataset if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}


def saved_train_split(folder, flag):
    """The train split of a dataset saved with save_to_disk (see load_saved_dataset), with an image column named
    "image"; for metrics.py's `flag` (--caption_data, --reference_data)."""
    splits = load_saved_dataset(folder)
    if "train" not in splits:
        raise UserError(f"{flag} {folder} has no 'train' split (it has: {', '.join(splits)})")
    dataset = splits["train"]
    if "image" not in dataset.column_names:
        raise UserError(f"{flag} {folder} has no 'image' column; it has: {', '.join(dataset.column_names)}")
    return dataset


def has_metadata_file(folder):
    """Whether an imagefolder (searched recursively) has a metadata file naming its images and captions."""
    return any(name in METADATA_FILES for _, _, files in os.walk(folder) for name in files)
