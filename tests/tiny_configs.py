"""The tiny configs the tests train with, free of side effects: config files that tests pass to
`main.py` import them without the test session's environment (conftest.py's XLA_FLAGS and
compilation cache)."""

from __future__ import annotations

from pathlib import Path

TINY_DATASET_CONFIG = "split1_32x43"


def tiny_config(data_dir: Path):
    """The synthetic pretraining config shrunk for unit tests: 8-frame clips, width-4 R3D."""
    from configs import pretrain_synthetic

    config = pretrain_synthetic.get_config()
    config.data.data_dir = str(data_dir)
    config.data.builder_config = TINY_DATASET_CONFIG
    config.data.synthetic = None
    config.data.crop_size = 24
    config.data.num_val_videos = 4
    config.data.num_threads = 2
    config.cloze.clip_len = 8
    config.cloze.interval = 4
    config.cloze.remote_gap = 8
    config.model.width = 4
    config.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.01
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    return config


def tiny_finetune_config(data_dir: Path, **overrides):
    """configs/finetune.py on the tiny dataset, shrunk like `tiny_config`; `overrides` by key."""
    from configs import finetune

    config = finetune.get_config("dataset=ucf101,fold=1,arch=r3d")
    config.data = tiny_config(data_dir).data
    config.model.width = 4
    config.batch_size = 8
    config.finetune.clip_len = 8
    config.finetune.num_test_clips = 3
    config.finetune.test_batch_size = 8
    config.num_train_steps = 2
    config.eval_every_steps = 1
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    for key, value in overrides.items():
        config[key] = value
    return config
