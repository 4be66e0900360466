"""VCOP (clip order prediction, [V] Xu et al., CVPR 2019) pretraining on UCF101 split 1 with
[V]'s recipe (docs/method.md §9.1): 3 clips of 16 frames 8 apart, shuffled into one of 6 orders;
SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 8, constant rate, 300 epochs.

    python main.py --config configs/pretrain_vcop_r3d.py --workdir ~/runs/vcop_r3d
    python main.py --config configs/pretrain_vcop.py:c3d --workdir ~/runs/vcop_c3d
    python main.py --config configs/pretrain_vcop_r3d.py --config.model.modality=res ...

Its checkpoint's backbone goes to fine-tuning, retrieval and the probe through `init_from`, as
VCP's does; the checkpoint records the pretext and the input modality.
"""

import ml_collections

from configs import default
from vcp_jax import vcop


def get_config(arch: str = "r3d") -> ml_collections.ConfigDict:
    config = default.get_config(arch)
    config.pretext = "vcop"
    del config["cloze"]
    config.vcop = vcop.default_config()  # [V]'s `--cl 16 --it 8 --tl 3` (docs/method.md §9.1)
    config.optimizer.learning_rate = 1e-3  # [V] train_vcop.py: --lr 0.001, constant
    # 300 epochs ([V]) of the 8,564 UCF101 split-1 train videos left after holding out 800.
    config.num_train_steps = 321_000
    return config
