"""A config file for tests that run `main.py` (pass `--config.data.data_dir=...`)."""

from pathlib import Path

from tests.tiny_configs import tiny_config


def get_config():
    return tiny_config(Path("/set/on/the/command/line"))
