"""A fine-tuning config file for tests that run `main.py` (pass `--config.data.data_dir=...`)."""

from pathlib import Path

from tests.tiny_configs import tiny_config


def get_config():
    from configs import finetune

    config = finetune.get_config("dataset=ucf101,fold=1,arch=r3d")
    config.data = tiny_config(Path("/set/on/the/command/line")).data
    config.model.width = 4
    config.batch_size = 8
    config.finetune.clip_len = 8
    config.finetune.num_test_clips = 2
    config.finetune.test_batch_size = 8
    config.num_train_steps = 3
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    return config
