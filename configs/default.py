"""The VCP pretraining recipe of the reference code ([U], docs/method.md §3) on UCF101 split 1.

Other configs import this one and override a few fields; the command line overrides single
fields: `python main.py --config configs/pretrain_r3d.py --config.batch_size=64`.
"""

import ml_collections

from vcp_jax import cloze


def get_config(arch: str = "r3d") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "pretrain"  # the stage main.py runs: pretrain, finetune, retrieval, probe, demo
    config.seed = 0  # parameter init, data order and cloze draws (same seed, same run)
    # The pretext task of pretraining: 'vcp' (the video cloze, `cloze.*`) or 'vcop' (clip order
    # prediction, [V], `vcop.*`; configs/pretrain_vcop.py). Recorded in the checkpoint.
    config.pretext = "vcp"
    # A workdir (or its checkpoints/ or one step folder) whose backbone starts this run; its
    # best-validation-loss checkpoint, else the latest. Unused when the run resumes its own.
    config.init_from = ml_collections.config_dict.placeholder(str)
    # BatchNorm statistics of a frozen backbone (the probe, linear evaluation, retrieval;
    # pretraining and fine-tuning train them): 'auto' re-estimates them on training clips when
    # the backbone is random (no init_from, not resuming) and keeps a checkpoint's; 'always'
    # re-estimates them for any backbone; 'never' keeps them (a random backbone's are then the
    # initial mean 0, var 1, as in the reference code's protocol).
    config.bn_recalibration = "auto"
    config.bn_recalibration_clips = 256  # training clips the re-estimation runs on
    # A backbone from init_from trained on another input (model.modality, residual_formula,
    # residual_edge) is refused; True uses it on this config's input anyway.
    config.force_modality = False

    config.data = ml_collections.ConfigDict()
    config.data.name = "ucf101_frames"  # built with `python -m tfds_builders.build`
    # The TFDS builder config: the official fold and the stored frame size (and JPEG quality),
    # 'split1' (128x171), 'split2_64x85', 'split1_128x171_q75'. Formerly `data.config`, which
    # still works for one release, with a deprecation message.
    config.data.builder_config = "split1"
    config.data.data_dir = "~/tensorflow_datasets"  # where the built datasets are (its --data_dir)
    config.data.num_val_videos = 800  # train videos held out for validation (docs/method.md §3)
    # Fine-tuning and linear evaluation only: train on this many videos per class (None: every
    # training video), a stratified subset of those left after the validation hold-out, drawn
    # with `seed` (same seed, same videos, whatever the init). Retrieval keeps every video.
    config.data.train_videos_per_class = ml_collections.config_dict.placeholder(int)
    config.data.crop_size = 112  # square crop side: random in training, centred in evaluation
    config.data.num_threads = 16  # JPEG-decoding threads per host
    config.data.num_workers = 0  # extra grain processes (0: threads only)
    config.data.synthetic = None  # a ConfigDict here generates a synthetic dataset (see demo)

    config.cloze = cloze.default_config()  # clip_len 16, interval 8, 5 options (docs/method.md §1)

    config.model = ml_collections.ConfigDict()
    config.model.arch = arch  # 'c3d', 'r3d' or 'r21d'
    # Channels of the first stage (stages: width x 1, 2, 4, 8; feature 8 x width): 64 is the
    # paper's backbones; smaller only for CPU demos and tests.
    config.model.width = 64
    config.model.dtype = "float32"  # or 'bfloat16' (params and BN statistics stay float32)
    # BatchNorm statistics of the VCP model in training: 'per_clip' as the reference code (each
    # clip position normalised over its own B clips, running statistics updated once per
    # position), or 'pooled' over all 3B clips (a deviation; see docs/fidelity.md).
    config.model.bn_stats = "per_clip"
    # 3D convs: 'auto' runs them as 2D convs + a temporal sum on CPU (3x faster there) and as
    # XLA's native 3D convs on GPU/TPU; 'native' or 'conv2d' force one (same parameters).
    config.model.conv_impl = "auto"
    # What the backbone reads (docs/method.md §9.2): 'rgb' (the frames) or 'res' (residual
    # frames, computed on the device; for VCP after the cloze). Recorded in the checkpoint;
    # fine-tuning, retrieval and the probe take their init_from backbone's when unset (None).
    config.model.modality = "rgb"
    # The residual formula: 'vcp' ([U]'s VCPN, (roll(x, 1, T) - x + 1) / 2) or 'vcop' ([U]'s
    # VCOPN, x - roll(x, 1, T)); None: the pretext's own (filled in when a run starts).
    config.model.residual_formula = ml_collections.config_dict.placeholder(str)
    # 'roll' (the reference: frame 0 differs with the clip's last frame); 'extra_frame' (no
    # wrap-around from T + 1 loaded frames) is not wired into the stages yet. None: 'roll', or
    # the init_from backbone's (filled in when a run starts).
    config.model.residual_edge = ml_collections.config_dict.placeholder(str)

    # SGD, momentum 0.9, L2 5e-4 before momentum, lr 0.01 constant, batch 8 (docs/method.md
    # §3). With `scale_with_batch` the rate grows linearly with the global batch: 0.01 *
    # batch_size / 8 (e.g. batch 64 on 8 GPUs -> lr 0.08); add warm-up steps for large batches.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 0.01  # at base_batch_size
    config.optimizer.base_batch_size = 8  # the global batch the learning rate is given for
    config.optimizer.scale_with_batch = True  # lr x batch_size / base_batch_size
    config.optimizer.schedule = "constant"  # or 'cosine' (to zero at num_train_steps)
    config.optimizer.warmup_steps = 0  # linear warm-up from 0 over this many steps
    config.optimizer.momentum = 0.9  # SGD momentum (0: plain SGD)
    config.optimizer.weight_decay = 5e-4  # L2, added to the gradient before momentum

    config.batch_size = 8  # global, over all devices and hosts
    # 200 epochs of the 8,564 UCF101 split-1 train videos that remain after holding out 800
    # (about 1,070 steps of 8 tuples per epoch).
    config.num_train_steps = 214_000
    config.log_every_steps = 100  # training loss, accuracy and speed to TensorBoard and the bar
    config.eval_every_steps = 5_000  # validation (it picks the best checkpoint), and at the end
    config.checkpoint_every_steps = 5_000  # an Orbax checkpoint, and one at the end
    config.keep_checkpoints = 3  # plus the best-validation-loss one

    config.parallel = "jit"  # or 'pmap'
    # Training batches placed on the devices ahead of the step, so that the host-to-device copy
    # of the next batches overlaps the running step.
    config.prefetch_to_device = 2
    return config


# The tiny settings, written once: the CI demo (`demo.py:size=tiny`) and the tests' configs
# (tests/tiny_configs.py) shrink their stages with `tiny`; each then names its own dataset size
# and step counts.
TINY_WIDTH = 4  # model.width of every tiny stage
TINY_BATCH_SIZE = 8  # one clip or tuple per simulated device of the tests


def tiny(stage: ml_collections.ConfigDict, *, builder_config: str, crop_size: int,
         steps: int | None = None, every: int | None = None,
         log_every: int | None = None) -> ml_collections.ConfigDict:
    """`stage` shrunk in place for CPU tests: a width-4 backbone, batches of 8, small frames
    (`builder_config`, `crop_size`) and, when given, `steps` with an evaluation and a checkpoint
    `every` few steps. Returns `stage`."""
    stage.data.builder_config = builder_config
    stage.data.crop_size = crop_size
    stage.model.width = TINY_WIDTH
    stage.batch_size = TINY_BATCH_SIZE
    if steps is not None:
        stage.num_train_steps = steps
    if every is not None:
        stage.eval_every_steps = stage.checkpoint_every_steps = every
    if log_every is not None:
        stage.log_every_steps = log_every
    return stage
