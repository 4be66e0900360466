"""VCP as a target task: how well does a frozen representation recognise each cloze option?

The backbone (from `init_from`: pretrained, fine-tuned or, without it, random) is frozen, with
BatchNorm in inference mode and no gradient computed for it; only the VCP head trains, on
pretraining tuples with the pretraining optimiser. A random backbone's BatchNorm statistics are
re-estimated on the training tuples first (`config.bn_recalibration`, `vcp_jax.bn_calibration`;
`metrics.json` records which were used, under `bn_statistics`). The report is on the test
split's deterministic tuples, from the checkpoint with the lowest validation loss: overall and
per-option accuracy and the option confusion matrix (`metrics.json`, `confusion.png`).

    python main.py --config configs/probe.py --config.init_from=~/runs/vcp_r3d --workdir W
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from vcp_jax import pretrain


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the VCP head on a frozen backbone and tests it (`config.task='probe'`)."""
    return pretrain.train_vcp(config, Path(workdir), frozen_backbone=True)
