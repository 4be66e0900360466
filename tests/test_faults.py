"""Faults a run survives (docs/faults.md): divergence, a second run on a workdir, a changed config
on resume, SIGTERM / SIGINT, damaged checkpoints, storage errors; each ends as the table says.

Most tests drive `trainer.train_loop`, `RunCheckpoints` and the lock directly with tiny host
states (no model, no data), so each takes well under a second; the `main.py` ones check that the
user sees one line and the documented exit status, and that a stopped run resumes bit for bit.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO_ROOT, xla_flags
from tests.tiny_configs import tiny_config, tiny_loop_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, finetune, pretrain, signals, trainer
from vcp_jax import workdir as workdir_lib

# --------------------------------------------------------------------------------------------
# The training loop on a host state: divergence, signals
# --------------------------------------------------------------------------------------------


class HostStrategy:
    """The strategy interface on plain host arrays (nothing placed, nothing compiled)."""

    axis_name = None
    num_devices = 1

    def put_state(self, state: Any) -> Any:
        return state

    def get_state(self, state: Any) -> Any:
        return state

    def put_batch(self, batch: Any) -> Any:
        return batch

    def fetch(self, tree: Any) -> Any:
        return jax.tree.map(np.asarray, tree)


def _loop_config(steps: int = 6, **overrides: Any) -> ml_collections.ConfigDict:
    return tiny_loop_config(steps, log_every=3, eval_every=2, checkpoint_every=2, **overrides)


def _loop(workdir: Path, config, train_fn, evaluate=lambda s: {"val_loss": 1.0},
          start_step: int = 0, state: Any = None) -> trainer.LoopResult:
    checkpoints = checkpointing.RunCheckpoints(workdir / "checkpoints", config)
    state = {"w": np.zeros(3, np.float32)} if state is None else state
    return trainer.train_loop(
        config=config, state=state, train_fn=train_fn, train_iter=itertools.repeat({}),
        evaluate=evaluate, strategy=HostStrategy(), checkpoints=checkpoints,
        start_step=start_step, writer=None, desc="test", eval_line=trainer.eval_line)


def _stepper(bad_step: int | None = None, *, bad: str = "loss", on_step=None):
    """A train_fn counting steps: `w += 1`; at `bad_step`, `bad` becomes NaN."""
    calls = itertools.count(1)

    def train_fn(state: Any, batch: Any) -> tuple[Any, dict[str, np.ndarray]]:
        step = next(calls)
        if on_step is not None:
            on_step(step)
        w = state["w"] + 1
        metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0)}
        if step == bad_step:
            if bad == "state":
                w = w * np.nan
            else:
                metrics[bad] = np.float32(np.nan)
        return {"w": w}, metrics

    return train_fn


def _saved(workdir: Path) -> list[int]:
    return checkpointing.find_own_steps(workdir)


def test_a_nan_loss_stops_the_run_and_names_the_step_and_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(trainer.Diverged) as info:
        _loop(tmp_path, _loop_config(), _stepper(bad_step=5))
    message = str(info.value)
    assert "diverged at step 5 (loss=nan)" in message
    assert f"the last finite checkpoint is step 4 ({tmp_path / 'checkpoints' / '4'})" in message
    assert info.value.exit_code == 3
    assert _saved(tmp_path) == [2, 4]  # nothing from step 5 on


def test_a_nan_gradient_norm_at_the_first_step_stops_before_any_checkpoint(
    tmp_path: Path,
) -> None:
    with pytest.raises(trainer.Diverged, match=r"step 1 \(grad_norm=nan\).*no checkpoint was "
                                               r"saved"):
        _loop(tmp_path, _loop_config(), _stepper(bad_step=1, bad="grad_norm"))
    assert _saved(tmp_path) == []


def test_a_non_finite_state_or_validation_loss_is_never_saved_nor_ranked_best(
    tmp_path: Path,
) -> None:
    # Finite metrics, but the step-4 state holds a NaN: found by the save, which refuses it.
    with pytest.raises(trainer.Diverged, match="step 4 .the state holds non-finite values"):
        _loop(tmp_path / "a", _loop_config(), _stepper(bad_step=4, bad="state"))
    assert _saved(tmp_path / "a") == [2]
    with pytest.raises(trainer.Diverged, match=r"step 2 \(val_loss=nan\)"):
        _loop(tmp_path / "b", _loop_config(), _stepper(),
              evaluate=lambda s: {"val_loss": float("nan"), "val_accuracy": 0.5})
    assert _saved(tmp_path / "b") == []
    assert not (tmp_path / "b" / "checkpoints" / checkpointing.BEST_FILE).exists()
    # Directly: a NaN state is refused; a NaN validation loss does not rank a checkpoint.
    checkpoints = checkpointing.RunCheckpoints(tmp_path / "c", _loop_config())
    with pytest.raises(checkpointing.NonFiniteError):
        checkpoints.save(1, {"w": np.array([1.0, np.inf], np.float32)})
    checkpoints.save(2, {"w": np.ones(2, np.float32)},
                     metrics={"val_loss": float("nan"), "val_accuracy": 0.5})
    checkpoints.wait()
    assert checkpoints.best_step() is None
    assert checkpointing.find_own_steps(tmp_path, "c") == [2]


def test_sigterm_in_the_loop_saves_the_step_and_stops(tmp_path: Path) -> None:
    def send(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with signals.handle_signals(), pytest.raises(signals.Stopped) as info:
        _loop(tmp_path, _loop_config(steps=100), _stepper(on_step=send))
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 3" in str(info.value)
    assert _saved(tmp_path) == [2, 3]
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    # The rerun resumes from step 3: w counts every step exactly once.
    checkpoints = checkpointing.RunCheckpoints(tmp_path / "checkpoints", _loop_config(steps=6))
    state, step = checkpoints.restore_latest({"w": np.zeros(3, np.float32)})
    assert step == 3 and state["w"].tolist() == [3, 3, 3]
    result = _loop(tmp_path, _loop_config(steps=6), _stepper(), start_step=3, state=state)
    assert result.state["w"].tolist() == [6, 6, 6]


def test_sigint_outside_the_loop_stops_at_once(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    with signals.handle_signals(), pytest.raises(signals.Stopped) as info:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises long before
    assert info.value.exit_code == 128 + signal.SIGINT
    assert "before training" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------------------------
# Resuming: a changed config, damaged checkpoints, shapes
# --------------------------------------------------------------------------------------------


def _stored(config) -> dict:
    return checkpointing.config_to_dict(config)


def test_a_changed_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    old = tiny_config(tmp_path)
    new = tiny_config(tmp_path)
    new.batch_size, new.optimizer.learning_rate = 16, 0.5
    new.cloze.options = ("original", "rotation")
    new.log_every_steps, new.data.num_threads, new.init_from = 7, 1, "/elsewhere"  # free keys
    where = tmp_path / "checkpoints" / "2"
    with pytest.raises(checkpointing.ConfigChangeError) as info:
        checkpointing.check_resume_config(_stored(old), new, step=2, where=where)
    message = str(info.value)
    for key in ("batch_size 8 -> 16", "optimizer.learning_rate 0.01 -> 0.5", "cloze.options"):
        assert key in message, message
    for free in ("log_every_steps", "num_threads", "init_from"):
        assert free not in message, message
    assert "--allow_config_change=batch_size,cloze.options,optimizer.learning_rate" in message
    # Named (a key, or its section), the changes are accepted and listed.
    with checkpointing.allow_config_changes(["batch_size", "optimizer", "cloze"]):
        accepted = checkpointing.check_resume_config(_stored(old), new, step=2, where=where)
    assert "batch_size 8 -> 16" in accepted
    # Extending a run is a change like any other; shortening it below its step never is.
    longer = tiny_config(tmp_path)
    longer.num_train_steps = 40
    with pytest.raises(checkpointing.ConfigChangeError, match="num_train_steps 4 -> 40"):
        checkpointing.check_resume_config(_stored(old), longer, step=2, where=where)
    with checkpointing.allow_config_changes(["num_train_steps"]):
        checkpointing.check_resume_config(_stored(old), longer, step=2, where=where)
    shorter = tiny_config(tmp_path)
    shorter.num_train_steps = 1
    with checkpointing.allow_config_changes(["num_train_steps"]), pytest.raises(
            checkpointing.ConfigError, match="num_train_steps=1 is below the step"):
        checkpointing.check_resume_config(_stored(old), shorter, step=2, where=where)
    # Unset keys (a stage fills them in later) are compared only once they are set.
    unset = tiny_config(tmp_path)
    unset.model.arch = None
    checkpointing.check_resume_config(_stored(old), unset, step=2, where=where, skip_unset=True)


def _damage(step_dir: Path) -> None:
    """Truncates every data file of a checkpoint's state (a disk error, a partial copy)."""
    for path in (step_dir / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[:16])


