"""The command line as a new user meets it: user errors end in one message, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def _main(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]
    return output


def test_an_unknown_override_names_itself_and_the_nearest_keys(tmp_path: Path) -> None:
    result = _main("--config", "configs/pretrain_r3d.py", f"--workdir={tmp_path}",
                   "--config.optimizer.learnig_rate=0.1")
    _assert_user_error(result, "config.optimizer.learnig_rate is not a key",
                       "config.optimizer.learning_rate")
    result = _main("--config", "configs/pretrain_r3d.py", f"--workdir={tmp_path}",
                   "--config.nonexistent_key=3")
    _assert_user_error(result, "config.nonexistent_key is not a key")
    assert not any(tmp_path.iterdir())  # nothing started


def test_a_value_that_is_not_allowed_names_the_key(tmp_path: Path) -> None:
    result = _main("--config", "configs/pretrain_r3d.py", f"--workdir={tmp_path}",
                   "--config.model.arch=r4d")
    _assert_user_error(result, "config.model.arch='r4d' is not allowed", "'c3d', 'r3d', 'r21d'")


def test_a_dataset_that_is_not_built_gives_one_message_and_touches_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "tensorflow_datasets"
    result = _main("--config", "configs/pretrain_r3d.py", f"--workdir={tmp_path / 'w'}",
                   f"--config.data.data_dir={data_dir}")
    output = _assert_user_error(result, "ucf101_frames/split1 is not built",
                                "python -m tfds_builders.build ucf101_frames")
    assert "Downloading and preparing" not in output
    assert not data_dir.exists()  # no build was started in the user's data_dir


def test_a_missing_init_from_fails_before_any_data_or_compile_work(tmp_path: Path) -> None:
    data_dir = tmp_path / "tensorflow_datasets"  # not built either: the checkpoint is checked 1st
    result = _main("--config", "configs/finetune.py:dataset=hmdb51,fold=1",
                   f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data_dir}",
                   f"--config.init_from={tmp_path / 'no_such_run'}")
    _assert_user_error(result, "init_from", "no_such_run", "does not exist")
    result = _main("--config", "configs/finetune.py:dataset=hmdb51,fold=1",
                   f"--workdir={tmp_path / 'w2'}", f"--config.data.data_dir={data_dir}")
    _assert_user_error(result, "config.model.arch is not set", "init_from")


def test_bad_config_arguments_are_user_errors(tmp_path: Path) -> None:
    result = _main("--config", "configs/finetune.py:dataset=kinetics", f"--workdir={tmp_path}")
    _assert_user_error(result, "configs/finetune.py:dataset=kinetics",
                       "dataset='kinetics': choose one of ['hmdb51', 'ucf101']")
