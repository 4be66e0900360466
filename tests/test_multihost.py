"""Multi-host runs through main.py: 2 processes on localhost equal 1 process, and resume.

Each process simulates 2 CPU devices and joins the other with `jax.distributed.initialize` on a
local coordinator (`--coordinator_address`, `--num_processes`, `--process_id`, as
`scripts/launch_multihost.py` passes them). The reference is 1 process with 4 devices: the same
global batch over the same number of devices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO_ROOT, xla_flags
from vcp_jax import checkpointing, trainer

pytestmark = pytest.mark.slow
# Two steps: 1 and 2 processes reduce over devices in different orders, so their values agree to
# float rounding (~1e-6); a ReLU input within rounding of 0 can then flip its gradient, which was
# seen to move some early-layer weights by 0.2% at step 3. Two steps compare the semantics.
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(config: str, workdir: Path, data_dir: Path, *, processes: int, parallel: str,
            extra: tuple[str, ...] = (), hold_after_save: Path | None = None,
            ) -> list[subprocess.Popen]:
    devices_per_process = 4 // processes
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices_per_process))
    if hold_after_save is not None:  # every process stops after the first save until killed
        env[trainer.HOLD_AFTER_SAVE_ENV] = str(hold_after_save)
    base = [sys.executable, "main.py", "--config", config, f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.parallel={parallel}",
            f"--config.num_train_steps={STEPS}", *extra]
    if processes == 1:
        commands = [base]
    else:
        port = _free_port()
        commands = [[*base, f"--coordinator_address=localhost:{port}",
                     f"--num_processes={processes}", f"--process_id={i}"]
                    for i in range(processes)]
    return [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for cmd in commands]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for p in processes:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def _params(workdir: Path, step: int = STEPS) -> dict:
    """The saved parameters as numpy arrays, whatever devices and processes saved them."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return restored["params"]


def _initial_params(config_module: str, init_from: Path | None) -> dict:
    """The parameters both runs start from, built here the way the stage builds them."""
    import importlib

    from vcp_jax import backbone as backbone_lib
    from vcp_jax import finetune, pretrain

    config = importlib.import_module(config_module).get_config()
    if config.task == "pretrain":
        state, _ = pretrain.create_train_state(config)
    else:
        state, _ = finetune.create_train_state(config, num_classes=4)
        state = backbone_lib.init_backbone(state, backbone_lib.load_backbone(init_from))
    return jax.tree.map(np.asarray, state.params.to_pure_dict() if hasattr(
        state.params, "to_pure_dict") else state.params)


def _strip_values(tree):
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {str(k): _strip_values(v) for k, v in tree.items()}
    return tree