def _write_steps(directory: Path, config, steps: dict[int, np.ndarray]) -> None:
    checkpoints = checkpointing.RunCheckpoints(directory, config)
    for step, w in steps.items():
        checkpoints.save(step, {"w": w})
    checkpoints.wait()


def test_a_damaged_checkpoint_falls_back_to_the_previous_intact_one(tmp_path: Path) -> None:
    config = _loop_config()
    directory = tmp_path / "checkpoints"
    _write_steps(directory, config, {1: np.full(3, 1.0, np.float32),
                                     2: np.full(3, 2.0, np.float32)})
    _damage(directory / "2")
    checkpoints = checkpointing.RunCheckpoints(directory, config)
    state, step, warnings = checkpoints.restore_newest({"w": np.zeros(3, np.float32)})
    assert step == 1 and state["w"].tolist() == [1, 1, 1]
    assert any("the checkpoint of step 2 cannot be restored" in w for w in warnings), warnings
    assert (directory / "2.broken").is_dir() and checkpoints.manager.all_steps() == [1]
    # The next save of step 2 is not blocked by the damaged folder.
    checkpoints.save(2, {"w": np.full(3, 5.0, np.float32)})
    checkpoints.wait()
    assert checkpointing.find_own_steps(tmp_path) == [1, 2]


