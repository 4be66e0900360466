"""`hmdb51_frames`: HMDB51 videos as 128x171 JPEG frames, one example per video, official folds."""

from __future__ import annotations

from tfds_builders import video_frames
from vcp_jax.data import splits as splits_lib


class Builder(video_frames.VideoFramesBuilder):
    """HMDB51 (6,766 videos, 51 actions), official 70/30 folds 1-3 (unused videos left out)."""

    LAYOUT = video_frames.DatasetLayout(
        dataset="hmdb51",
        videos_folder="hmdb51_org",
        videos_archives=("hmdb51_org.rar",),
        videos_nested=True,
        splits_folder=splits_lib.HMDB51_SPLITS_FOLDER,
        splits_archives=("test_train_splits.rar",),
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download HMDB51 from
    https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/
    and place in the manual dir (--manual_dir) either the archives as distributed:
        hmdb51_org.rar            (one .rar per class inside)
        test_train_splits.rar
    or their extracted folders:
        hmdb51_org/<class>/<name>.avi
        testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt
    Archives are extracted automatically (resumably) under <data_dir>/downloads and left intact.
    """

    def _description(self) -> str:
        return (
            "HMDB51 human motion videos (Kuehne et al., 2011), decoded and resized, each frame "
            "stored as JPEG bytes. Widths vary in the source; every frame is resized."
        )

    def _homepage(self) -> str:
        return "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
