"""`hmdb51_frames`: HMDB51 videos as 128x171 JPEG frames, one example per video, official folds."""

from __future__ import annotations

from tfds_builders import video_frames

_INSTRUCTIONS = """\
Download the two archives of the official release into one folder, and pass that folder as
--manual_dir. The Serre lab's download server (linked from
https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/) is reported
defunct by other projects: a copy from any mirror will do, checked with --verify.
  hmdb51_org.rar          about 2 GB, sha256
      9e714a0d8b76104d76e932764a7ca636f929fff66279cda3f2e326fa912a328e
  test_train_splits.rar   sha256
      229c94f845720d01eb3946d39f39292ea962d50a18136484aa47c1eba251d2b7
The release holds 6,766 videos in 51 classes; each fold lists 3,570 for training and 1,530 for
testing (70 + 30 per class) and marks the other 1,666 unused. Check a download before building:
  python -m tfds_builders.build hmdb51_frames --manual_dir=DIR --verify
Leave them packed (they are extracted under <data_dir>/downloads/manual_extracted,
resumably, and left intact) or unpack them the usual way. Accepted layouts in --manual_dir:
  videos, one of
    hmdb51_org.rar                       as downloaded: 51 <class>.rar inside
    brush_hair.rar, ..., wave.rar        after `unrar x hmdb51_org.rar` (or in a folder of their
                                         own): extracted automatically
    brush_hair/<video>.avi, ...          after `for f in *.rar; do unrar x "$f"; done` as well
    hmdb51_org/<class>/<video>.avi       the same inside a folder (mmaction2: videos/)
  split files, one of
    test_train_splits.rar                as downloaded
    testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt   after `unrar x test_train_splits.rar`
The videos are the one folder, up to 2 levels down, whose sub-folders are named as the classes of
the split files; the split files are the one folder, up to 3 levels down, holding
<class>_test_split<N>.txt files (so mmaction2's annotations/ works too).
"""


class Builder(video_frames.VideoFramesBuilder):
    """HMDB51 (6,766 videos, 51 actions), official 70/30 folds 1-3 (unused videos left out)."""

    LAYOUT = video_frames.DatasetLayout(
        dataset="hmdb51",
        title="HMDB51",
        videos_archives=("hmdb51_org.rar",),
        splits_archives=("test_train_splits.rar",),
        splits_hint="<class>_test_split<N>.txt files",
        instructions=_INSTRUCTIONS,
        per_class_archives=True,
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _description(self) -> str:
        return (
            "HMDB51 human motion videos (Kuehne et al., 2011), decoded and resized, each frame "
            "stored as JPEG bytes. Widths vary in the source; every frame is resized."
        )

    def _homepage(self) -> str:
        return "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
