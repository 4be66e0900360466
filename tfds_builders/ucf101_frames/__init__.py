"""The `ucf101_frames` dataset."""

from tfds_builders.ucf101_frames.ucf101_frames_dataset_builder import Builder

__all__ = ["Builder"]
