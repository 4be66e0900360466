"""The `hmdb51_frames` dataset."""

from tfds_builders.hmdb51_frames.hmdb51_frames_dataset_builder import Builder

__all__ = ["Builder"]
