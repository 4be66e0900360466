"""A small VCP pretraining on the built-in synthetic motion dataset: minutes on 2 CPU cores.

The dataset (motion-defined classes in the UCF101 layout) is generated and built by the real
builder the first time; every other piece is the paper's code path at a smaller size: a
narrower R3D (width 8), 48x64 frames and 32x32 crops, clips of 16 frames with 8-frame gaps.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("r3d")
    config.data.data_dir = "~/.cache/vcp_jax/synthetic/tensorflow_datasets"
    config.data.builder_config = "split1_48x64"
    config.data.crop_size = 32
    config.data.num_val_videos = 40
    config.data.num_threads = 4
    config.data.synthetic = ml_collections.ConfigDict(dict(
        manual_dir="~/.cache/vcp_jax/synthetic/videos",  # where the generated .avi files go
        layout="ucf101",  # official folder layout of the generated dataset (ucf101 | hmdb51)
        num_classes=10,  # the first 10 motion classes of vcp_jax.data.synthetic.MOTIONS
        videos_per_class=20,  # generated videos per class
        num_frames=150,  # frames per generated video
        height=120,  # frame height of the generated videos (even)
        width=160,  # frame width of the generated videos (even)
        seed=0,  # the videos' content; file names do not depend on it
        # A random camera pan per video (never tied to the class): temporal shuffles and remote
        # clips then break the motion of the whole frame, not only of the small objects.
        camera_pan=0.03,
        # Light from above (class-independent), as sky over ground in real footage: rotated and
        # permuted blanks then show an up-down layout that no context clip has.
        top_light=80.0,
        build_workers=None,  # every core
    ))
    config.model.width = 8
    config.optimizer.learning_rate = 0.01
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 20
    config.batch_size = 16
    config.num_train_steps = 300
    config.log_every_steps = 10
    config.eval_every_steps = 150
    config.checkpoint_every_steps = 50
    return config
