"""Video retrieval (VCOP's protocol, docs/method.md §4.2): split-1 test videos against train videos.

    python main.py --config configs/retrieval.py:dataset=ucf101 \
        --config.init_from=~/runs/vcp_r3d --workdir ~/runs/vcp_r3d_retrieval_ucf101
    python main.py --config configs/retrieval.py:dataset=hmdb51,arch=r3d \
        --workdir ~/runs/random_r3d_retrieval_hmdb51   # random-init baseline

Arguments (big_vision style, comma-separated): `dataset` (ucf101 | hmdb51, default ucf101),
`arch` (c3d | r3d | r21d; default: the architecture of `init_from`, needed for random init).
No training: the backbone of `init_from` (a pretraining or fine-tuning workdir; its
best-validation-loss checkpoint) embeds each video as the mean feature of 10 clips, BatchNorm in
inference mode; neighbours by cosine similarity; top-1/5/10/20/50 accuracy over every query.
"""

import ml_collections
from ml_collections import config_dict

from configs import default, finetune

DATASETS = ("ucf101", "hmdb51")
# Keys of the pretraining recipe that retrieval has no use for (it does not train).
TRAINING_ONLY = ("pretext", "optimizer", "cloze", "num_train_steps", "log_every_steps",
                 "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "prefetch_to_device")


def get_config(args: str = "") -> ml_collections.ConfigDict:
    kwargs = finetune.parse_args(args)
    unknown = set(kwargs) - {"dataset", "arch"}
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)}; use dataset, arch")
    dataset = kwargs.get("dataset", "ucf101")
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}: choose one of {DATASETS}")

    config = default.get_config()
    for key in TRAINING_ONLY:
        del config[key]
    del config.data["num_val_videos"]
    del config.model["bn_stats"]
    config.task = "retrieval"
    config.seed = 0  # the random init of the backbone when there is no init_from
    config.model.arch = kwargs.get("arch") or config_dict.placeholder(str)  # None: init_from's
    config.model.width = config_dict.placeholder(int)  # None: init_from's (64 from scratch)
    # None: the input init_from's backbone was trained on (RGB from scratch); set, it must
    # agree with the backbone's unless config.force_modality.
    config.model.modality = config_dict.placeholder(str)
    config.data.name = f"{dataset}_frames"  # ucf101_frames or hmdb51_frames (tfds_builders)
    config.data.builder_config = "split1"  # queries: its test videos; gallery: its train videos
    config.data.crop_size = 112  # centre crop of every clip
    config.batch_size = 16  # videos per global batch (x num_clips clips); divisible by devices

    config.retrieval = ml_collections.ConfigDict()
    # 'conv5': conv5 map max-pooled (1,2,2), flattened (9,216-d); 'pooled': its mean (512-d).
    config.retrieval.feature = "conv5"
    config.retrieval.num_clips = 10  # clips per video, centres linspace(8, L-8, 10); mean feature
    config.retrieval.clip_len = 16  # frames per clip
    config.retrieval.topk = (1, 5, 10, 20, 50)  # k of the reported top-k accuracies
    config.retrieval.chunk_size = 1024  # queries per on-device similarity block (x gallery)
    config.retrieval.num_examples = 8  # queries shown with their nearest videos (examples.png)
    # Merged retrieval: a second backbone (a workdir or checkpoint, as init_from) whose video
    # features join init_from's, e.g. the residual-frame backbone next to the RGB one (each on
    # the input its checkpoint records). None: init_from's backbone alone.
    config.retrieval.merge_with = config_dict.placeholder(str)
    # How: 'mean' (same feature size) or 'concat' of the two L2-normalised features.
    config.retrieval.merge = "mean"
    return config
