"""A fine-tuning config file for tests that run `main.py` (pass `--config.data.data_dir=...`)."""

from pathlib import Path

from tests.tiny_configs import tiny_finetune_config


def get_config():
    config = tiny_finetune_config(Path("/set/on/the/command/line"), num_train_steps=3,
                                  eval_every_steps=3)
    config.finetune.num_test_clips = 2
    return config
