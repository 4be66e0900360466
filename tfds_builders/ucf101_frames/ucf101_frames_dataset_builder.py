"""`ucf101_frames`: UCF101 videos as 128x171 JPEG frames, one example per video, official folds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tensorflow_datasets as tfds

from tfds_builders import video_frames
from vcp_jax.data import splits as splits_lib

if TYPE_CHECKING:
    from vcp_jax.data import video as video_lib

_INSTRUCTIONS = """\
Download from https://www.crcv.ucf.edu/data/UCF101.php (or any mirror) the two archives of the
official release into one folder, and pass that folder as --manual_dir:
  UCF101.rar                                  about 6.5 GB, sha256
      ca8dfadb4c891cb11316f94d52b6b0ac2a11994e67a0cae227180cd160bd8e55
  UCF101TrainTestSplits-RecognitionTask.zip   113,943 bytes, sha256
      5c0d1a53b8ed364a2ac830a73f405e51bece7d98ce1254fd19ed4a36b224bd27
tensorflow-datasets' copy of the videos, UCF101_videos.zip (6,960,400,115 bytes, sha256
dabf56f573cd19c79e096563529fec8126a2a34e18e10c72eb621dd687532b0d, from
https://storage.googleapis.com/thumos14_files/), may stand in for UCF101.rar.
The release holds 13,320 videos in 101 classes; fold 1 lists 9,537 for training and 3,783 for
testing (fold 2: 9,586 + 3,734, fold 3: 9,624 + 3,696). Check a download before building:
  python -m tfds_builders.build ucf101_frames --manual_dir=DIR --verify
Leave them packed (they are extracted under <data_dir>/downloads/manual_extracted, resumably,
and left intact) or unpack them the usual way. Accepted layouts in --manual_dir:
  videos, one of
    UCF101.rar (or UCF101_videos.zip)         as downloaded
    UCF-101/<Class>/v_<Class>_gXX_cYY.avi     after `unrar x UCF101.rar`
    UCF101/UCF-101/<Class>/...                unpacked into a folder of its own
    UCF101/<Class>/..., videos/<Class>/...    renamed (mmaction2 renames it videos/)
    <Class>/v_<Class>_gXX_cYY.avi             the class folders in --manual_dir itself
  split files, one of
    UCF101TrainTestSplits-RecognitionTask.zip   as downloaded
    ucfTrainTestlist/classInd.txt, trainlist01.txt ... testlist03.txt   after `unzip`
The videos are the one folder, up to 2 levels down, whose sub-folders are named as the classes of
classInd.txt; the split files are the one folder, up to 3 levels down, holding classInd.txt (so
mmaction2's annotations/ works too).
"""


class Builder(video_frames.VideoFramesBuilder):
    """UCF101 (13,320 videos, 101 actions) with the official train/test folds 1-3."""

    LAYOUT = video_frames.DatasetLayout(
        dataset="ucf101",
        title="UCF101",
        videos_archives=("UCF101.rar", "UCF101_videos.zip"),
        splits_archives=(
            "UCF101TrainTestSplits-RecognitionTask.zip",
            "ucfTrainTestlist.zip",
        ),
        splits_hint="classInd.txt",
        instructions=_INSTRUCTIONS,
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

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
