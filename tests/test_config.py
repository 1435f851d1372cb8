"""Config plumbing: config-string arguments, typed overrides, strict keys with suggestions,
duration units, the command line's error for a misspelt --config key, and the argparse
tools' one-line errors for bad --set entries."""

import os
import subprocess
import sys

import pytest

from big_contrast import config as bc, validation
from tests.helpers import REPO


def test_parse_arg_binds_the_bare_value_to_the_first_key_and_types_the_rest():
    arg = bc.parse_arg("B/32,bs=4096,res=224.5", variant="demo", bs=0, res=0.0)
    assert (arg.variant, arg.bs, arg.res) == ("B/32", 4096, 224.5)
    with pytest.raises(bc.ConfigError, match="did you mean 'bs'"):
        bc.parse_arg("demo,bss=3", variant="demo", bs=0)


def test_overrides_are_typed_and_unknown_keys_name_the_closest_one():
    config = bc.load_config_file(os.path.join(REPO, "configs/clip.py:demo"))
    bc.apply_overrides(config, {"optim.lr": "1e-3", "total_steps": "12", "tensorboard": "false",
                                "data.augment.crop_scale": "(0.5, 1.0)"})
    assert config.optim.lr == 1e-3 and config.total_steps == 12 and config.tensorboard is False
    assert tuple(config.data.augment.crop_scale) == (0.5, 1.0)
    with pytest.raises(bc.ConfigError, match="unknown config key 'totl_steps'; did you mean 'total_steps'"):
        bc.apply_overrides(config, {"totl_steps": "10"})
    with pytest.raises(bc.ConfigError, match="did you mean 'optim.lr'"):
        bc.apply_overrides(config, {"optim.lrr": "1"})
    with pytest.raises(bc.ConfigError, match="cannot set 'total_steps'"):
        bc.apply_overrides(config, {"total_steps": "ten"})


def test_locked_configs_reject_new_keys():
    config = bc.load_config_file(os.path.join(REPO, "configs/clip.py:demo"))
    with pytest.raises(AttributeError):
        config.totl_steps = 10


def test_durations_resolve_to_steps():
    config = bc.base_config()
    config.batch_size = 100
    config.total_examples = 1050
    assert bc.steps_from_duration(config, "total", 100) == 10
    config.total_examples = None
    config.total_epochs = 2.0
    assert bc.steps_from_duration(config, "total", 100, examples_per_epoch=500) == 10
    with pytest.raises(bc.ConfigError, match="finite training source"):
        bc.steps_from_duration(config, "total", 100)
    config.total_steps = 3
    with pytest.raises(bc.ConfigError, match="set only one of"):
        bc.steps_from_duration(config, "total", 100, 500)


@pytest.mark.parametrize("recipe", ["clip.py:demo", "clip.py:B/32", "align.py:demo", "align.py:L2"])
def test_recipes_load(recipe):
    config = bc.load_config_file(os.path.join(REPO, "configs", recipe))
    assert config.batch_size > 0 and config.optim.lr > 0


def test_unknown_variant_is_named():
    with pytest.raises(bc.ConfigError, match="unknown clip variant 'B/33'"):
        bc.load_config_file(os.path.join(REPO, "configs/clip.py:B/33"))


def test_misspelt_command_line_key_fails_naming_the_valid_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "big_contrast.train", "--config", "configs/clip.py:demo",
         "--workdir", str(tmp_path / "run"), "--config.totl_steps=10"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'totl_steps'; did you mean 'total_steps'?" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_misspelt_synthetic_world_name_is_named_with_a_suggestion():
    config = bc.load_config_file(os.path.join(REPO, "configs/simclr.py:demo"))
    bc.apply_overrides(config, {"data.synthetic.backgrounds": "('plain', 'stripy')"})
    with pytest.raises(bc.ConfigError, match="data.synthetic.backgrounds is 'stripy'; did you "
                                             "mean 'striped'"):
        validation.validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("model.image.stages", "8", "model.image.stages must be from 1 to 7 (or None: all), got 8"),
    ("model.image.stages", "0", "model.image.stages must be from 1 to 7 (or None: all), got 0"),
    ("model.image.fused_stages", "5",
     "model.image.fused_stages must be from 0 to the number of stages, got 5"),
])
def test_efficientnet_stage_counts_are_checked(key, value, message):
    config = bc.load_config_file(os.path.join(REPO, "configs/align.py:demo"))  # 4 stages
    validation.validate(config)
    bc.apply_overrides(config, {key: value})
    with pytest.raises(bc.ConfigError) as error:
        validation.validate(config)
    assert str(error.value) == message


@pytest.mark.parametrize("tool, settings, message", [
    ("benchmarks/train_throughput.py", ["model.image.stagez=3"],
     "unknown config key 'model.image.stagez'; did you mean 'model.image.stages'?"),
    ("benchmarks/train_throughput.py", ["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    ("tools/swav_dynamics.py", ["swav.epsilon"], "--set takes KEY=VALUE, got ['swav.epsilon']"),
])
def test_tools_name_a_bad_setting_in_one_line(tool, settings, message):
    """The argparse tools read --config/--set through cli.config_from_arguments: a bad setting
    ends them with argparse's usage line and exit status 2, never a traceback."""
    config = "configs/swav.py:demo" if "swav" in tool else "configs/align.py:demo"
    result = subprocess.run([sys.executable, tool, "--config", config, "--set", *settings],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].endswith(f"error: {message}")
    assert "Traceback" not in result.stderr
