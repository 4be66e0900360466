"""The built-in demo: does VCP pretraining beat random init? Every stage, on synthetic videos.

    python main.py --config configs/demo.py --workdir /tmp/vcp_demo     # ~14 min on 2 CPU cores
    python main.py --config configs/demo.py:size=tiny --workdir /tmp/tiny    # the CI test

No download: two synthetic motion datasets are generated as real .avi files and built with the
real builders, as self-supervised learning is used in practice: VCP pretrains on many unlabelled
videos (UCF101 layout; the labels are never read), then a classifier is fine-tuned on few
labelled videos of a second dataset (HMDB51 layout, 70/30 splits), from the VCP checkpoint and
from random init, and a linear classifier on each frozen backbone (linear evaluation). Both
backbones then go through retrieval and the VCP probe. The classes are
defined by motion only (direction, speed, rotation, orbit, oscillation, zoom of randomly
textured objects): no single frame tells them apart.

Each stage runs in its own sub-workdir and a killed demo resumes stage by stage; the comparison
table goes to the console and to `<workdir>/report.md` with the plots.
"""

import ml_collections

from configs import finetune as finetune_config
from configs import pretrain_synthetic, probe, retrieval

SIZES = ("full", "tiny")


def get_config(args: str = "") -> ml_collections.ConfigDict:
    kwargs = finetune_config.parse_args(args)
    if set(kwargs) - {"size"}:
        raise ValueError(f"unknown config arguments {sorted(set(kwargs) - {'size'})}; use size")
    size = kwargs.get("size", "full")
    if size not in SIZES:
        raise ValueError(f"size={size!r}: choose one of {SIZES}")

    config = ml_collections.ConfigDict()
    config.task = "demo"
    config.seed = 0  # one seed for every stage (data order, init, cloze draws)
    # Generated videos and built datasets, reused across runs; "{cache}" in the stages' paths.
    config.cache_dir = "~/.cache/vcp_jax/demo" + ("" if size == "full" else "_tiny")

    # --- VCP pretraining on the unlabelled videos -------------------------------------------
    pre = pretrain_synthetic.get_config()
    pre.data.data_dir = "{cache}/tensorflow_datasets"
    pre.data.synthetic.manual_dir = "{cache}/videos_pretrain"
    config.pretrain = pre

    # --- fine-tuning on the few labelled videos, from VCP and from random init --------------
    ft = finetune_config.get_config("dataset=hmdb51,fold=1,arch=r3d")
    ft.model.width = pre.model.width
    ft.data.data_dir = pre.data.data_dir
    ft.data.config = pre.data.config  # same frame size as pretraining
    ft.data.crop_size = pre.data.crop_size
    ft.data.num_threads = pre.data.num_threads
    ft.data.num_val_videos = 10  # of 70 train videos, to pick the checkpoint
    ft.data.synthetic = ml_collections.ConfigDict(pre.data.synthetic.to_dict())
    ft.data.synthetic.manual_dir = "{cache}/videos_finetune"
    ft.data.synthetic.layout = "hmdb51"
    ft.data.synthetic.videos_per_class = 12  # 7 train + 3 test + 2 unused per class (70/30)
    ft.data.synthetic.seed = 1  # other videos than pretraining's
    ft.finetune.test_batch_size = 8
    ft.optimizer.learning_rate = 0.01
    ft.optimizer.schedule = "cosine"
    ft.batch_size = 16
    ft.num_train_steps = 150
    ft.eval_every_steps = 25
    ft.checkpoint_every_steps = 25
    ft.log_every_steps = 5
    config.finetune = ft

    # --- retrieval and the VCP probe, for both backbones ------------------------------------
    ret = retrieval.get_config("dataset=hmdb51,arch=r3d")
    ret.model.width = pre.model.width
    ret.data = ml_collections.ConfigDict(ft.data.to_dict())
    ret.batch_size = 8
    config.retrieval = ret

    pr = probe.get_config("arch=r3d")
    pr.model.width = pre.model.width
    pr.data = ml_collections.ConfigDict(pre.data.to_dict())
    pr.cloze = ml_collections.ConfigDict(pre.cloze.to_dict())
    pr.batch_size = pre.batch_size
    pr.num_train_steps = 100
    pr.eval_every_steps = 50
    pr.checkpoint_every_steps = 50
    pr.log_every_steps = 10
    config.probe = pr

    if size == "tiny":
        _shrink(config)
    config.linear = _linear(config.finetune, tiny=size == "tiny")
    return config


def _linear(ft: ml_collections.ConfigDict, *, tiny: bool) -> ml_collections.ConfigDict:
    """Linear evaluation: the fine-tuning stage (same videos and test) with a frozen backbone.

    Derived from the final fine-tuning config; the demo gives it fine-tuning's data and test
    protocol again (`demo.stage_configs`), so only the optimiser and the steps are its own.
    """
    lin = ml_collections.ConfigDict(ft.to_dict())
    lin.finetune.freeze_backbone = True  # only the new Dense head trains
    # A linear head on fixed features learns with a larger rate than a whole network.
    lin.optimizer.learning_rate = 10 * ft.optimizer.learning_rate
    lin.num_train_steps = 4 if tiny else 100
    lin.eval_every_steps = 2 if tiny else 25
    lin.checkpoint_every_steps = lin.eval_every_steps
    return lin


def _shrink(config: ml_collections.ConfigDict) -> None:
    """The CI setting: the same stages on fewer, smaller videos and a few steps each."""
    for stage in (config.pretrain, config.finetune, config.retrieval, config.probe):
        stage.data.config = "split1_32x43"
        stage.data.crop_size = 24
        stage.model.width = 4
    for stage in (config.pretrain, config.probe):
        stage.cloze.clip_len = 8
        stage.cloze.interval = 4
        stage.cloze.remote_gap = 8
        stage.data.num_val_videos = 8
        stage.data.synthetic.num_classes = 4
        stage.data.synthetic.videos_per_class = 8
        stage.data.synthetic.num_frames = 64
        stage.batch_size = 8
    for stage in (config.finetune, config.retrieval):
        stage.data.synthetic.num_classes = 4
        stage.data.synthetic.num_frames = 40
    for stage in (config.pretrain, config.finetune, config.retrieval, config.probe):
        stage.data.synthetic.height = 32
        stage.data.synthetic.width = 48
    config.finetune.finetune.clip_len = 8
    config.finetune.finetune.num_test_clips = 4
    config.finetune.data.num_val_videos = 4
    config.retrieval.retrieval.num_clips = 4
    config.pretrain.num_train_steps = 6
    config.pretrain.eval_every_steps = 3
    config.pretrain.checkpoint_every_steps = 3
    config.finetune.num_train_steps = 4
    config.finetune.eval_every_steps = 2
    config.finetune.checkpoint_every_steps = 2
    config.finetune.batch_size = 8
    config.probe.num_train_steps = 4
    config.probe.eval_every_steps = 2
    config.probe.checkpoint_every_steps = 2
