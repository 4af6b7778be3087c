import re

import pytest
import yaml

from tfgan_ct.config import Config, ConfigError, load_config
from conftest import REPO


def test_paper_yaml_matches_defaults():
    assert load_config(REPO / "configs" / "paper.yaml") == Config()


def test_small_config_and_overrides():
    cfg = load_config(REPO / "configs" / "small.yaml",
                      ["convert.mask.opening_radius=3", "modalities.ncct.window.center=35"])
    assert cfg.convert.patch_size == 32
    assert cfg.convert.mask.opening_radius == 3
    assert cfg.convert.mask.dilation_radius == 1  # untouched sibling keeps its default
    assert cfg.modalities.ncct.window.center == 35.0 and cfg.modalities.ncct.window.width == 80.0


def test_split_override_stays_text():
    # YAML 1.1 would read 4:2:3 as the sexagesimal number 14583.
    assert load_config(None, ["convert.split=4:2:3"]).convert.split == "4:2:3"


@pytest.mark.parametrize("override, message", [
    ("convert.patch_sise=3", "convert.patch_sise: unknown key (did you mean 'patch_size'?)"),
    ("convert.patch_size=abc", "convert.patch_size: expected an integer"),
    ("data.augment=3", "data.augment: expected true or false"),
    ("nonsense=1", "nonsense: unknown key"),
    ("no_equals_sign", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_bad_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  split: 4:2:3\n")  # unquoted: YAML makes it a number
    with pytest.raises(ConfigError, match="convert.split: expected a string"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["convert.seed=7"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["convert"]["seed"] == 7