def _assert_same_run(workdir: Path, reference: Path, keys: tuple[str, ...],
                     initial: dict) -> None:
    """Same metrics, and the same parameter updates (each tensor to 1e-3 of its largest).

    Updates, not values: after a few small SGD steps the parameters are mostly their (shared)
    initial values, which would hide a different update.
    """
    got = json.loads((workdir / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    for key in keys:
        np.testing.assert_allclose(_dig(got, key), _dig(want, key), rtol=1e-4, err_msg=key)
    initial = _strip_values(initial)

    def same_update(path, a, b, a0):
        delta, want_delta = a - a0, b - a0
        np.testing.assert_allclose(delta, want_delta, rtol=0,
                                   atol=1e-3 * np.abs(want_delta).max() + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))

    final, want_final = _strip_values(_params(workdir)), _strip_values(_params(reference))
    assert any(np.abs(b - a0).max() > 1e-6 for b, a0 in
               zip(jax.tree.leaves(want_final), jax.tree.leaves(initial), strict=True))
    jax.tree_util.tree_map_with_path(same_update, final, want_final, initial)


def _dig(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _console_only_on_process_0(outputs: list[str], marker: str) -> None:
    assert marker in outputs[0]
    for other in outputs[1:]:
        assert marker not in other, other[-2000:]


@pytest.fixture(scope="module")
def data_dir(tiny_dataset: Path) -> Path:
    return tiny_dataset


@pytest.fixture(scope="module")
def pretrain_reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("pretrain_1p")
    _finish(_launch("tests/tiny_pretrain_config.py", workdir, data_dir, processes=1,
                    parallel="jit"))
    return workdir


def _files_for_people_from_process_0(workdir: Path, outputs: list[str], launches: int = 1) -> None:
    _console_only_on_process_0(outputs, "held-out VCP accuracy")
    # Each process has its own library log; tensorboard (one event file per launch) and
    # provenance come from process 0.
    assert (workdir / "log.txt").is_file() and (workdir / "log.1.txt").is_file()
    assert len(list((workdir / "tensorboard").iterdir())) == launches
    provenance = json.loads((workdir / "provenance.json").read_text())
    assert provenance["machine"]["process_count"] == 2
    assert provenance["machine"]["device_count"] == 4


# parallel='jit' on 2 processes is compared with 1 process by the kill-and-restart test below
# (its resumed run's parameters at step 2), so one launch covers both.
def test_pretraining_on_2_processes_equals_1_pmap(data_dir: Path, pretrain_reference: Path,
                                                  tmp_path: Path) -> None:
    workdir = tmp_path / "pretrain_2p"
    outputs = _finish(_launch("tests/tiny_pretrain_config.py", workdir, data_dir, processes=2,
                              parallel="pmap"))
    _assert_same_run(workdir, pretrain_reference, ("val_loss", "val_vcp_accuracy"),
                     _initial_params("tests.tiny_pretrain_config", None))
    _files_for_people_from_process_0(workdir, outputs)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_finetuning_on_2_processes_equals_1(parallel: str, data_dir: Path,
                                            pretrain_reference: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    init = (f"--config.init_from={pretrain_reference}",)
    reference = tmp_path_factory.getbasetemp() / "finetune_1p"
    if not (reference / "metrics.json").is_file():
        _finish(_launch("tests/tiny_finetune_config.py", reference, data_dir, processes=1,
                        parallel="jit", extra=init))
    workdir = tmp_path_factory.mktemp(f"finetune_2p_{parallel}")
    outputs = _finish(_launch("tests/tiny_finetune_config.py", workdir, data_dir,
                              processes=2, parallel=parallel, extra=init))
    _assert_same_run(workdir, reference, ("test.video_top1", "test.clip_top1",
                                          "val_metrics_last.val_loss"),
                     _initial_params("tests.tiny_finetune_config", pretrain_reference))
    got = json.loads((workdir / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert got["test"]["num_test_videos"] == want["test"]["num_test_videos"] == 12
    assert got["test"]["confusion"] == want["test"]["confusion"]  # every video once
    _console_only_on_process_0(outputs, "fold 1 test")


def test_killing_one_process_and_restarting_both_resumes(
    data_dir: Path, pretrain_reference: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "killed"
    extra = ("--config.checkpoint_every_steps=1", "--config.num_train_steps=4")
    marker = tmp_path / "saved"  # written by process 0 once the first save is on disk
    processes = _launch("tests/tiny_pretrain_config.py", workdir, data_dir, processes=2,
                        parallel="jit", extra=extra, hold_after_save=marker)
    deadline = time.time() + 600
    while not marker.is_file():  # both processes hold after that save: no race with the kill
        assert all(p.poll() is None for p in processes), "a process ended before its 1st save"
        assert time.time() < deadline
        time.sleep(0.1)
    processes[1].send_signal(signal.SIGKILL)  # one host dies...
    processes[1].wait()
    processes[0].send_signal(signal.SIGKILL)  # ...and the job is torn down, as a scheduler does
    processes[0].wait()
    assert checkpointing.find_own_steps(workdir) == [1]
    outputs = _finish(_launch("tests/tiny_pretrain_config.py", workdir, data_dir, processes=2,
                              parallel="jit", extra=extra))
    assert "resumed from the checkpoint of step" in outputs[0]
    _files_for_people_from_process_0(workdir, outputs, launches=2)  # killed, then restarted
    # Step 2 of the resumed run is step 2 of the uninterrupted one-process run.
    initial = _strip_values(_initial_params("tests.tiny_pretrain_config", None))
    resumed = _strip_values(_params(workdir, step=STEPS))
    straight = _strip_values(_params(pretrain_reference, step=STEPS))
    for a, b, a0 in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight),
                        jax.tree.leaves(initial), strict=True):
        np.testing.assert_allclose(a - a0, b - a0, rtol=0,
                                   atol=1e-3 * np.abs(b - a0).max() + 1e-9)


def test_sigterm_to_one_process_stops_both_after_the_same_step(data_dir: Path,
                                                                tmp_path: Path) -> None:
    """A preemption notice reaching one host: every host saves the same step and exits 143."""
    workdir = tmp_path / "sigterm"
    extra = ("--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
             "--config.eval_every_steps=1000")
    processes = _launch("tests/tiny_pretrain_config.py", workdir, data_dir, processes=2,
                        parallel="jit", extra=extra)
    deadline = time.time() + 600
    while not (workdir / "tensorboard").is_dir():  # made just before the training loop
        assert all(p.poll() is None for p in processes), "a process ended before training"
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    (step,) = checkpointing.find_own_steps(workdir)
    assert f"stopped by SIGTERM after step {step}" in outputs[0]
    assert not (workdir / "run.lock").exists()  # process 0's lock, released
