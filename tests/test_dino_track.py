"""The DINOv2 track: `make dino` builds exactly the mini-dino targets of config/config.yaml."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def test_make_dino_builds_every_mini_dino_target_and_no_other():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    dino_targets = {name for name, spec in config["targets"].items() if spec["suite"] == "mini-dino"}
    line = re.search(r"^DINO_TARGETS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert line, "Makefile has no DINO_TARGETS"
    assert set(line.group(1).split()) == dino_targets
    assert not dino_targets & set(config["default_targets"]), "mini-dino is a named track, not a default target"
