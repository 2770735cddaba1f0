"""kohya-ss's --dataset_config: a TOML file's folders and options train as the same data given by flags, its values
win over the command line's (train.sh's recipe too), and what this toolkit does not do is refused in one line."""

import json
import logging

import numpy as np
import pytest

import train_text_to_image
from sdtoolkit.dataset_config import read_dataset_config
from sdtoolkit.errors import UserError
from sdtoolkit.learning_check import read_caption_data
from tests.conftest import SMALL, as_train_sh_runs_it, caption_folder, demo_image, train_args, unet_weights

# Two image folders in kohya's N_name layout (2 and 3 repeats; the first image has no caption file, so its
# folder's name captions it) and a folder of regularization images captioned by their folder's name.
IMAGES = [("2_sks creature/one.png", 0, None), ("2_sks creature/two.png", 1, "sks creature, blue, round"),
          ("3_others/three.png", 2, "a pink creature, tall, smiling"), ("3_others/four.png", 3, "a purple creature, wide")]  # fmt: skip
REG = [(f"1_creature/{i}.png", 4 + i, None) for i in range(3)]

# The same data and options as a kohya-ss user writes them.
CONFIG = """
[general]
shuffle_caption = true
keep_tokens = 1
flip_aug = true
caption_extension = ".txt"

[[datasets]]
resolution = 32
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{data}/2_sks creature"
  num_repeats = 2
  class_tokens = "sks creature"

  [[datasets.subsets]]
  image_dir = "{data}/3_others"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "{reg}/1_creature"
  class_tokens = "creature"
  is_reg = true
"""


def without_data_dir(argv):
    """train_args without its --train_data_dir."""
    i = argv.index("--train_data_dir")
    return argv[:i] + argv[i + 2 :]


def test_a_kohya_config_trains_as_the_same_folders_given_by_flags(tiny_sd, tmp_path, caplog):

    data, reg = caption_folder(tmp_path / "data", IMAGES), caption_folder(tmp_path / "reg", REG)
    config = tmp_path / "my-data.toml"
    config.write_text(CONFIG.format(data=data, reg=reg))
    steps = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "1e-3"]

    train_text_to_image.main(train_args(tiny_sd, tmp_path / "flags", *steps, "--reg_data_dir", str(reg),
                                        "--random_flip", "--shuffle_tags", "--keep_tags", "1", data=data))  # fmt: skip
    with caplog.at_level(logging.INFO):
        # The command line's batch size (4) and resolution (64) give way to the file's (2 and 32), as in sd-scripts.
        argv = train_args(tiny_sd, tmp_path / "config", *steps, "--train_batch_size", "4", "--resolution", "64")
        train_text_to_image.main(without_data_dir(argv) + ["--dataset_config", str(config)])

    assert (
        f"Read --dataset_config {config}: 3 image folders; it sets --resolution 32, --train_batch_size 2,"
        " --shuffle_tags, --keep_tags 1, --random_flip (over the command line's, as in sd-scripts)" in caplog.text
    )
    assert "is_reg subsets: 3 of the 3 regularization images in" in caplog.text
    assert "Num examples = 20" in caplog.text  # 2 x 2 + 2 x 3 training examples, as many regularization ones
    # The same images, captions, repeats, order and options: the same run, bit for bit.
    flags_run, config_run = (json.loads((tmp_path / run / "checkpoint-3" / "training_state.json").read_text())
                             for run in ("flags", "config"))  # fmt: skip
    assert flags_run["data_fingerprint"] == config_run["data_fingerprint"]
    flags_run["flags"].pop("reg_data_dir"), config_run["flags"].pop("reg_data_dir")
    assert flags_run["flags"] == config_run["flags"]
    assert config_run["data"] == str(config)
    flags_unet, config_unet = unet_weights(tmp_path / "flags" / "unet"), unet_weights(tmp_path / "config" / "unet")
    assert all(flags_unet[key].equal(config_unet[key]) for key in flags_unet)


