"""Imports a backbone trained by the PyTorch reference code into a vcp-jax checkpoint.

    python -m vcp_jax.convert_torch --arch r3d --checkpoint best_model_188.pt --out ~/runs/r3d_pt

reads a `torch.save` file of [U] `BestJuly/VCP` or [V] `xudejing/video-clip-order-prediction`:
a bare backbone (`C3D`, `R3DNet`, `R2Plus1DNet`), a backbone with its classifier (`linear.*`),
or the VCP / VCOP wrapper (`base_network.*` plus the head `fc.*`, or `fc7.*` and `fc8.*`); the
state dict may be wrapped in `{'state_dict': ...}` and its keys prefixed by `module.`
(`nn.DataParallel`). The output is a checkpoint that fine-tuning, retrieval and the probe take
as `init_from=DIR` (they read its backbone). A VCP or VCOP wrapper's head is imported with it,
as the `head` subtree of `models.VCPModel` (`head/fc`) or `vcop.VCOPModel` (`head/fc7`,
`head/fc8`), so a VCOP model trained by [V] continues pretraining or is evaluated in vcp-jax
(`load_head`); other heads (the classifier's `linear`, `VCOPN_RNN`'s `lstm` / `gru` and its
`fc`) are dropped and listed on the console. `num_batches_tracked` is ignored. The width is
read from the checkpoint. `--modality res` records that the model was trained on residual
frames ([U]'s `--modality res` / `VCOPN(res=True)`), so every stage feeds it the same input
(`vcp_jax.modality`); the default is RGB.

Layouts: conv weights OIDHW -> DHWIO (`nnx.Conv`'s kernel), BatchNorm `weight`, `bias`,
`running_mean`, `running_var` -> `scale`, `bias`, `mean`, `var`. The key table is derived from
the vcp-jax model itself (`nnx.eval_shape` of `models.create_backbone`), so a key the model does
not have, a key the checkpoint lacks, or a shape that differs is an error that names the key.

torch is needed by this command only, and its CPU build is enough (`pip install torch --index-url
https://download.pytorch.org/whl/cpu`: a plain `pip install torch` on Linux pulls the CUDA build
and several GB of NVIDIA libraries); nothing else in vcp-jax imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, models
from vcp_jax import modality as modality_lib
from vcp_jax.config_utils import UserError

# Top-level modules of the reference heads: [U]'s VCPN (`fc`), [V]'s VCOPN (`fc7`, `fc8`; both
# imported) and VCOPN_RNN (`lstm` / `gru` and `fc`: dropped), and the classifier inside the
# backbone classes (`with_classifier=True`: dropped).
WRAPPER_HEADS = ("fc", "fc7", "fc8", "lstm", "gru")
VCOP_HEAD = ("fc7", "fc8")
VCP_HEAD = ("fc",)
HEAD = "head"  # the head's subtree in `VCPModel` and `VCOPModel`
CLASSIFIER_HEADS = ("linear",)
WRAPPER_PREFIX = "base_network."
DATA_PARALLEL_PREFIX = "module."
IGNORED_SUFFIX = "num_batches_tracked"

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_RESNET_MODULES = {"downsample_conv": "downsampleconv", "downsample_bn": "downsamplebn",
                   "spatial": "spatial_conv", "temporal": "temporal_conv"}
# A key that only one reference architecture has, to say which one a checkpoint holds.
_SIGNATURES = {"c3d": "conv3a.weight", "r3d": "conv1.temporal_spatial_conv.weight",
               "r21d": "conv1.spatial_conv.weight"}


class ConversionError(UserError):
    """The checkpoint does not fit the architecture; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One backbone variable: its vcp-jax path ('layers/1/0/bn1/mean'), collection and shape."""

    path: str
    collection: str  # 'params' or 'batch_stats'
    shape: tuple[int, ...]  # vcp-jax layout (DHWIO kernels)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return to_torch_layout_shape(self.shape)


def torch_key(arch: str, path: str) -> str:
    """The reference's state-dict key of the vcp-jax backbone variable at `path`.

    C3D: 'conv3a/conv/kernel' -> 'conv3a.weight', 'conv3a/bn/mean' -> 'bn3a.running_mean'.
    R3D: 'layers/1/0/downsample_conv/kernel' -> 'conv3.block1.downsampleconv.
    temporal_spatial_conv.weight'. R(2+1)D: 'conv1/spatial/kernel' -> 'conv1.spatial_conv.weight'.
    Block j > 0 of a stage is the reference's `blocks.{j-1}` (block 0 is `block1`).
    """
    *modules, leaf = path.split("/")
    if arch == "c3d":
        unit, part = modules  # ('conv3a', 'conv' | 'bn')
        return f"{unit if part == 'conv' else 'bn' + unit[len('conv'):]}.{_LEAF[leaf]}"
    out = []
    if modules[0] == "layers":
        stage, block = int(modules[1]), int(modules[2])
        out += [f"conv{stage + 2}", "block1" if block == 0 else f"blocks.{block - 1}"]
        modules = modules[3:]
    out += [_RESNET_MODULES.get(m, m) for m in modules]
    if arch == "r3d" and modules[-1] in ("conv1", "conv2", "downsample_conv"):
        out.append("temporal_spatial_conv")  # R3D's conv wrapper around one nn.Conv3d
    return ".".join([*out, _LEAF[leaf]])


@functools.cache
def key_table(arch: str, width: int) -> dict[str, Entry]:
    """`{torch key: Entry}` for every variable of vcp-jax's `arch` backbone at `width`.

    Built from the model's abstract shapes (nothing is allocated), so it follows the model.
    """
    if arch not in models.ARCHS:
        raise ConversionError(f"unknown arch {arch!r}; expected one of {models.ARCHS}")
    abstract = nnx.eval_shape(lambda: models.create_backbone(arch, rngs=nnx.Rngs(0), width=width))
    table = {}
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        pure = nnx.state(abstract, kind).to_pure_dict()
        for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
            flat = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            table[torch_key(arch, flat)] = Entry(flat, collection, tuple(leaf.shape))
    return table


def to_jax_layout(value: np.ndarray) -> np.ndarray:
    """A conv weight OIDHW -> DHWIO; vectors unchanged."""
    return np.transpose(value, (2, 3, 4, 1, 0)) if value.ndim == 5 else value


def to_torch_layout_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The inverse of `to_jax_layout` on a shape: DHWIO -> OIDHW."""
    shape = tuple(shape)
    return (shape[4], shape[3], *shape[:3]) if len(shape) == 5 else shape


