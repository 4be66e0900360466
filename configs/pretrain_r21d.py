"""VCP pretraining of R(2+1)D on UCF101 split 1 with the paper's recipe (docs/method.md §3)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config("r21d")
