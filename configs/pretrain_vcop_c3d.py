"""VCOP pretraining of C3D on UCF101 split 1 with [V]'s recipe (configs/pretrain_vcop.py)."""

import ml_collections

from configs import pretrain_vcop


def get_config() -> ml_collections.ConfigDict:
    return pretrain_vcop.get_config("c3d")
