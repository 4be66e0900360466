"""VCP pretraining: steps, data parallelism (8 simulated devices), checkpoints, resumption."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO_ROOT, tiny_config, xla_flags
from vcp_jax import checkpointing, config_utils, parallel, pretrain, trainer


def _fixed_batch(config) -> dict[str, np.ndarray]:
    return pretrain.pretrain_data(config).train[0]


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.optimizer.learning_rate = 0.05
    batch = _fixed_batch(config)
    strategy = parallel.JitStrategy()
    state, ctx = pretrain.create_train_state(config)
    step = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=False)
    state = strategy.put_state(state)
    losses = []
    for _ in range(12):
        # Step 0 every time: the same cloze options, so the batch is truly fixed.
        state, metrics = step(state.replace(step=state.step * 0), strategy.put_batch(batch))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def _run_steps(strategy, config, batch, num_steps=2):
    state, ctx = pretrain.create_train_state(config, bn_axis_name=strategy.axis_name)
    step = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=False)
    state = strategy.put_state(state)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, strategy.put_batch(batch))
        losses.append(float(strategy.fetch(metrics)["loss"]))
    return losses, jax.tree.map(np.asarray, strategy.get_state(state).params)


@pytest.mark.slow
def test_jit_pmap_and_one_device_agree(tiny_dataset: Path) -> None:
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    config = tiny_config(tiny_dataset)
    batch = _fixed_batch(config)
    one_loss, one_params = _run_steps(parallel.JitStrategy([jax.devices()[0]]), config, batch)
    jit_loss, jit_params = _run_steps(parallel.JitStrategy(), config, batch)
    pmap_loss, pmap_params = _run_steps(parallel.PmapStrategy(), config, batch)
    np.testing.assert_allclose(jit_loss, one_loss, rtol=1e-5)
    np.testing.assert_allclose(pmap_loss, one_loss, rtol=1e-5)
    for other in (jit_params, pmap_params):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     other, one_params)


def test_eval_step_counts_every_valid_tuple(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    data = pretrain.pretrain_data(config)
    strategy = parallel.JitStrategy()
    state, ctx = pretrain.create_train_state(config)
    eval_fn = strategy.compile(functools.partial(pretrain.eval_step, ctx=ctx), donate_state=False)
    first = pretrain.evaluate(strategy.put_state(state), data.val, eval_fn, strategy, config)
    second = pretrain.evaluate(strategy.put_state(state), data.val, eval_fn, strategy, config)
    np.testing.assert_equal(first, second)  # deterministic held-out tuples and options
    assert first["val_tuples"] == 4
    fractions = [v for k, v in first.items() if k.startswith("val_option_fraction/")]
    assert len(fractions) == 5 and sum(fractions) == pytest.approx(1.0)


def test_config_errors_name_the_key(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.model.arch = "r4d"
    with pytest.raises(config_utils.ConfigError, match=r"model\.arch.*'c3d', 'r3d', 'r21d'"):
        pretrain.validate_config(config)
    config = tiny_config(tiny_dataset)
    config.parallel = "pjit"
    with pytest.raises(config_utils.ConfigError, match=r"config\.parallel.*'jit', 'pmap'"):
        pretrain.validate_config(config)
    config = tiny_config(tiny_dataset)
    config.batch_size = 12
    with pytest.raises(config_utils.ConfigError, match="batch_size"):
        pretrain.validate_config(config)
    config = tiny_config(tiny_dataset)
    config.cloze.options = ("original", "teleport")
    with pytest.raises(config_utils.ConfigError, match="cloze"):
        pretrain.validate_config(config)


def test_learning_rate_scales_with_batch(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.optimizer.learning_rate, config.batch_size = 0.01, 64
    assert trainer.effective_learning_rate(config) == pytest.approx(0.08)
    config.optimizer.scale_with_batch = False
    assert trainer.effective_learning_rate(config) == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------
# main.py end to end: kill and resume
# --------------------------------------------------------------------------------------------


def _main(workdir: Path, data_dir: Path, *extra: str, compilation_cache: Path | None = None,
          hold_after_save: Path | None = None, pretext: str = "vcp") -> subprocess.Popen:
    cmd = [sys.executable, "main.py", "--config", f"tests/tiny_pretrain_config.py:{pretext}",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.num_train_steps=8", "--config.checkpoint_every_steps=2",
           "--config.eval_every_steps=4", *extra]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    if hold_after_save is not None:  # the run stops after its first save, until it is killed
        env[trainer.HOLD_AFTER_SAVE_ENV] = str(hold_after_save)
    if compilation_cache is not None:  # main.py's own cache flag, not the tests' shared cache
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd.append(f"--compilation_cache={compilation_cache}")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _final_params(workdir: Path) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "8" / "state")
    return jax.tree.map(np.asarray, restored["params"])


def _wait_for(marker: Path, process: subprocess.Popen) -> None:
    """Until the run holding after its first save has written `marker` (no race: it holds)."""
    deadline = time.time() + 600
    while not marker.is_file():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.1)
    assert marker.read_text() == "2\n"


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pretext", ["vcp", "vcop"])
def test_killed_run_resumes_bit_for_bit(tiny_dataset: Path, tmp_path: Path, pretext: str
                                        ) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cache = tmp_path / "jax_cache"
    out = _finish(_main(straight, tiny_dataset, compilation_cache=cache, pretext=pretext))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["pretext"] == pretext
    if pretext == "vcp":
        assert {"val_loss", "val_vcp_accuracy", "val_accuracy/rotation"} <= set(metrics)
    else:  # the order accuracy, per order, in metrics.json and on the console
        assert {"val_loss", "val_vcop_accuracy", "val_accuracy/012", "val_accuracy/210"
                } <= set(metrics)
        assert "held-out VCOP accuracy" in out and "per order: 012 " in out
    # The steps were stored in --compilation_cache; the runs below load them from there, and
    # the bit-for-bit comparison shows a loaded step computes what a compiled one does.
    cached = {p.name for p in cache.iterdir()}
    assert any(name.startswith("jit_") for name in cached), cached

    marker = tmp_path / "saved"
    process = _main(killed, tiny_dataset, compilation_cache=cache, hold_after_save=marker,
                    pretext=pretext)
    _wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpointing.find_own_steps(killed) == [2]  # killed right after its first save
    out = _finish(_main(killed, tiny_dataset, compilation_cache=cache, pretext=pretext))
    assert "resumed from the checkpoint of step" in out
    jax.tree.map(np.testing.assert_array_equal, _final_params(killed), _final_params(straight))
    # The best-validation-loss checkpoint is kept beside the last ones.
    best = json.loads((killed / "checkpoints" / "best.json").read_text())
    assert (killed / "checkpoints" / str(best["step"])).is_dir()
