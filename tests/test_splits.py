"""The split parsers on the official split files (../shared/data) and on malformed ones."""

from pathlib import Path

import pytest

from vcp_jax.data import splits

UCF_COUNTS = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_ucf101_official_counts(shared_data: Path, fold: int) -> None:
    split = splits.read_ucf101_split(shared_data / "ucf101" / "ucfTrainTestlist", fold)
    assert len(split.class_names) == 101
    assert (len(split.train), len(split.test)) == UCF_COUNTS[fold]
    assert {e.label for e in split.train} == set(range(101))
    assert {e.label for e in split.test} == set(range(101))
    # Together the two lists hold every one of the 13,320 videos once.
    assert len({e.relpath for e in split.train + split.test}) == 13320


def test_ucf101_classes_and_pitfalls(shared_data: Path) -> None:
    split = splits.read_ucf101_split(shared_data / "ucf101" / "ucfTrainTestlist", 1)
    assert split.class_names[0] == "ApplyEyeMakeup" and split.class_names[-1] == "YoYo"
    # CRLF is gone from every name.
    assert not any("\r" in e.relpath or e.relpath != e.relpath.strip() for e in split.train)
    handstand = [e for e in split.test if e.video_id.startswith("v_HandStandPushups")]
    assert handstand and all(e.class_name == "HandstandPushups" for e in handstand)
    assert all(e.label == split.class_names.index("HandstandPushups") for e in handstand)
    first = split.train[0]
    assert first.video_id == "v_ApplyEyeMakeup_g08_c01" and first.group == "g08"
    # Fold 1 tests on groups 1-7, as officially defined.
    assert {e.group for e in split.test} == {f"g{g:02d}" for g in range(1, 8)}


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_hmdb51_official_counts(shared_data: Path, fold: int) -> None:
    split = splits.read_hmdb51_split(shared_data / "hmdb51" / "testTrainMulti_7030_splits", fold)
    assert len(split.class_names) == 51
    assert (len(split.train), len(split.test), len(split.unused)) == (3570, 1530, 1666)
    assert len({e.relpath for e in split.train + split.test + split.unused}) == 6766


def test_hmdb51_names_and_order(shared_data: Path) -> None:
    split = splits.read_hmdb51_split(shared_data / "hmdb51" / "testTrainMulti_7030_splits", 1)
    assert split.class_names[:3] == ("brush_hair", "cartwheel", "catch")
    assert split.class_names[-1] == "wave"
    odd = [e for e in split.train + split.test if any(c in e.video_id for c in "![(&';")]
    assert odd, "the official lists contain names with special characters"
    assert all(not e.video_id.endswith(" ") for e in split.train)
    entry = next(e for e in split.train if e.video_id == "RATRACE_wave_f_nm_np1_fr_goo_37")
    assert entry.relpath == "wave/RATRACE_wave_f_nm_np1_fr_goo_37.avi"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def test_missing_file_named(tmp_path: Path) -> None:
    _write(tmp_path / "classInd.txt", "1 A\r\n")
    with pytest.raises(splits.SplitFileError, match="trainlist02.txt"):
        splits.read_ucf101_split(tmp_path, 2)


@pytest.mark.parametrize(
    "train, test, where",
    [
        ("A/v_A_g01_c01.avi\r\n", "", "trainlist01.txt:1"),  # no label
        ("A/v_A_g01_c01.avi 1\r\nA/v_A_g02_c01.avi 2\r\n", "", "trainlist01.txt:2"),  # wrong label
        ("A/v_A_g01_c01.avi 1\r\n", "\r\nC/v_C_g01_c01.avi\r\n", "testlist01.txt:2"),  # class
    ],
)
def test_malformed_ucf101_line_named(tmp_path: Path, train: str, test: str, where: str) -> None:
    _write(tmp_path / "classInd.txt", "1 A\r\n2 B\r\n")
    _write(tmp_path / "trainlist01.txt", train)
    _write(tmp_path / "testlist01.txt", test)
    with pytest.raises(splits.SplitFileError, match=where):
        splits.read_ucf101_split(tmp_path, 1)


def test_malformed_hmdb51_line_named(tmp_path: Path) -> None:
    _write(tmp_path / "a_test_split1.txt", "x.avi 1 \ny.avi 3 \n")
    with pytest.raises(splits.SplitFileError, match="a_test_split1.txt:2"):
        splits.read_hmdb51_split(tmp_path, 1)


def test_bad_fold() -> None:
    with pytest.raises(ValueError, match="fold"):
        splits.read_ucf101_split(Path("."), 4)