def test_no_silent_fallback_across_a_config_change(tmp_path: Path) -> None:
    old, new = _loop_config(), _loop_config()
    new.optimizer.learning_rate = 0.5
    directory = tmp_path / "checkpoints"
    _write_steps(directory, old, {1: np.ones(3, np.float32)})
    _write_steps(directory, new, {2: np.ones(3, np.float32)})  # resumed with an allowed change
    _damage(directory / "2")
    checkpoints = checkpointing.RunCheckpoints(directory, new)

    def check(step: int, stored: dict) -> None:
        checkpointing.check_resume_config(stored, new, step=step, where=directory / str(step))

    with pytest.raises(checkpointing.ConfigChangeError, match=r"\(step 1\).*learning_rate"):
        checkpoints.restore_newest({"w": np.zeros(3, np.float32)}, check_config=check)


def test_shapes_that_do_not_fit_and_no_intact_checkpoint_are_errors(tmp_path: Path) -> None:
    config = _loop_config()
    directory = tmp_path / "checkpoints"
    _write_steps(directory, config, {1: np.ones(3, np.float32)})
    checkpoints = checkpointing.RunCheckpoints(directory, config)
    with pytest.raises(checkpointing.CheckpointError, match=r"does not fit.*w \(3,\) \(the "
                                                            r"model's: \(4,\)\)"):
        checkpoints.restore_newest({"w": np.zeros(4, np.float32)})
    with pytest.raises(checkpointing.CheckpointError, match="missing v"):
        checkpoints.restore_newest({"w": np.zeros(3, np.float32), "v": np.zeros(1)})
    _damage(directory / "1")
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .* can be restored"):
        checkpoints.restore_newest({"w": np.zeros(3, np.float32)})


