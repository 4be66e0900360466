"""VCP as a target task: train only the VCP head on a frozen backbone (docs/method.md §4).

    python main.py --config configs/probe.py --config.init_from=~/runs/vcp_r3d --workdir W
    python main.py --config configs/probe.py:arch=r3d --workdir W   # random-init baseline

Arguments: `arch` (c3d | r3d | r21d; default: the architecture of `init_from`). Tuples come from
UCF101 split-1 train (minus the 800 held-out videos, which choose the checkpoint); the report
is on the split's test tuples, drawn deterministically per video.
"""

import ml_collections
from ml_collections import config_dict

from configs import default, finetune


def get_config(args: str = "") -> ml_collections.ConfigDict:
    kwargs = finetune.parse_args(args)
    if set(kwargs) - {"arch"}:
        raise ValueError(f"unknown config arguments {sorted(set(kwargs) - {'arch'})}; use arch")
    config = default.get_config()
    config.task = "probe"
    config.model.arch = kwargs.get("arch") or config_dict.placeholder(str)  # None: init_from's
    config.model.width = config_dict.placeholder(int)  # None: init_from's (64 from scratch)
    # None: the input init_from's backbone was trained on (RGB from scratch); set, it must
    # agree with the backbone's unless config.force_modality.
    config.model.modality = config_dict.placeholder(str)
    # Only the linear VCP head trains: 10 epochs of the 8,737 videos are plenty.
    config.num_train_steps = 11_000
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    return config