def test_train_sh_reads_a_config_from_the_users_folder_and_its_values_win_over_the_recipes(
    tmp_path, tiny_sd, monkeypatch, capsys, caplog
):
    home = tmp_path / "me"
    caption_folder(home / "img", IMAGES)
    (home / "kohya.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nbatch_size = 3\n'
        '[[datasets.subsets]]\nimage_dir = "img/2_sks creature"\nclass_tokens = "sks creature"\nnum_repeats = 2\n'
        '[[datasets.subsets]]\nimage_dir = "img/3_others"\n'
    )
    with caplog.at_level(logging.INFO):
        result = as_train_sh_runs_it(home, *SMALL, "--max_train_steps=1", model=tiny_sd, data="kohya.toml",
                                     output_dir="out", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Relative image folders are the user's folder's; the file's batch size wins over the recipe's and SMALL's 2.
    assert ("Read img/2_sks creature ([[datasets.subsets]] 1 of [[datasets]] 1): 2 images, 1 with a .txt caption,"
            " 1 captioned by class_tokens, each 2 times per epoch") in caplog.text  # fmt: skip
    assert "Instantaneous batch size per device = 3" in caplog.text
    assert "Num examples = 6" in caplog.text
    assert (home / "out" / "model_index.json").exists()

    # An option this toolkit does not have: one line, exit code 2, nothing trained.
    (home / "kohya.toml").write_text(
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img/3_others"\ncolor_aug = true\n'
    )
    result = as_train_sh_runs_it(home, *SMALL, "--max_train_steps=1", model=tiny_sd, data="kohya.toml",
                                 output_dir="out2", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: --dataset_config kohya.toml: [[datasets.subsets]] 1 of [[datasets]] 1 sets color_aug = True, which"
        " this toolkit does not do; remove it to train without it"
    )
    assert not (home / "out2" / "checkpoint-1").exists()


# Reading the file -------------------------------------------------------------------------------------------


def config_file(tmp_path, text, name="data.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_values_come_from_the_subset_then_its_dataset_then_general(tmp_path):
    path = config_file(tmp_path, """
[general]
num_repeats = 4
caption_extension = ".caption"
random_crop = false
[[datasets]]
validation_split = 0.25
  [[datasets.subsets]]
  image_dir = "a"
  caption_extension = ".txt"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 1
  is_reg = true
""")  # fmt: skip
    flags, folders = read_dataset_config(path, caption_extension=".txt")
    assert flags == {"validation_split": 0.25, "center_crop": True}  # sd-scripts center-crops unless random_crop
    assert [(f.image_dir, f.num_repeats, f.caption_extension, f.is_reg) for f in folders] == [
        ("a", 4, ".txt", False), ("b", 1, ".caption", True)]  # fmt: skip
    # JSON holds the same tables; --caption_extension stands for a subset that sets none.
    same = config_file(tmp_path, json.dumps({"datasets": [{"subsets": [{"image_dir": "a"}]}]}), "data.json")
    assert read_dataset_config(same, caption_extension=".cap")[1][0].caption_extension == ".cap"
    with pytest.raises(UserError, match="the file must be a table"):  # JSON's top level may be anything
        read_dataset_config(config_file(tmp_path, "[1]", "list.json"), caption_extension=".txt")
    # keep_tokens_separator is --keep_tags_separator; sd-scripts' default "" is none.
    separated = '[general]\nshuffle_caption = true\nkeep_tokens_separator = "{}"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    flags, _ = read_dataset_config(config_file(tmp_path, separated.format("|||")), caption_extension=".txt")
    assert flags == {"shuffle_tags": True, "keep_tags_separator": "|||"}
    flags, _ = read_dataset_config(config_file(tmp_path, separated.format("")), caption_extension=".txt")
    assert flags == {"shuffle_tags": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nflip_aug = true\n[[datasets.subsets]]\nimage_dir = "b"\n',
         "flip_aug is True in [[datasets.subsets]] 1 of [[datasets]] 1 and not set in [[datasets.subsets]] 2 of"
         " [[datasets]] 1; here it holds for the whole run, so set it once in [general]"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n'
         '[[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = "b"\n',
         "resolution is 512 in [[datasets.subsets]] 1 of [[datasets]] 1 and 768 in [[datasets.subsets]] 1 of"
         " [[datasets]] 2"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncolour_aug = true\n',
         "[[datasets.subsets]] 1 of [[datasets]] 1 has colour_aug, which is not an sd-scripts dataset option"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncolor_aug = true\n',
         "sets color_aug = True, which this toolkit does not do"),
        ('[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = "a"\n',
         "sets resolution = [512, 768]; this toolkit trains at one square resolution"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nbatch_size = 2\n',
         "sets batch_size, which only a [[datasets]] or [general] may set"),
        ('[general]\nimage_dir = "a"\n', "[general] sets image_dir, which only a [[datasets.subsets]] may set"),
        ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', "[[datasets.subsets]] 1 of [[datasets]] 1 has no image_dir"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = "2"\n', "sets num_repeats = '2'; it must be a int"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nflip_aug = 1\n', "sets flip_aug = 1; it must be true or false"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nis_reg = true\n', "lists no training images"),
        ('[[datasets]]\n', "[[datasets]] 1 has no [[datasets.subsets]]"),
        ("[[datasets]\n", "is not valid TOML"),
        ("datasets = 1\n", "datasets must be an array of tables ([[...]]), as sd-scripts reads it"),
        ("[[datasets]]\nsubsets = [1]\n", "the subsets of [[datasets]] 1 must be an array of tables"),
        ('[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n[[datasets.subsets]]\nimage_dir = "a"\n',
         "[[datasets]] 1 mixes subsets with a metadata_file and subsets without; as in sd-scripts, give each kind a"
         " [[datasets]] of its own"),
        ('[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\nclass_tokens = "sks"\n',
         "[[datasets.subsets]] 1 of [[datasets]] 1 sets class_tokens, which a fine-tuning subset (metadata_file) does"
         " not take"),
        ('[[datasets]]\nis_reg = true\n[[datasets.subsets]]\nmetadata_file = "m.json"\n',
         "[[datasets]] 1 sets is_reg, which only a [[datasets.subsets]] may set"),
        ('[[datasets]]\ncaption_extension = ".txt"\n[[datasets.subsets]]\nmetadata_file = "m.json"\n',
         "[[datasets]] 1 sets caption_extension, which its fine-tuning subsets (metadata_file) do not take"),
    ],
    ids=["set-in-one-subset", "two-resolutions", "unknown-key", "not-done-here", "not-square", "dataset-key-in-subset",
         "subset-key-in-general", "no-image-dir", "wrong-type", "not-a-bool", "only-reg", "no-subsets", "bad-toml",
         "datasets-not-tables", "subsets-not-tables", "mixed-kinds", "class-tokens-fine-tuning",
         "is-reg-in-dataset", "caption-extension-fine-tuning"],
)  # fmt: skip
def test_what_cannot_be_read_as_asked_is_one_line(tmp_path, text, message):
    with pytest.raises(UserError, match="^--dataset_config ") as error:
        read_dataset_config(config_file(tmp_path, text), caption_extension=".txt")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sd_scripts_options_at_their_defaults_and_its_caches_are_read(tmp_path):
    path = config_file(tmp_path, """
[general]
color_aug = false
caption_separator = ","
token_warmup_step = 0
cache_info = true
validation_seed = 42
[[datasets]]
network_multiplier = 1
  [[datasets.subsets]]
  image_dir = "a"
""")  # fmt: skip
    assert read_dataset_config(path, caption_extension=".txt")[0] == {}