def test_a_legacy_nan_checkpoint_is_skipped_like_a_damaged_one(tmp_path: Path) -> None:
    config = _loop_config()
    directory = tmp_path / "checkpoints"
    _write_steps(directory, config, {1: np.ones(3, np.float32)})
    # Step 2 as versions before the finite checks wrote it: straight through Orbax.
    with ocp.CheckpointManager(directory, item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()}) as manager:
        manager.save(2, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.full(3, np.nan, np.float32)}),
            config=ocp.args.JsonSave(_stored(config))))
    checkpoints = checkpointing.RunCheckpoints(directory, config)
    _, step, warnings = checkpoints.restore_newest({"w": np.zeros(3, np.float32)})
    assert step == 1 and any("non-finite" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# init_from: non-finite and damaged backbones
# --------------------------------------------------------------------------------------------


def _backbone(tmp_path: Path, value: float) -> Path:
    workdir = tmp_path / f"backbone_{value}"
    backbone_lib.save_backbone(
        workdir, params={"conv1": {"kernel": np.full((2, 2), value, np.float32)}},
        batch_stats={"bn1": {"mean": np.zeros(2, np.float32)}},
        config={"model": {"arch": "r3d", "width": 4}})
    return workdir


def test_init_from_refuses_a_non_finite_backbone(tmp_path: Path) -> None:
    assert backbone_lib.load_backbone(_backbone(tmp_path, 1.0)).num_params == 4
    with pytest.raises(checkpointing.NonFiniteError, match=r"non-finite values \(4 of 6, in "
                                                            r"params/backbone/conv1/kernel"):
        backbone_lib.load_backbone(_backbone(tmp_path, np.nan))


def test_init_from_a_damaged_checkpoint_or_a_file_says_so(tmp_path: Path) -> None:
    workdir = _backbone(tmp_path, 1.0)
    _damage(workdir / "checkpoints" / "0")
    with pytest.raises(checkpointing.CheckpointError, match=r"init_from: the checkpoint .*/0 is "
                                                            r"damaged"):
        backbone_lib.load_backbone(workdir)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(checkpointing.CheckpointError, match="model.pt is a file"):
        backbone_lib.load_backbone(tmp_path / "model.pt")


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def test_a_workdir_under_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(workdir_lib.StorageError, match=r"--workdir .*file/run: .*file is a file"):
        workdir_lib.prepare(tmp_path / "file" / "run")
    (tmp_path / "w" / "checkpoints").parent.mkdir()
    (tmp_path / "w" / "checkpoints").write_text("x")
    with pytest.raises(workdir_lib.StorageError, match="checkpoints is a file"):
        workdir_lib.prepare(tmp_path / "w")


def test_a_full_or_read_only_disk_is_found_by_the_write_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")):
        def fail(fd: int, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(workdir_lib.StorageError, match=f"{tmp_path}.*cannot be written: "
                                                           f"{words}"):
            workdir_lib.prepare(tmp_path)
        assert not list(tmp_path.glob(".write_probe*"))  # the probe cleans up


def test_a_failed_save_is_one_storage_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = _loop_config()
    _write_steps(tmp_path / "checkpoints", config, {1: np.ones(3, np.float32)})
    checkpoints = checkpointing.RunCheckpoints(tmp_path / "checkpoints", config)

    def full(*args: Any, **kwargs: Any) -> None:  # as TensorStore reports it, through Orbax
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: '
                         "Failed to write 11487 bytes: No space left on device "
                         "[os_error_code='28']")

    monkeypatch.setattr(checkpoints.manager, "save", full)
    with pytest.raises(workdir_lib.StorageError) as info:
        checkpoints.save(2, {"w": np.ones(3, np.float32)})
    assert str(info.value).startswith(f"cannot save the checkpoint of step 2 in "
                                      f"{tmp_path / 'checkpoints'}: no space left on the device; "
                                      f"the last complete checkpoint is step 1")
    assert workdir_lib.describe_os_error(OSError(errno.EROFS, "x")) == "read-only file system"


# --------------------------------------------------------------------------------------------
# The workdir lock
# --------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_owner(tmp_path: Path) -> None:
    with workdir_lib.WorkdirLock.acquire(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(workdir_lib.LockError) as info:
            workdir_lib.WorkdirLock.acquire(tmp_path)
        assert f"in use by process {os.getpid()} on host {socket.gethostname()}" in str(info.value)
    assert not lock.path.exists()  # released
    workdir_lib.WorkdirLock.acquire(tmp_path).release()


def test_the_lock_of_a_run_that_is_gone_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with workdir_lib.WorkdirLock.acquire(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
    lock.path.write_text(json.dumps({**owner, "pid": gone.pid, "token": "old"}))
    with workdir_lib.WorkdirLock.acquire(tmp_path) as lock:
        assert lock.taken_over["pid"] == gone.pid


def test_a_lock_from_another_machine_is_taken_over_only_when_stale(tmp_path: Path) -> None:
    path = tmp_path / workdir_lib.LOCK_FILE
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "boot_id": "b", "token": "t",
                                "started": "earlier"}))
    with pytest.raises(workdir_lib.LockError, match="on host elsewhere .* taken over 1\\d\\d s "
                                                    "from now"):
        workdir_lib.WorkdirLock.acquire(tmp_path)
    old = time.time() - workdir_lib.STALE_SECONDS - 1
    os.utime(path, (old, old))
    with workdir_lib.WorkdirLock.acquire(tmp_path) as lock:
        assert lock.taken_over["host"] == "elsewhere"


def test_the_lock_is_refreshed_while_held(tmp_path: Path) -> None:
    with workdir_lib.WorkdirLock.acquire(tmp_path, heartbeat=0.05) as lock:
        os.utime(lock.path, (0, 0))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5


