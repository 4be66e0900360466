"""`ucf101_frames`: UCF101 videos as 128x171 JPEG frames, one example per video, official folds."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from tfds_builders import video_frames
from vcp_jax.data import splits as splits_lib
from vcp_jax.data import video as video_lib


class Builder(video_frames.VideoFramesBuilder):
    """UCF101 (13,320 videos, 101 actions) with the official train/test folds 1-3."""

    LAYOUT = video_frames.DatasetLayout(
        dataset="ucf101",
        videos_folder="UCF101",
        videos_archives=("UCF101.rar",),
        videos_nested=False,
        splits_folder=splits_lib.UCF101_SPLITS_FOLDER,
        splits_archives=(
            "UCF101TrainTestSplits-RecognitionTask.zip",
            "ucfTrainTestlist.zip",
        ),
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download UCF101 from https://www.crcv.ucf.edu/data/UCF101.php and place in the manual dir
    (--manual_dir) either the archives as distributed:
        UCF101.rar
        UCF101TrainTestSplits-RecognitionTask.zip
    or their extracted folders:
        UCF101/<Class>/v_<Class>_gXX_cYY.avi
        ucfTrainTestlist/{classInd,trainlist01,testlist01,...}.txt
    Archives are extracted automatically (resumably) under <data_dir>/downloads and left intact.
    """

    def _description(self) -> str:
        return (
            "UCF101 action recognition videos (Soomro et al., 2012), decoded and resized, each "
            "frame stored as JPEG bytes; `group` is the actor group gXX that defines the folds."
        )

    def _homepage(self) -> str:
        return "https://www.crcv.ucf.edu/data/UCF101.php"

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {"group": tfds.features.Text()}

    def _example(
        self, entry: splits_lib.VideoEntry, encoded: video_lib.EncodedVideo
    ) -> dict[str, Any]:
        return {**super()._example(entry, encoded), "group": entry.group}