def test_a_subsets_caption_prefix_stands_for_the_flags(tiny_sd, tmp_path):

    # sd-scripts' way: a subset's caption_prefix, else --caption_prefix; --caption_suffix for both here.
    caption_folder(tmp_path / "a", [("one.png", 0, "a creature, round")])
    caption_folder(tmp_path / "b", [("two.png", 1, "another creature")])
    path = config_file(tmp_path, f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / "a"}"
  caption_prefix = "sks,"
  [[datasets.subsets]]
  image_dir = "{tmp_path / "b"}"
""")  # fmt: skip
    argv = without_data_dir(
        train_args(tiny_sd, tmp_path / "config", "--max_train_steps", "1", "--checkpointing_steps", "1")
    )
    train_text_to_image.main(argv + ["--dataset_config", path, "--caption_prefix", "ohwx,", "--caption_suffix", "4k"])
    written = caption_folder(tmp_path / "written", [("a/one.png", 0, "sks, a creature, round 4k"),
                                                    ("b/two.png", 1, "ohwx, another creature 4k")])  # fmt: skip
    train_text_to_image.main(
        train_args(
            tiny_sd, tmp_path / "written-run", "--max_train_steps", "1", "--checkpointing_steps", "1", data=written
        )
    )
    states = [json.loads((tmp_path / run / "checkpoint-1" / "training_state.json").read_text())
              for run in ("config", "written-run")]  # fmt: skip
    assert states[0]["data_fingerprint"] == states[1]["data_fingerprint"]


def test_a_subset_reads_its_own_folder_only_and_names_a_missing_one(tiny_sd, tmp_path):

    # Images only in a sub-folder of image_dir: sd-scripts finds none there, and neither does this toolkit.
    caption_folder(tmp_path / "img", [("10_dragons/one.png", 0, "a dragon")])
    path = config_file(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n')
    argv = without_data_dir(train_args(tiny_sd, tmp_path / "out", "--max_train_steps", "1"))
    with pytest.raises(UserError, match="holds no images .its sub-folders' are not read, as in sd-scripts"):
        train_text_to_image.main(argv + ["--dataset_config", path])
    path = config_file(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nowhere"\n')
    with pytest.raises(UserError, match=r"the image_dir nowhere of \[\[datasets.subsets\]\] 1 of \[\[datasets\]\] 1"):
        train_text_to_image.main(argv + ["--dataset_config", path])
    # Images with no caption file and no class_tokens: the error says where to give them.
    caption_folder(tmp_path / "bare", [("one.png", 0, None)])
    path = config_file(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "bare"}"\n')
    with pytest.raises(UserError, match=r"write their captions, give its \[\[datasets.subsets\]\] 1 .* class_tokens"):
        train_text_to_image.main(argv + ["--dataset_config", path])
    with pytest.raises(UserError, match="--train_data_dir and --dataset_config both name training data"):
        train_text_to_image.main(train_args(tiny_sd, tmp_path / "out", "--dataset_config", path))


def test_caption_accuracy_reads_a_configs_training_folders_as_training_does(tmp_path):
    # metrics.py --caption_data my-data.toml: the training subsets' images, class tokens and caption_prefix, in the
    # file's order; not the regularization images.
    data, reg = caption_folder(tmp_path / "data", IMAGES), caption_folder(tmp_path / "reg", REG)
    config = tmp_path / "my-data.toml"
    config.write_text(
        CONFIG.format(data=data, reg=reg).replace("num_repeats = 3", 'num_repeats = 3\ncaption_prefix = "art,"')
    )
    images, captions, rows, uncaptioned, _ = read_caption_data(str(config))
    assert captions == ["sks creature", "sks creature, blue, round", "art, a purple creature, wide",
                        "art, a pink creature, tall, smiling"]  # fmt: skip
    assert (rows, uncaptioned) == (4, 0)
    assert [np.asarray(image).tolist() for image in images] == [
        np.asarray(demo_image(i)).tolist() for i in (0, 1, 3, 2)
    ]
    # The run's --caption_prefix goes to the subsets without one of their own, as in training.
    assert read_caption_data(str(config), caption_prefix="x,")[1] == ["x, " + c for c in captions[:2]] + captions[2:]
