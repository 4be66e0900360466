"""The input modality of a backbone: RGB clips, or residual frames as the reference code makes them.

`model.modality` is 'rgb' (the clip as it is, pixels in [0, 1]) or 'res' (frame differences,
docs/method.md §9). [U] `BestJuly/VCP` computes the residual inside the network, on the device,
from the `(B, C, T, H, W)` clip, and with a different formula for each head:

- 'vcp' ([U] `models/vcopn.py`, `VCPN.diff`, used by `train_vcp.py --modality res` after the
  cloze, `preprocess`, and by `ft_classify.py`, `train_classify.py` and `retrieve_clips.py`)::

      shift_x = torch.roll(x, 1, 2)
      return ((shift_x - x) + 1)/2

  i.e. `r[t] = (x[t-1] - x[t] + 1) / 2` in [0, 1], the previous frame minus the current one;
- 'vcop' ([U] `models/vcopn.py`, `VCOPN.forward` with `res=True`; [V]'s VCOPN has no residual)::

      shift_clip = torch.roll(clip, 1, 2)
      f.append(self.base_network(clip - shift_clip))

  i.e. `r[t] = x[t] - x[t-1]` in [-1, 1], the current frame minus the previous one.

`torch.roll(x, 1, 2)` wraps around: frame 0's "previous" frame is the clip's last frame, so the
first residual frame differs the whole clip (`x[T-1]` vs `x[0]`), not two neighbours. That is the
reference (`edge='roll'`, the default). `edge='extra_frame'` is the deviation without the
wrap-around: the input pipeline loads `T + 1` frames, the one before the clip first, and
`r[t] = f(y[t], y[t+1])` over those (`y[1:]` is the clip): every residual frame is the difference
of two neighbours, and frames 1..T-1 equal the reference's.

Everything here is pure `jnp` on channels-last frames `(..., T, H, W, C)` (a clip `(B, T, H, W,
C)`, a tuple batch `(B, N, T, H, W, C)`, test clips `(B, K, T, H, W, C)`; time is axis -4), so
it runs inside a jitted or pmapped step, after `to_input` (uint8 -> [0, 1]) and, for VCP, after
the cloze. The formula a backbone was trained with is recorded in its checkpoint's config
(`model.modality`, `model.residual_formula`, `model.residual_edge`) and downstream stages apply
the same one (`from_checkpoint_config`, `check_backbone_modality`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vcp_jax import config_utils

MODALITIES: tuple[str, ...] = ("rgb", "res")
"""`model.modality`: the clip itself, or its residual frames."""

FORMULAS: tuple[str, ...] = ("vcp", "vcop")
"""`model.residual_formula`: [U]'s VCPN `(roll(x, 1, T) - x + 1) / 2`, or its VCOPN
`x - roll(x, 1, T)`. The default is the pretext's own (`default_formula`)."""

EDGES: tuple[str, ...] = ("roll", "extra_frame")
"""`model.residual_edge`: 'roll' (the reference: frame 0 differs with the clip's last frame) or
'extra_frame' (a deviation: T + 1 frames are loaded, no wrap-around)."""

TIME_AXIS = -4  # (..., T, H, W, C)


# ----------------------------------------------------------------------------- the formulas


def _vcp(previous: jax.Array, current: jax.Array) -> jax.Array:
    return ((previous - current) + 1) / 2  # [U] VCPN.diff: ((shift_x - x) + 1)/2


def _vcop(previous: jax.Array, current: jax.Array) -> jax.Array:
    return current - previous  # [U] VCOPN: clip - shift_clip


_FORMULA_FNS = {"vcp": _vcp, "vcop": _vcop}


def residual(x: jax.Array, formula: str = "vcp") -> jax.Array:
    """The reference's residual frames of `x` `(..., T, H, W, C)`, same shape, with wrap-around.

    'vcp': `(roll(x, 1, T) - x + 1) / 2`; 'vcop': `x - roll(x, 1, T)` (`jnp.roll` is
    `torch.roll`: `roll(x, 1, T)[t] = x[t - 1]`, and `x[-1]` for t = 0).
    """
    _check_formula(formula)
    x = jnp.asarray(x)
    return _FORMULA_FNS[formula](jnp.roll(x, 1, axis=TIME_AXIS), x)


def residual_extra_frame(y: jax.Array, formula: str = "vcp") -> jax.Array:
    """Residual frames without wrap-around, from `T + 1` frames `(..., T + 1, H, W, C)` -> `(..., T,
    H, W, C)`: `r[t] = f(y[t], y[t + 1])` (previous, current), `y[0]` the frame before the clip.

    'vcp': `(y[:-1] - y[1:] + 1) / 2`; 'vcop': `y[1:] - y[:-1]`. A deviation (docs/method.md §9).
    """
    _check_formula(formula)
    y = jnp.asarray(y)
    if y.ndim < 4 or y.shape[TIME_AXIS] < 2:
        raise ValueError(f"residual_extra_frame needs (..., T + 1, H, W, C) with T >= 1; "
                         f"got {y.shape}")
    t1 = y.shape[TIME_AXIS]
    previous = jax.lax.slice_in_dim(y, 0, t1 - 1, axis=y.ndim + TIME_AXIS)
    current = jax.lax.slice_in_dim(y, 1, t1, axis=y.ndim + TIME_AXIS)
    return _FORMULA_FNS[formula](previous, current)


def _check_formula(formula: str) -> None:
    if formula not in FORMULAS:
        raise ValueError(f"residual formula {formula!r}: allowed values are {FORMULAS}")


# ----------------------------------------------------------------------------- the modality


