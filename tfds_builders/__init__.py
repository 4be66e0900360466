"""TFDS builders of vcp-jax. Importing this package registers `ucf101_frames` and `hmdb51_frames`.

    import tfds_builders  # noqa: F401
    ds = tfds.data_source('ucf101_frames/split1', split='train', data_dir=DIR)
"""

from tfds_builders import hmdb51_frames, ucf101_frames

BUILDERS = {"ucf101_frames": ucf101_frames.Builder, "hmdb51_frames": hmdb51_frames.Builder}

__all__ = ["BUILDERS", "hmdb51_frames", "ucf101_frames"]
