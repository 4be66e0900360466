"""Fine-tuning for action recognition (the paper's protocol, docs/method.md section 4).

    python main.py --config configs/finetune.py:dataset=ucf101,fold=all \
        --config.init_from=~/runs/vcp_r3d --workdir ~/runs/vcp_r3d_ucf101

Arguments (big_vision style, comma-separated): `dataset` (ucf101 | hmdb51, default ucf101),
`fold` (1 | 2 | 3 | all, default all: the three official folds, each in `<workdir>/fold_<k>`,
then their mean), `arch` (c3d | r3d | r21d; default: the architecture of `init_from`, needed
for a random-init baseline). The backbone comes from `init_from`'s best-validation-loss
checkpoint; the VCP head is dropped and a new Dense head trained with the backbone (or, with
`finetune.freeze_backbone`, alone: linear evaluation). Test: 10 clips per video, centre crop,
mean of the clip logits.
"""

import ml_collections
from ml_collections import config_dict

from configs import default

NUM_VAL_VIDEOS = {"ucf101": 800, "hmdb51": 400}


def parse_args(args: str) -> dict[str, str]:
    """'dataset=hmdb51,fold=2' -> {'dataset': 'hmdb51', 'fold': '2'}."""
    parsed = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value")
        parsed[key.strip()] = value.strip()
    return parsed


def get_config(args: str = "") -> ml_collections.ConfigDict:
    kwargs = parse_args(args)
    unknown = set(kwargs) - {"dataset", "fold", "arch"}
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)}; use dataset, fold, arch")
    dataset = kwargs.get("dataset", "ucf101")
    if dataset not in NUM_VAL_VIDEOS:
        raise ValueError(f"dataset={dataset!r}: choose one of {sorted(NUM_VAL_VIDEOS)}")
    fold = kwargs.get("fold", "all")
    if fold not in ("1", "2", "3", "all"):
        raise ValueError(f"fold={fold!r}: choose 1, 2, 3 or all")

    config = default.get_config()
    config.task = "finetune"
    config.model.arch = kwargs.get("arch") or config_dict.placeholder(str)  # None: init_from's
    config.model.width = config_dict.placeholder(int)  # None: init_from's (64 from scratch)
    # None: the input init_from's backbone was trained on (RGB from scratch); set, it must
    # agree with the backbone's unless config.force_modality.
    config.model.modality = config_dict.placeholder(str)
    del config["pretext"]  # the backbone's pretext is recorded in its checkpoint
    config.data.name = f"{dataset}_frames"
    config.data.builder_config = "split1"  # its fold is replaced by each fold run's
    config.data.num_val_videos = NUM_VAL_VIDEOS[dataset]  # train videos held out (lowest loss)

    config.finetune = ml_collections.ConfigDict()
    config.finetune.folds = (1, 2, 3) if fold == "all" else (int(fold),)  # one run per fold
    config.finetune.fold = config_dict.placeholder(int)  # set per fold run (stored with it)
    config.finetune.clip_len = 16  # frames per clip, one random clip per video and epoch
    config.finetune.num_test_clips = 10  # clips per test video, centres linspace(8, L-8, 10)
    config.finetune.test_batch_size = 8  # test videos per batch (x num_test_clips clips)
    config.finetune.freeze_backbone = False  # True: linear evaluation (only the head trains)

    # SGD, momentum 0.9, L2 5e-4, lr 1e-3 constant, batch 8, 150 epochs (the paper's recipe).
    config.optimizer.learning_rate = 1e-3
    config.num_epochs = 150  # sets num_train_steps from the number of training videos
    config.num_train_steps = config_dict.placeholder(int)  # None: num_epochs worth of steps
    config.eval_every_steps = config_dict.placeholder(int)  # validation; None: once per epoch
    config.checkpoint_every_steps = config_dict.placeholder(int)  # None: once per epoch
    config.log_every_steps = 100
    return config
