"""TFDS builders of vcp-jax. Importing this package registers `ucf101_frames` and `hmdb51_frames`.

    import tfds_builders  # noqa: F401
    ds = tfds.data_source('ucf101_frames/split1', split='train', data_dir=DIR)

Registering is cheap: the video decoders (PyAV, OpenCV) are imported only by a build's workers,
so a training run that reads a built dataset never loads them.
"""

from tfds_builders import hmdb51_frames, ucf101_frames

BUILDERS = {"ucf101_frames": ucf101_frames.Builder, "hmdb51_frames": hmdb51_frames.Builder}

__all__ = ["BUILDERS", "hmdb51_frames", "ucf101_frames"]
