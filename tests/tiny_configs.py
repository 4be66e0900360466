"""The tiny configs the tests train with, free of side effects: config files that tests pass to
`main.py` import them without the test session's environment (conftest.py's XLA_FLAGS and
compilation cache), hence the imports inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: loading this module imports nothing beyond the stdlib
    import ml_collections

TINY_DATASET_CONFIG = "split1_32x43"


def tiny_config(data_dir: Path):
    """The synthetic pretraining config shrunk for unit tests (`configs/default.py:tiny`, as the
    CI demo): 8-frame clips, width-4 R3D on the tiny dataset, 4 steps."""
    from configs import default, pretrain_synthetic

    config = default.tiny(pretrain_synthetic.get_config(), builder_config=TINY_DATASET_CONFIG,
                          crop_size=24, steps=4, every=2, log_every=2)
    config.data.data_dir = str(data_dir)
    config.data.synthetic = None
    config.data.num_val_videos = 4
    config.data.num_threads = 2
    config.cloze.clip_len = 8
    config.cloze.interval = 4
    config.cloze.remote_gap = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.01
    return config


def tiny_loop_config(steps: int, *, log_every: int, eval_every: int, checkpoint_every: int,
                     **overrides: Any) -> ml_collections.ConfigDict:
    """`tiny_config` for a training loop on fake steps and evaluations, which read no data (so
    no data directory): `steps` steps with the given cadence, then `overrides` by key (which may
    change the cadence too). Each caller names its cadence, as its tests' expected steps of
    evaluations and saves follow from it."""
    config = tiny_config(Path("/unused"))
    config.num_train_steps = steps
    config.log_every_steps = log_every
    config.eval_every_steps = eval_every
    config.checkpoint_every_steps = checkpoint_every
    for key, value in overrides.items():
        config[key] = value
    return config


def tiny_vcop_config(data_dir: Path):
    """`tiny_config` with VCOP as the pretext (configs/pretrain_vcop.py's sections): 3 clips of
    8 frames 4 apart (a 32-frame tuple), lr 0.01."""
    from vcp_jax import vcop

    config = tiny_config(data_dir)
    config.pretext = "vcop"
    del config["cloze"]
    config.vcop = vcop.default_config()
    config.vcop.clip_len = 8
    config.vcop.interval = 4
    return config


def tiny_finetune_config(data_dir: Path, *, pretrained: Path | None = None, **overrides):
    """configs/finetune.py on the tiny dataset, shrunk like `tiny_config`; `overrides` by key.

    `pretrained`: start from the backbone of that workdir (`init_from`), with the arch and width
    its checkpoint records (`model.arch` and `model.width` left unset).
    """
    from configs import default, finetune

    config = finetune.get_config("dataset=ucf101,fold=1,arch=r3d")
    config.data = tiny_config(data_dir).data
    default.tiny(config, builder_config=TINY_DATASET_CONFIG, crop_size=config.data.crop_size,
                 steps=2, every=1, log_every=1)
    config.finetune.clip_len = 8
    config.finetune.num_test_clips = 3
    config.finetune.test_batch_size = 8
    if pretrained is not None:
        config.init_from = str(pretrained)
        config.model.arch, config.model.width = None, None  # taken from the checkpoint
    for key, value in overrides.items():
        config[key] = value
    return config


def tiny_pretraining(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Runs 2 steps of the pretraining `config` (`tiny_config`, `tiny_vcop_config` or a variant)
    in `workdir` and returns it: the workdir that fine-tuning and probe tests start from, where
    only the hand-over of its checkpoint matters, not how trained it is."""
    from vcp_jax import pretrain

    config.num_train_steps = 2
    pretrain.run(config, workdir)
    return workdir