@dataclasses.dataclass(frozen=True)
class InputModality:
    """What the backbone reads: hashable, so a jitted step can close over it (static).

    `modality` 'rgb' | 'res'; `formula` 'vcp' | 'vcop' and `edge` 'roll' | 'extra_frame' only
    matter for 'res'.
    """

    modality: str = "rgb"
    formula: str = "vcp"
    edge: str = "roll"

    def __post_init__(self) -> None:
        for name, value, allowed in (("modality", self.modality, MODALITIES),
                                     ("formula", self.formula, FORMULAS),
                                     ("edge", self.edge, EDGES)):
            if value not in allowed:
                raise ValueError(f"InputModality {name}={value!r}: allowed values are {allowed}")

    @property
    def is_residual(self) -> bool:
        return self.modality == "res"

    def frames_needed(self, clip_len: int) -> int:
        """Frames the input pipeline loads per clip: `clip_len + 1` for 'res' with
        'extra_frame' (the frame before the clip first), `clip_len` otherwise."""
        return clip_len + 1 if self.is_residual and self.edge == "extra_frame" else clip_len

    def __call__(self, x: jax.Array) -> jax.Array:
        """Frames in [0, 1], `(..., frames_needed(T), H, W, C)` -> backbone input `(..., T, H, W,
        C)` (RGB: unchanged)."""
        x = jnp.asarray(x)
        if not self.is_residual:
            return x
        if self.edge == "extra_frame":
            return residual_extra_frame(x, self.formula)
        return residual(x, self.formula)

    def to_config(self) -> dict[str, str]:
        """The `model.*` keys a checkpoint's config records."""
        return {"modality": self.modality, "residual_formula": self.formula,
                "residual_edge": self.edge}

    def describe(self) -> str:
        if not self.is_residual:
            return "RGB frames"
        formula = {"vcp": "(roll(x, 1, T) - x + 1) / 2, [U]'s VCP",
                   "vcop": "x - roll(x, 1, T), [U]'s VCOP"}[self.formula]
        edge = ("" if self.edge == "roll"
                else ", from T + 1 frames without wrap-around (extra_frame)")
        return f"residual frames ({formula}{edge})"


RGB = InputModality()
"""The frames as they are: every stage's input unless `model.modality` says otherwise."""


def default_formula(pretext: str) -> str:
    """The residual formula the reference uses with a pretext's head: 'vcop' for VCOP, 'vcp' for
    VCP and for everything [U] trains without a pretext (fine-tuning, retrieval from scratch)."""
    return "vcop" if pretext == "vcop" else "vcp"


# ----------------------------------------------------------------------------- configs


def validate(config: ml_collections.ConfigDict, *, allow_unset: bool = False) -> None:
    """Raises `ConfigError` naming the key and its allowed values for a bad `model.modality`,
    `model.residual_formula` or `model.residual_edge` (the last two may be absent or None: the
    pretext's formula, 'roll'). With `allow_unset`, `model.modality` may be None too (a stage
    that takes it from its `init_from` checkpoint)."""
    model = config_utils.get(config, "model")
    value = model.get("modality")
    if not (allow_unset and value is None):
        config_utils.check_choice(config, "model.modality", MODALITIES)
    for key, allowed in (("residual_formula", FORMULAS), ("residual_edge", EDGES)):
        if model.get(key) is not None:
            config_utils.check_choice(config, f"model.{key}", allowed)


def from_config(config: ml_collections.ConfigDict, pretext: str = "vcp") -> InputModality:
    """The modality a config asks for (`validate` first); unset formula: the pretext's."""
    validate(config)
    model = config.model
    return InputModality(
        modality=model.modality,
        formula=model.get("residual_formula") or default_formula(pretext),
        edge=model.get("residual_edge") or "roll",
    )


def from_checkpoint_config(stored: Mapping[str, Any]) -> InputModality:
    """The modality recorded in a checkpoint's config (a plain dict, `read_config`'s).

    Checkpoints written before the key existed, and converted RGB models, hold no
    `model.modality`: they are RGB. A missing formula is the recorded pretext's
    (`stored['pretext']`, else VCP's).
    """
    model = stored.get("model") or {}
    modality = model.get("modality") or "rgb"
    formula = model.get("residual_formula") or default_formula(str(stored.get("pretext", "vcp")))
    return InputModality(modality, formula, model.get("residual_edge") or "roll")


class ModalityMismatchError(config_utils.ConfigError):
    """The config's modality is not the one the `init_from` backbone was trained with."""


def check_backbone_modality(
    recorded: InputModality,
    requested: InputModality | None,
    *,
    force: bool = False,
    source: str = "the init_from checkpoint",
    force_key: str = "config.force_modality",
) -> InputModality:
    """The modality a stage starting from a backbone must use.

    `recorded`: the backbone's (`from_checkpoint_config`); `requested`: the config's, or None
    to take the recorded one. A difference is refused with a `ModalityMismatchError` that says
    both and how to proceed, unless `force` (then `requested` is used: the caller says so).
    """
    if requested is None or requested == recorded:
        return recorded
    if force:
        return requested
    fix = (f"set config.model.modality={recorded.modality!r}"
           + (f", config.model.residual_formula={recorded.formula!r}, config.model.residual_edge="
              f"{recorded.edge!r}" if recorded.is_residual else "")
           + " (or leave config.model.modality unset to take the checkpoint's)")
    raise ModalityMismatchError(
        f"{source} holds a backbone trained on {recorded.describe()}, but the config asks for "
        f"{requested.describe()}: its features would not mean what they were trained to mean. "
        f"To use the backbone as trained, {fix}; to use it on the other input anyway, set "
        f"{force_key}=True")
