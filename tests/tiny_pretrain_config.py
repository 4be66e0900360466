"""A config file for tests that run `main.py` (pass `--config.data.data_dir=...`).

`--config tests/tiny_pretrain_config.py:vcop` is the VCOP pretraining (`tiny_vcop_config`).
"""

from pathlib import Path

from tests.tiny_configs import tiny_config, tiny_vcop_config


def get_config(pretext: str = "vcp"):
    make = tiny_vcop_config if pretext == "vcop" else tiny_config
    return make(Path("/set/on/the/command/line"))