# --------------------------------------------------------------------------------------------
# Minor: messages that name their key
# --------------------------------------------------------------------------------------------


def test_clip_len_errors_name_the_key(tiny_dataset: Path, capsys) -> None:
    config = tiny_config(tiny_dataset)
    config.cloze.clip_len = 6
    with pytest.raises(pretrain.config_utils.ConfigError, match=r"^config\.cloze\.clip_len=6: "):
        pretrain.validate_config(config)
    config.cloze.clip_len = 40  # a tuple of 136 frames; the videos have 72
    with pytest.raises(pretrain.config_utils.ConfigError, match=r"config\.cloze\.clip_len=40.*"
                                                                r"the longest has 72"):
        pretrain.pretrain_data(config)
    finetune.warn_short_videos(100, {"train": np.array([72, 80]), "test": np.array([120])})
    assert ("warning: 2 of 2 train videos are shorter than config.finetune.clip_len=100 frames "
            "(the shortest has 72)") in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# main.py: one line, the documented exit status, and a stopped run resumes bit for bit
# --------------------------------------------------------------------------------------------


def _main(workdir: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "main.py", "--config", "tests/tiny_pretrain_config.py",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run(workdir: Path, data_dir: Path, *extra: str, status: int = 0) -> str:
    process = _main(workdir, data_dir, *extra)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == status, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def test_main_refuses_a_locked_workdir_and_unknown_override_keys(tmp_path: Path) -> None:
    with workdir_lib.WorkdirLock.acquire(tmp_path):
        out = _run(tmp_path, tmp_path, status=2)
    assert f"error: the workdir {tmp_path} is in use by process {os.getpid()}" in out
    out = _run(tmp_path / "w", tmp_path, "--allow_config_change=optimizer.learnig_rate",
               status=2)
    assert "--allow_config_change: optimizer.learnig_rate is not a key" in out
    assert "did you mean optimizer.learning_rate" in out
    (tmp_path / "file").write_text("x")
    out = _run(tmp_path / "file" / "w", tmp_path, status=2)
    assert f"{tmp_path / 'file'} is a file, not a folder" in out


@pytest.mark.slow
def test_main_stops_a_diverged_run_with_status_3(tiny_dataset: Path, tmp_path: Path) -> None:
    args = ("--config.optimizer.learning_rate=1e6", "--config.num_train_steps=4")
    out = _run(tmp_path, tiny_dataset, *args, status=3)
    assert "error: training diverged at step" in out
    for step in checkpointing.find_own_steps(tmp_path):  # any saved step is a finite one
        state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) /
                                                   "state")
        assert checkpointing.tree_is_finite(state)
    assert not (tmp_path / "run.lock").exists() and not (tmp_path / "metrics.json").exists()


def _final_params(workdir: Path, step: int) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, restored["params"])


@pytest.mark.slow
def test_sigterm_saves_then_a_changed_config_is_refused_and_the_rerun_is_bit_exact(
    tiny_dataset: Path, tmp_path: Path,
) -> None:
    args = ("--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
            "--config.eval_every_steps=1000", "--config.log_every_steps=1000")
    stopped = tmp_path / "stopped"
    process = _main(stopped, tiny_dataset, *args)
    deadline = time.time() + 600
    while not (stopped / "tensorboard").is_dir():  # made just before the training loop starts
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.1)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGTERM after step" in out, out[-3000:]
    (step,) = checkpointing.find_own_steps(stopped)  # saved at the step boundary
    assert 0 < step < 400 and not (stopped / "run.lock").exists()
    # Resuming with another learning rate or batch size is refused, naming both keys.
    out = _run(stopped, tiny_dataset, *args, "--config.optimizer.learning_rate=0.5",
               "--config.batch_size=16", status=2)
    assert "batch_size 8 -> 16; optimizer.learning_rate 0.01 -> 0.5" in out
    # Resumed to step + 2 (extending the run, allowed), it equals a run straight to that step.
    final = str(step + 2)
    short = (f"--config.num_train_steps={final}", "--config.eval_every_steps=1000",
             "--config.checkpoint_every_steps=1000")
    out = _run(stopped, tiny_dataset, *short, "--allow_config_change=num_train_steps")
    assert f"resumed from the checkpoint of step {step}" in out and "num_train_steps" in out
    straight = tmp_path / "straight"
    _run(straight, tiny_dataset, *short)
    jax.tree.map(np.testing.assert_array_equal, _final_params(stopped, step + 2),
                 _final_params(straight, step + 2))