@dataclasses.dataclass(frozen=True)
class Converted:
    """A converted backbone: nested pure dicts as `nnx.state(...).to_pure_dict()` gives them."""

    arch: str
    width: int
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    dropped: tuple[str, ...]  # head keys not imported, as named in the checkpoint
    wrapper: bool  # the checkpoint was a VCP / VCOP model (`base_network.` keys)
    # The imported head: 'vcop' ({'fc7': {'kernel', 'bias'}, 'fc8': ...}, `vcop.VCOPHead`) or
    # 'vcp' ({'fc': ...}, `models.VCPHead`), kernels (in, out); None without one.
    pretext: str | None = None
    head: dict[str, Any] | None = None
    num_clips: int | None = None  # clips per tuple the head reads (from its shapes)
    num_classes: int | None = None  # the head's output width

    def model_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(params, batch_stats) of the whole `VCPModel` / `VCOPModel` as nested pure dicts
        (`nnx.state(model, nnx.Param).to_pure_dict()`'s layout): backbone plus head."""
        params = {backbone_lib.BACKBONE: self.params}
        if self.head is not None:
            params[HEAD] = self.head
        return params, {backbone_lib.BACKBONE: self.batch_stats}


def _strip_data_parallel(key: str) -> str:
    while key.startswith(DATA_PARALLEL_PREFIX):
        key = key[len(DATA_PARALLEL_PREFIX):]
    return key


def _guess_arch(keys: Sequence[str]) -> str | None:
    found = [arch for arch, signature in _SIGNATURES.items() if signature in keys]
    return found[0] if len(found) == 1 else None


def _list(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def convert_state_dict(arch: str, state_dict: Mapping[str, Any], *, source: str = "the checkpoint"
                       ) -> Converted:
    """The vcp-jax backbone of a reference state dict (`{key: tensor or array}`).

    Raises `ConversionError` naming every unknown key, every missing key, and the first shape
    that does not fit (both shapes in PyTorch's layout). Keys are named as the file spells them.
    """
    if arch not in models.ARCHS:
        raise ConversionError(f"unknown arch {arch!r}; expected one of {models.ARCHS}")
    wrapper = any(_strip_data_parallel(k).startswith(WRAPPER_PREFIX) for k in state_dict)
    backbone: dict[str, str] = {}  # backbone key ('conv1.weight') -> the file's key
    heads: dict[str, str] = {}  # head key ('fc7.weight') -> the file's key
    dropped, unknown = [], []
    for original in state_dict:
        key = _strip_data_parallel(original)
        if wrapper:
            if not key.startswith(WRAPPER_PREFIX):
                if key.split(".")[0] in WRAPPER_HEADS:
                    heads[key] = original
                else:
                    unknown.append(original)
                continue
            key = _strip_data_parallel(key[len(WRAPPER_PREFIX):])
        if key.split(".")[0] in CLASSIFIER_HEADS:
            dropped.append(original)
        elif not key.endswith(IGNORED_SUFFIX):
            backbone[key] = original

    if "bn1.weight" not in backbone:
        raise ConversionError(
            f"{source} has no backbone key 'bn1.weight' (every reference backbone has it); "
            f"its keys: {_list(list(state_dict))}"
        )
    width = int(np.shape(state_dict[backbone["bn1.weight"]])[0])
    table = key_table(arch, width)
    unknown += [original for key, original in backbone.items() if key not in table]
    missing = [key for key in table if key not in backbone]
    if unknown or missing:
        guess = _guess_arch(list(backbone))
        hint = (f" (its keys are those of a {guess} backbone: use --arch {guess})"
                if guess not in (None, arch) else "")
        prefix = WRAPPER_PREFIX if wrapper else ""
        raise ConversionError(
            f"{source} does not fit the {arch} backbone of width {width}{hint}: "
            + "; ".join(filter(None, [
                f"unknown keys {_list(unknown)}" if unknown else "",
                f"missing keys {_list([prefix + k for k in missing])}" if missing else "",
            ]))
        )

    flat: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, entry in table.items():
        value = _to_numpy(state_dict[backbone[key]])
        if tuple(value.shape) != entry.torch_shape:
            raise ConversionError(
                f"{source}: {backbone[key]!r} has shape {tuple(value.shape)}, the {arch} backbone "
                f"of width {width} expects {entry.torch_shape}"
            )
        flat[entry.collection][entry.path] = to_jax_layout(value).astype(np.float32)
    head = _convert_head(heads, state_dict, num_features=8 * width, source=source)
    if head is None:
        dropped += heads.values()
    return Converted(
        arch=arch,
        width=width,
        params=nest(flat["params"]),
        batch_stats=nest(flat["batch_stats"]),
        dropped=tuple(sorted(dropped)),
        wrapper=wrapper,
        **(head or {}),
    )


def _convert_head(heads: Mapping[str, str], state_dict: Mapping[str, Any], *, num_features: int,
                  source: str) -> dict[str, Any] | None:
    """The VCOP (`fc7`, `fc8`) or VCP (`fc`) head in vcp-jax's layout, with the tuple length
    and class count its shapes imply; None for any other head (dropped)."""
    modules = {k.split(".")[0] for k in heads}
    if modules == set(VCOP_HEAD):
        pretext = "vcop"
    elif modules == set(VCP_HEAD):
        pretext = "vcp"
    else:
        return None
    expected = {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")}
    if set(heads) != expected:
        raise ConversionError(
            f"{source}: the {pretext.upper()} head needs the keys {_list(list(expected))}; it "
            f"has {_list(list(heads))}")
    values = {k: _to_numpy(state_dict[heads[k]]) for k in expected}
    for name in modules:
        w, b = values[f"{name}.weight"], values[f"{name}.bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ConversionError(
                f"{source}: {heads[name + '.weight']!r} {tuple(w.shape)} and "
                f"{heads[name + '.bias']!r} {tuple(b.shape)} are not a linear layer's")
    head = {name: {"kernel": values[f"{name}.weight"].T.astype(np.float32).copy(),
                   "bias": values[f"{name}.bias"].astype(np.float32).copy()} for name in modules}
    if pretext == "vcp":
        classes, inputs = values["fc.weight"].shape
        num_clips, rest = divmod(inputs, num_features)
        if rest or num_clips < 1:
            raise ConversionError(
                f"{source}: {heads['fc.weight']!r} reads {inputs} features, not a multiple of "
                f"the backbone's {num_features}")
        return {"pretext": pretext, "head": head, "num_clips": num_clips, "num_classes": classes}
    hidden, pair_inputs = values["fc7.weight"].shape
    classes, inputs = values["fc8.weight"].shape
    if pair_inputs != 2 * num_features:
        raise ConversionError(
            f"{source}: {heads['fc7.weight']!r} reads {pair_inputs} features; a pair of the "
            f"backbone's clip features is {2 * num_features}")
    num_clips = next((n for n in range(2, 8) if math.factorial(n) == classes), None)
    if num_clips is None or inputs != hidden * num_clips * (num_clips - 1) // 2:
        raise ConversionError(
            f"{source}: {heads['fc8.weight']!r} has shape {(classes, inputs)}; a VCOP head over "
            f"n clips has n! outputs and {hidden} x n(n-1)/2 inputs")
    return {"pretext": pretext, "head": head, "num_clips": num_clips, "num_classes": classes}


def nest(flat: Mapping[str, np.ndarray]) -> dict[Any, Any]:
    """`{'layers/0/1/bn1/mean': x}` -> `{'layers': {0: {1: {'bn1': {'mean': x}}}}}`.

    Digit keys become ints, as in `nnx.state(...).to_pure_dict()` of an `nnx.List`.
    """
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        *parents, leaf = (int(p) if p.isdigit() else p for p in path.split("/"))
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _to_numpy(value: Any) -> np.ndarray:
    """A copy: a state dict's tensors share memory with a live model, which may train on."""
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu().float().numpy()
    return np.array(value)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """The state dict in a `torch.save` file: bare, or under 'state_dict' / 'model_state_dict'.

    Loaded with `weights_only=True` (tensors and plain containers; no code runs).
    """
    try:
        import torch  # noqa: PLC0415 - optional dependency, this command only
    except ImportError:
        raise UserError("convert_torch needs PyTorch, the CPU build is enough: pip install torch "
                        "--index-url https://download.pytorch.org/whl/cpu") from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"--checkpoint {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
        raise ConversionError(f"cannot read {path} as a torch.save file: {e}") from e
    while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model_state_dict") if k in obj), None)
        if inner is None:
            raise ConversionError(
                f"{path} holds no state dict: a dict with the keys {_list(list(obj))} and no "
                "'state_dict' or 'model_state_dict' entry"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def convert(arch: str, checkpoint: str | Path, out: str | Path, *, modality: str = "rgb"
            ) -> tuple[Converted, Path]:
    """Converts the file `checkpoint` and writes the checkpoint (backbone, and a VCP / VCOP head
    if it has one) into the folder `out`. `modality`: what the model was trained on, 'rgb' or
    'res' (recorded with the head's residual formula, `modality.default_formula`).

    Returns the conversion and the step folder written.
    """
    if modality not in modality_lib.MODALITIES:
        raise ConversionError(f"--modality {modality!r}: choose one of {modality_lib.MODALITIES}")
    converted = convert_state_dict(arch, load_state_dict(checkpoint), source=str(checkpoint))
    params, batch_stats = converted.model_state()
    # A NaN weight (a diverged PyTorch run) would make every stage built on it meaningless.
    backbone_lib.check_finite_backbone(
        {"params": params, "batch_stats": batch_stats}, str(checkpoint),
        prefix="--checkpoint", hint="the PyTorch run that saved it diverged; convert an "
                                    "earlier checkpoint")
    input_modality = modality_lib.InputModality(
        modality, modality_lib.default_formula(converted.pretext or "vcp"))
    config: dict[str, Any] = {
        "model": {"arch": arch, "width": converted.width, **input_modality.to_config()},
        "task": "convert_torch", "source": str(Path(checkpoint).expanduser().absolute())}
    if converted.head is not None:
        config["pretext"] = converted.pretext
        config["head"] = {"num_clips": converted.num_clips, "num_classes": converted.num_classes}
    return converted, save_checkpoint(out, params=params, batch_stats=batch_stats, config=config)


def save_checkpoint(out: str | Path, *, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """`backbone.save_backbone`, with the model's other parameter subtrees (a head) saved beside
    the backbone: `params` / `batch_stats` are the whole model's nested pure dicts. Stages that
    start from it read the backbone alone (`load_backbone`, a partial restore), `load_head`
    the head. Returns the step folder."""
    return backbone_lib.save_model(out, params=params, batch_stats=batch_stats, config=config)


def load_head(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head a checkpoint holds beside its backbone, and the checkpoint's config.

    `path` as `init_from` takes it (a workdir, its `checkpoints/` folder or a step folder).
    Returns (`{'fc7': {'kernel': (in, out), 'bias': (out,)}, 'fc8': ...}` for VCOP, or
    `{'fc': ...}` for VCP, the stored config); the config's `pretext` and `head` say which and
    for how many clips. Raises `ConversionError` when the checkpoint has no head.
    """
    step_dir, _ = backbone_lib.find_checkpoint(path)
    config = checkpointing.read_config(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(step_dir / "state").item_metadata.tree
    except Exception as e:  # noqa: BLE001 - no or unreadable metadata: a damaged checkpoint
        raise ConversionError(f"cannot read the checkpoint {step_dir}: {e}") from None
    if HEAD not in (metadata.get("params") or {}):
        raise ConversionError(
            f"the checkpoint {step_dir} holds no head (its parameters: "
            f"{_list([str(k) for k in metadata.get('params') or {}])}); it was converted "
            "from a bare backbone or saved by a stage that keeps none")
    target = {"params": {HEAD: metadata["params"][HEAD]}}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), target)
    restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
        partial_restore=True))
    flat = backbone_lib.flatten(restored["params"][HEAD])
    return nest({k.removesuffix("/value"): v for k, v in flat.items()}), config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vcp_jax.convert_torch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", required=True, choices=models.ARCHS)
    parser.add_argument("--checkpoint", required=True, help="a torch.save file (.pt / .pth)")
    parser.add_argument("--out", required=True, help="the folder to write (init_from=OUT)")
    parser.add_argument("--modality", default="rgb", choices=modality_lib.MODALITIES,
                        help="what the model was trained on: RGB clips, or residual frames "
                             "(the reference's --modality res / VCOPN(res=True))")
    args = parser.parse_args(argv)
    if (Path(args.out).expanduser() / checkpointing.CHECKPOINTS_DIR).exists():
        print(f"error: {args.out} already holds checkpoints; choose a new --out", file=sys.stderr)
        return 2
    try:
        converted, step_dir = convert(args.arch, args.checkpoint, args.out,
                                      modality=args.modality)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(converted.params))
    kind = "VCP/VCOP model" if converted.wrapper else "backbone"
    print(f"converted the {kind} in {args.checkpoint}: {args.arch} width {converted.width}, "
          f"{n:,} parameters, {args.modality} input")
    if converted.head is not None:
        keys = ", ".join(f"{m}.{leaf}" for m in sorted(converted.head) for leaf in ("bias",
                                                                                   "weight"))
        print(f"imported the {converted.pretext.upper()} head ({keys}: "
              f"{converted.num_clips} clips, {converted.num_classes} classes) as head/")
    if converted.dropped:
        print(f"dropped (heads): {', '.join(converted.dropped)}")
    print(f"wrote {step_dir}; use it with init_from={Path(args.out).expanduser().absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
