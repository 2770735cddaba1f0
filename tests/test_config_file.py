"""--config_file and --output_config (kohya-ss's flags): a run's flags kept in a TOML file, read as the same flags
on the command line (which win over the file), and kohya-ss's own names refused in one line with what each is here."""

import pytest

import train_text_to_image
from sdtoolkit.errors import UserError
from tests.conftest import DEMO_DATA, SMALL, as_train_sh_runs_it

FLAGS = ["--pretrained_model_name_or_path", "some/model", "--train_data_dir", str(DEMO_DATA), "--learning_rate",
         "2e-4", "--use_ema", "--no-fused_adam", "--validation_prompts", "a red creature", "-a blue one",
         "--resolution", "256", "--hub_token", "secret-token", "--lr_scheduler", "cosine"]  # fmt: skip


def parsed(argv):
    args = vars(train_text_to_image.parse_args(argv))
    return {key: value for key, value in args.items() if key not in ("config_file", "output_config", "hub_token")}


def test_output_config_writes_the_flags_given_and_config_file_reads_them_back(tmp_path, capsys):
    path = tmp_path / "run.toml"
    with pytest.raises(SystemExit) as stopped:
        train_text_to_image.parse_args([*FLAGS, "--output_config", "--config_file", str(tmp_path / "run")])
    assert stopped.value.code == 0 and f"Wrote the flags to {path}" in capsys.readouterr().out
    text = path.read_text()
    assert "learning_rate = 0.0002\n" in text and "use_ema = true\n" in text and "fused_adam = false\n" in text
    assert 'validation_prompts = ["a red creature", "-a blue one"]\n' in text
    assert "secret-token" not in text and "hub_token" not in text  # secrets stay out of files
    assert "train_batch_size" not in text and "seed" not in text  # flags at their defaults are not written
    # Read back, it is the same run; a flag on the command line wins over the file's.
    assert parsed(["--config_file", str(path)]) == parsed(FLAGS)
    assert parsed(["--config_file", str(path), "--learning_rate", "3e-4"])["learning_rate"] == 3e-4
    # An existing file is not written over, as in sd-scripts.
    with pytest.raises(UserError, match="--output_config: .*run.toml exists already; give --config_file a new file"):
        train_text_to_image.parse_args([*FLAGS, "--output_config", "--config_file", str(path)])
    with pytest.raises(UserError, match="--output_config writes the flags to --config_file FILE, which is not given"):
        train_text_to_image.parse_args([*FLAGS, "--output_config"])


def test_sections_are_merged_and_sd_scripts_resolution_is_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npretrained_model_name_or_path = "some/model"\n[data]\ntrain_data_dir = "{DEMO_DATA}"\n'
                    '[training]\nresolution = "384,384"\ngradient_checkpointing = true\nuse_8bit_adam = false\n')  # fmt: skip
    args = train_text_to_image.parse_args(["--config_file", str(path)])
    assert args.resolution == 384 and args.gradient_checkpointing and not args.use_8bit_adam
    assert args.pretrained_model_name_or_path == "some/model"


@pytest.mark.parametrize(
    "text, message",
    [
        ("shuffle_caption = true\nnetwork_dim = 8\nmy_own_key = 1\n",
         "shuffle_caption (--shuffle_caption is --shuffle_tags here), network_dim (--network_dim is --lora_rank here),"
         " my_own_key are not flags of this script; write the file with this script's flag names"),
        ('use_ema = "yes"\n', "use_ema = 'yes' must be true or false"),
        ('learning_rate = "fast"\n', "argument --learning_rate: invalid float value: 'fast'"),
        ('resolution = "512,768"\n', "argument --resolution: give one side in pixels, not '512,768': training is at"
                                     " one square resolution"),
        ('learning_rate = [1, 2]\n', "learning_rate = [1, 2] is not a value --learning_rate takes"),
        ('hub_token = "x"\n', "hub_token is for the command line, not a file"),
        ("learning_rate = \n", "is not valid TOML"),
    ],
    ids=["kohya-names", "not-a-bool", "not-a-number", "not-square", "list-for-one-value", "no-secrets", "bad-toml"],
)  # fmt: skip
def test_what_cannot_be_read_is_one_line(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "{DEMO_DATA}"\n' + text)
    with pytest.raises(UserError) as error:
        train_text_to_image.parse_args(["--config_file", str(path)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--config_file .*nothing.toml: no such file"):
        train_text_to_image.parse_args(["--config_file", str(tmp_path / "nothing")])


def test_train_sh_runs_a_config_file_from_the_users_folder_in_place_of_its_recipe(
    tiny_sd, tmp_path, monkeypatch, capsys
):
    user = tmp_path / "user"
    user.mkdir()
    flags = [flag.removeprefix("--").split("=") for flag in SMALL]
    (user / "run.toml").write_text(
        f'pretrained_model_name_or_path = "{tiny_sd}"\ntrain_data_dir = "{DEMO_DATA}"\noutput_dir = "from-config"\n'
        "max_train_steps = 2\ncheckpointing_steps = 2\n" + "".join(f"{key} = {value!r}\n" for key, value in flags)
        .replace("'", '"')
    )  # fmt: skip
    result = as_train_sh_runs_it(user, "--config_file=run.toml", model="unused/model", data="unused/data",
                                 output_dir="unused-output", monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (user / "from-config" / "model_index.json").is_file() and not (user / "unused-output").exists()
    # The recipe's flags are not passed: no EMA (train.sh's --use_ema), the file's resolution.
    assert not (user / "from-config" / "checkpoint-2" / "unet_ema").exists()
    assert any(
        "Resolution: 32" in line or "32x32" in line
        for line in (user / "from-config" / "README.md").read_text().splitlines()
    )
