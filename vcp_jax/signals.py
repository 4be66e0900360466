"""SIGTERM and SIGINT end a run cleanly: a checkpoint at the next step boundary, then exit.

Preemptible TPU VMs and spot GPUs, SLURM (at the time limit, or earlier with `--signal`) and
Kubernetes send SIGTERM and wait (often only 30 s) before SIGKILL; Ctrl-C sends SIGINT. Inside
`handle_signals()` (what `main` runs under):

- one process: the first signal is recorded; the training loop asks `stop_now(step)` after
  every step, saves that step's checkpoint and raises `Stopped`. Outside the training loop (data
  loading, compilation, the final test) nothing would be kept by waiting, so the signal raises
  `Stopped` at once. A second signal stops at once, as without this module.
- several processes (`jax.distributed`): a checkpoint save involves every process at the same
  step, so the step is agreed on: JAX's preemption service (on by default) catches SIGTERM on any
  host, tells the others, and `reached_preemption_sync_point` turns True at the same step on all
  of them. SIGINT is passed on to it as a SIGTERM to this process.

`Stopped` carries the exit status of a process ended by that signal (128 + its number: 143 for
SIGTERM, 130 for SIGINT), so schedulers and shells see a run that did not finish.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from vcp_jax.config_utils import UserError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Stopped(UserError):
    """The run was stopped by a signal; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _State:
    def __init__(self) -> None:
        self.active = False  # inside handle_signals()
        self.in_loop = False  # inside a training loop: wait for the step boundary
        self.received: int | None = None  # the first signal
        self.previous: dict[int, Any] = {}


_state = _State()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _multi_process() -> bool:
    import jax  # noqa: PLC0415

    return jax.process_count() > 1


def _handler(signum: int, frame: FrameType | None) -> None:
    del frame
    if _state.received is not None:  # the second signal: stop at once, as without us
        _restore()
        os.kill(os.getpid(), signum)
        return
    _state.received = signum
    if _state.in_loop:
        print(f"\n{signal_name(signum)} received: saving a checkpoint after this step, then "
              f"stopping (send it again to stop at once)", flush=True)
        return
    raise Stopped(f"stopped by {signal_name(signum)} before training (nothing to save); run "
                  f"the same command again to start", signum)


def _forward_to_jax(signum: int, frame: FrameType | None) -> None:
    """SIGINT on a multi-process run: JAX's preemption service listens to SIGTERM only."""
    del signum, frame
    _state.received = signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)


def _restore() -> None:
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous)
    _state.previous = {}


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGTERM / SIGINT handled as the module docstring says, for the duration of the block.

    A no-op outside the main thread (Python delivers signals to it alone).
    """
    if threading.current_thread() is not threading.main_thread() or _state.active:
        yield
        return
    _state.active, _state.received, _state.in_loop = True, None, False
    if _multi_process():
        # SIGTERM stays with JAX's preemption notifier (installed by jax.distributed).
        _state.previous = {signal.SIGINT: signal.signal(signal.SIGINT, _forward_to_jax)}
    else:
        _state.previous = {s: signal.signal(s, _handler) for s in HANDLED}
    try:
        yield
    finally:
        _restore()
        _state.active = False


@contextlib.contextmanager
def training_loop() -> Iterator[None]:
    """Marks a training loop: a signal now waits for the end of the current step."""
    if not _state.active:
        yield
        return
    _state.in_loop = True
    try:
        yield
    finally:
        _state.in_loop = False


def stop_now(step: int) -> int | None:
    """The signal to stop for after `step` (the same answer on every process), or None.

    Must be called after every step by every process (JAX's preemption sync point).
    """
    if not _state.active:
        return None
    if _multi_process():
        from jax.experimental import multihost_utils  # noqa: PLC0415

        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is disabled
            return None
        return (_state.received or signal.SIGTERM) if reached else None
    return _state.received


def pending() -> int | None:
    """A signal received in a training loop that has ended without stopping for it (one
    process; on several, JAX's service keeps a notice for the next sync point)."""
    if not _state.active or _multi_process():
        return None
    return _state.received


def stopped_message(signum: int, step: int, directory: Any) -> str:
    return (f"stopped by {signal_name(signum)} after step {step}: its checkpoint is saved in "
            f"{directory}; run the same command again to resume from it")
