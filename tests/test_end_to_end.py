"""The README's main job: VCP pretraining on the built-in synthetic data beats chance.

Runs `main.py --config configs/pretrain_synthetic.py` exactly as a user does (videos generated,
dataset built by the real builder, 300 SGD steps), with its caches in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_synthetic_pretraining_beats_chance(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "main.py", "--config", "configs/pretrain_synthetic.py",
        f"--workdir={tmp_path / 'workdir'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--config.data.synthetic.manual_dir={tmp_path / 'videos'}",
    ]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the demo as a user runs it: one CPU device
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "workdir" / "metrics.json").read_text())
    assert metrics["val_tuples"] == 40 and metrics["chance_accuracy"] == pytest.approx(0.2)
    # 40 held-out tuples: chance would give 0.20 +- 0.06; 0.35 is clearly above it.
    assert metrics["val_vcp_accuracy"] >= 0.35, metrics
    assert "held-out VCP accuracy" in result.stdout
