"""The builders find real data in every layout users have: the official archives as distributed
(RAR4 `UCF101.rar` holding `UCF-101/`, `hmdb51_org.rar` holding 51 per-class `.rar` files, ...)
and the folders those archives leave when unpacked the usual ways.

Every layout is built from the real sample clips and official split files in ../shared/data (the
lists trimmed to the clips, all classes kept) and must give the same examples, which are checked
against the decode facts in `samples/manifest.csv`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from tests import rar_writer
from tests.conftest import REPO_ROOT
from tfds_builders import build as build_cli
from tfds_builders import layouts, summary, video_frames
from vcp_jax.data import archives

SMALL = "split1_32x43"  # tiny frames keep the builds fast; the code path is the default one
UCF_SPLITS = "ucfTrainTestlist"
HMDB_SPLITS = "testTrainMulti_7030_splits"


# ---- the real data, trimmed to the sample clips -------------------------------------------------


class Data:
    """The sample clips and the official split files restricted to them (all classes kept)."""

    def __init__(self, shared: Path) -> None:
        samples = shared / "samples"
        self.ucf_videos = {f"{p.parent.name}/{p.name}": p for p in samples.glob("ucf101/*/*.avi")}
        self.hmdb_videos = {f"{p.parent.name}/{p.name}": p for p in samples.glob("hmdb51/*/*.avi")}
        official = shared / "ucf101" / UCF_SPLITS
        self.ucf_lists = {"classInd.txt": (official / "classInd.txt").read_bytes()}
        for path in official.glob("*list0?.txt"):
            lines = path.read_bytes().split(b"\r\n")
            kept = [ln for ln in lines if ln.split(b" ")[0].decode() in self.ucf_videos]
            self.ucf_lists[path.name] = b"\r\n".join(kept) + b"\r\n"
        names = {Path(v).name for v in self.hmdb_videos}
        self.hmdb_lists = {}
        for path in (shared / "hmdb51" / HMDB_SPLITS).glob("*_test_split*.txt"):
            lines = path.read_bytes().splitlines(keepends=True)
            self.hmdb_lists[path.name] = b"".join(
                ln for ln in lines if ln.split(b" ")[0].decode() in names
            )
        self.hmdb_classes = sorted({n.rsplit("_test_split", 1)[0] for n in self.hmdb_lists})
        # What fold 1 must give, from the manifest (decoded frame counts, split membership).
        self.expected: dict[str, dict[str, list[tuple[str, str, int]]]] = {}
        with open(samples / "manifest.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["dataset"] in ("ucf101", "hmdb51") and row["split1"] in ("train", "test"):
                    video_id = Path(row["path"]).stem
                    by_split = self.expected.setdefault(row["dataset"], {"train": [], "test": []})
                    by_split[row["split1"]].append(
                        (video_id, row["cls"], int(row["decoded_frames"]))
                    )
        for by_split in self.expected.values():
            for entries in by_split.values():
                entries.sort()


@pytest.fixture(scope="module")
def data(shared_data: Path) -> Data:
    return Data(shared_data)


def put_videos(folder: Path, videos: dict[str, Path]) -> None:
    for relpath, source in videos.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, folder / relpath)


def put_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)


def rar4_tree(top: str, files: dict[str, bytes]) -> bytes:
    """A RAR4 archive with folder entries, as WinRAR writes them: `top/`, `top/a/`, files."""
    prefix = f"{top}/" if top else ""
    folders = sorted({str(Path(prefix + name).parent) for name in files} - {"."})
    members: list[rar_writer.Member] = [(top, None)] if top else []
    members += [(d, None) for d in folders if d != top]
    members += [(prefix + name, content) for name, content in sorted(files.items())]
    return rar_writer.rar4_bytes(members)


def ucf101_rar(data: Data) -> bytes:
    """`UCF101.rar` as distributed: its top folder is `UCF-101/` (with a hyphen)."""
    return rar4_tree("UCF-101", {rel: p.read_bytes() for rel, p in data.ucf_videos.items()})


def ucf101_splits_zip(data: Data) -> bytes:
    """`UCF101TrainTestSplits-RecognitionTask.zip`: its top folder is `ucfTrainTestlist/`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{UCF_SPLITS}/", b"")
        for name, content in sorted(data.ucf_lists.items()):
            zf.writestr(f"{UCF_SPLITS}/{name}", content)
    return buf.getvalue()


def hmdb51_class_rars(data: Data) -> dict[str, bytes]:
    """The 51 `<class>.rar` of `hmdb51_org.rar`, each holding `<class>/<video>.avi`."""
    rars = {}
    for cls in data.hmdb_classes:
        videos = {Path(rel).name: p.read_bytes() for rel, p in data.hmdb_videos.items()
                  if rel.startswith(f"{cls}/")}
        rars[f"{cls}.rar"] = rar4_tree(cls, videos)
    return rars


def hmdb51_org_rar(data: Data) -> bytes:
    """`hmdb51_org.rar` as distributed: 51 loose per-class `.rar` files at its top level."""
    return rar_writer.rar4_bytes(sorted(hmdb51_class_rars(data).items()))


def hmdb51_splits_rar(data: Data) -> bytes:
    """`test_train_splits.rar`: its top folder is `testTrainMulti_7030_splits/`."""
    return rar4_tree(HMDB_SPLITS, data.hmdb_lists)


# ---- the layouts --------------------------------------------------------------------------------


def ucf_official_archives(m: Path, d: Data) -> None:
    (m / "UCF101.rar").write_bytes(ucf101_rar(d))
    (m / "UCF101TrainTestSplits-RecognitionTask.zip").write_bytes(ucf101_splits_zip(d))


def ucf_tfds_mirror(m: Path, d: Data) -> None:
    """tensorflow-datasets' copy of the videos, `UCF101_videos.zip` holding `UCF101/`, packed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, path in sorted(d.ucf_videos.items()):
            zf.writestr(f"UCF101/{rel}", path.read_bytes())
    (m / "UCF101_videos.zip").write_bytes(buf.getvalue())
    (m / "UCF101TrainTestSplits-RecognitionTask.zip").write_bytes(ucf101_splits_zip(d))


def ucf_unrar_x(m: Path, d: Data) -> None:  # `unrar x UCF101.rar`, `unzip ...zip`
    put_videos(m / "UCF-101", d.ucf_videos)
    put_files(m / UCF_SPLITS, d.ucf_lists)


def ucf_renamed(m: Path, d: Data) -> None:
    put_videos(m / "UCF101", d.ucf_videos)
    put_files(m / UCF_SPLITS, d.ucf_lists)


def ucf_mmaction2(m: Path, d: Data) -> None:  # videos/ and `unzip -j` into annotations/
    put_videos(m / "videos", d.ucf_videos)
    put_files(m / "annotations", d.ucf_lists)


def ucf_class_folders_in_manual_dir(m: Path, d: Data) -> None:
    put_videos(m, d.ucf_videos)
    put_files(m / UCF_SPLITS, d.ucf_lists)


def ucf_extracted_into_own_folders(m: Path, d: Data) -> None:  # "extract to UCF101/" in a GUI
    put_videos(m / "UCF101" / "UCF-101", d.ucf_videos)
    put_files(m / "UCF101TrainTestSplits-RecognitionTask" / UCF_SPLITS, d.ucf_lists)


def hmdb_official_archives(m: Path, d: Data) -> None:
    (m / "hmdb51_org.rar").write_bytes(hmdb51_org_rar(d))
    (m / "test_train_splits.rar").write_bytes(hmdb51_splits_rar(d))


def hmdb_unpacked_in_place(m: Path, d: Data) -> None:
    """What `unrar x hmdb51_org.rar; for f in *.rar; do unrar x "$f"; done` and
    `unrar x test_train_splits.rar` leave in the download folder: everything side by side."""
    hmdb_official_archives(m, d)
    for name, content in hmdb51_class_rars(d).items():
        (m / name).write_bytes(content)
        (m / name[: -len(".rar")]).mkdir()
    put_videos(m, d.hmdb_videos)
    put_files(m / HMDB_SPLITS, d.hmdb_lists)


def hmdb_outer_unpacked(m: Path, d: Data) -> None:  # the 51 <class>.rar, not unpacked further
    for name, content in hmdb51_class_rars(d).items():
        (m / name).write_bytes(content)
    (m / "test_train_splits.rar").write_bytes(hmdb51_splits_rar(d))


def hmdb_class_rars_in_folder(m: Path, d: Data) -> None:  # "extract to hmdb51_org/" in a GUI
    put_files(m / "hmdb51_org", hmdb51_class_rars(d))
    put_files(m / HMDB_SPLITS, d.hmdb_lists)


def hmdb_org_folder(m: Path, d: Data) -> None:
    put_videos(m / "hmdb51_org", d.hmdb_videos)
    put_files(m / HMDB_SPLITS, d.hmdb_lists)


def hmdb_mmaction2(m: Path, d: Data) -> None:  # videos/<class>/, split files in annotations/
    put_videos(m / "videos", d.hmdb_videos)
    put_files(m / "annotations", d.hmdb_lists)


LAYOUTS: dict[str, tuple[str, Callable[[Path, Data], None]]] = {
    f.__name__: (name, f)
    for name, fs in {
        "ucf101_frames": [ucf_official_archives, ucf_tfds_mirror, ucf_unrar_x, ucf_renamed,
                          ucf_mmaction2, ucf_class_folders_in_manual_dir,
                          ucf_extracted_into_own_folders],
        "hmdb51_frames": [hmdb_official_archives, hmdb_unpacked_in_place, hmdb_outer_unpacked,
                          hmdb_class_rars_in_folder, hmdb_org_folder, hmdb_mmaction2],
    }.items()
    for f in fs
}


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root with its content hash (files) or target (links)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
        else:
            out[rel] = "dir"
    return out


def built_examples(name: str, data_dir: Path, config: str = SMALL) -> dict[str, list]:
    builder = tfds.builder(f"{name}/{config}", data_dir=str(data_dir))
    labels = builder.info.features["label"].names
    out = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        out[split] = sorted(
            (ex["video_id"].decode(), labels[ex["label"]], int(ex["num_frames"]))
            for ex in (source[i] for i in range(len(source)))
        )
    return out


# ---- every layout builds the same examples ------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_builds_the_same_examples(data: Data, tmp_path: Path, layout: str) -> None:
    name, make = LAYOUTS[layout]
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    make(manual, data)
    before = snapshot(manual)
    argv = [name, f"--manual_dir={manual}", f"--data_dir={data_dir}", f"--config={SMALL}",
            "--num_workers=1"]
    assert build_cli.main(argv) == 0
    expected = data.expected[name.split("_")[0]]
    assert built_examples(name, data_dir) == expected
    assert snapshot(manual) == before  # archives untouched, nothing written into the manual dir


@pytest.mark.parametrize("layout", ["hmdb_official_archives", "hmdb_outer_unpacked"])
def test_archives_deleted_after_extraction_still_build(
    data: Data, tmp_path: Path, layout: str
) -> None:
    """Users delete the archives once a first build extracted them; later folds still build."""
    name, make = LAYOUTS[layout]
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    make(manual, data)
    build_cli.build(name, manual_dir=manual, data_dir=data_dir, config=SMALL, num_workers=1)
    for archive in manual.glob("*.rar"):
        if archive.name != "test_train_splits.rar" or layout == "hmdb_official_archives":
            archive.unlink()
    config2 = "split2_32x43"
    build_cli.build(name, manual_dir=manual, data_dir=data_dir, config=config2, num_workers=1)
    # Fold 2: RATRACE test, TrumanShow train (manifest); SchoolRules unused in folds 1 and 2.
    assert built_examples(name, data_dir, config2) == {
        "train": [("TrumanShow_wave_f_nm_np1_fr_med_26", "wave", 48)],
        "test": [("RATRACE_wave_f_nm_np1_fr_goo_37", "wave", 72)],
    }


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt / SIGTERM in the middle of an extraction."""


def test_per_class_extraction_resumes(
    data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manual, root = tmp_path / "manual", tmp_path / "extracted"
    manual.mkdir()
    hmdb_outer_unpacked(manual, data)
    layout = build_cli.BUILDERS["hmdb51_frames"].LAYOUT
    real_extract, calls = archives.extract, []

    def interrupted_on_the_third(archive: Path, *args, **kwargs):
        calls.append(archive.name)
        if len(calls) == 3:
            raise Interrupted
        return real_extract(archive, *args, **kwargs)

    monkeypatch.setattr(archives, "extract", interrupted_on_the_third)
    with pytest.raises(Interrupted):
        layouts.locate(layout, manual, root)
    assert calls[0] == "test_train_splits.rar"
    done = calls[1:3]
    calls.clear()

    def recorded(archive: Path, *args, **kwargs):
        calls.append(archive.name)
        return real_extract(archive, *args, **kwargs)

    monkeypatch.setattr(archives, "extract", recorded)
    located = layouts.locate(layout, manual, root)
    assert done[0] not in calls and done[1] in calls  # the finished class is not redone
    assert len(calls) == len(data.hmdb_classes) - 1
    assert located.videos_root == root / "hmdb51_org"
    assert (located.videos_root / next(iter(data.hmdb_videos))).is_file()
    calls.clear()
    layouts.locate(layout, manual, root)
    assert calls == []  # complete: nothing to do


# ---- none, several, wrong -----------------------------------------------------------------------


def build_error(name: str, manual: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    argv = [name, f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}", f"--config={SMALL}"]
    assert build_cli.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["ucf101_frames", "hmdb51_frames"])
def test_empty_manual_dir_lists_the_accepted_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    err = build_error(name, manual, tmp_path, capsys)
    assert f"{manual} is empty" in err
    accepted = {"ucf101_frames": ["UCF101.rar", "UCF-101/<Class>/", "ucfTrainTestlist/"],
                "hmdb51_frames": ["hmdb51_org.rar", "brush_hair/<video>.avi", HMDB_SPLITS]}
    for layout in accepted[name]:
        assert layout in err
    assert not (tmp_path / "data").exists()  # nothing started


def test_several_video_folders_are_listed(
    data: Data, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manual = tmp_path / "manual"
    ucf_unrar_x(manual, data)
    put_videos(manual / "UCF101", dict(list(data.ucf_videos.items())[:1]))
    err = build_error("ucf101_frames", manual, tmp_path, capsys)
    assert "found 2 folders holding UCF101 class folders" in err
    assert f"{manual / 'UCF-101'}  (3 of the 3 listed videos, 3 of 101 classes)" in err
    assert f"{manual / 'UCF101'}  (1 of the 3 listed videos, 1 of 101 classes)" in err
    assert "UCF-101/<Class>/v_<Class>_gXX_cYY.avi" in err  # the accepted layouts


def test_class_folders_in_two_places_are_listed(
    data: Data, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manual = tmp_path / "manual"
    hmdb_org_folder(manual, data)
    put_videos(manual, data.hmdb_videos)  # unpacked in place as well
    err = build_error("hmdb51_frames", manual, tmp_path, capsys)
    assert "found 2 folders holding HMDB51 class folders" in err
    assert f"  {manual}  (3 of the 3 listed videos, 1 of 51 classes)" in err
    assert f"  {manual / 'hmdb51_org'}  (3 of the 3 listed videos, 1 of 51 classes)" in err


def test_both_datasets_in_one_download_folder(data: Data, tmp_path: Path) -> None:
    """UCF101's `Fencing/` and HMDB51's `fencing/` share a name: the videos tell them apart."""
    manual = tmp_path / "manual"
    ucf_unrar_x(manual, data)
    hmdb_unpacked_in_place(manual, data)
    clip = next(iter(data.ucf_videos.values()))
    put_videos(manual, {"UCF-101/Fencing/v_Fencing_g01_c01.avi": clip,
                        "fencing/Fencing_Tutorial_fencing_f_cm_np2_ri_goo_0.avi": clip})
    ucf = layouts.locate(build_cli.BUILDERS["ucf101_frames"].LAYOUT, manual, tmp_path / "x")
    hmdb = layouts.locate(build_cli.BUILDERS["hmdb51_frames"].LAYOUT, manual, tmp_path / "x")
    assert (ucf.videos_root, ucf.splits_dir) == (manual / "UCF-101", manual / UCF_SPLITS)
    assert (hmdb.videos_root, hmdb.splits_dir) == (manual, manual / HMDB_SPLITS)
    assert (hmdb.videos_found, hmdb.videos_listed, hmdb.class_folders) == (3, 3, 1)
    assert not (tmp_path / "x").exists()  # the folders were used: nothing extracted


def test_missing_videos_are_announced(data: Data, tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    ucf_unrar_x(manual, data)
    next(manual.glob("UCF-101/Basketball/*.avi")).unlink()
    located = layouts.locate(build_cli.BUILDERS["ucf101_frames"].LAYOUT, manual, tmp_path / "x")
    assert (located.videos_found, located.videos_listed, located.class_folders) == (2, 3, 2)
    assert f"  missing      1 listed videos are not in {manual / 'UCF-101'}" in located.describe()


def test_several_split_folders_are_listed(
    data: Data, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manual = tmp_path / "manual"
    ucf_unrar_x(manual, data)
    put_files(manual / "annotations", data.ucf_lists)
    err = build_error("ucf101_frames", manual, tmp_path, capsys)
    assert "found 2 folders holding the split files" in err
    assert str(manual / "annotations") in err and str(manual / UCF_SPLITS) in err


def test_split_files_without_videos_lists_the_manual_dir(
    data: Data, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manual = tmp_path / "manual"
    put_files(manual / UCF_SPLITS, data.ucf_lists)
    (manual / "UCF-101" / "ApplyEyeMakeup").mkdir(parents=True)  # no .avi inside
    err = build_error("ucf101_frames", manual, tmp_path, capsys)
    assert f"no UCF101 videos in {manual}" in err
    assert f"{manual} holds: UCF-101/, {UCF_SPLITS}/" in err


def test_archive_without_the_dataset_is_refused_before_extracting(
    data: Data, tmp_path: Path
) -> None:
    manual = tmp_path / "manual"
    put_files(manual / UCF_SPLITS, data.ucf_lists)
    (manual / "UCF101.rar").write_bytes(rar4_tree("UCF101_docs", {"readme.txt": b"hello"}))
    layout = build_cli.BUILDERS["ucf101_frames"].LAYOUT
    with pytest.raises(archives.ArchiveError, match=r"UCF101\.rar does not hold UCF101 videos"
                       r".*its top level: UCF101_docs/"):
        layouts.locate(layout, manual, tmp_path / "extracted")
    assert not (tmp_path / "extracted").exists()


# ---- registering the builders stays cheap -------------------------------------------------------


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_registering_the_builders_does_not_import_the_decoders(tmp_path: Path) -> None:
    """A training run imports tfds_builders to read a dataset: PyAV and OpenCV are not needed."""
    run_python("""
import sys
import tensorflow_datasets  # imports cv2 itself when it is installed (for tfds.features.Image)
before = set(sys.modules)
import tfds_builders
new = set(sys.modules) - before
assert "av" not in sys.modules, "av imported"
assert not {m for m in new if m.split(".")[0] in ("av", "cv2")}, sorted(new)
assert "vcp_jax.data.video" not in sys.modules
""")
    # Nor are they needed: with both unimportable, the builders register and load a config.
    run_python(f"""
import sys
sys.modules["av"] = sys.modules["cv2"] = None  # `import av` now raises ImportError
import tensorflow_datasets as tfds
import tfds_builders
builder = tfds.builder("hmdb51_frames/split2", data_dir={str(tmp_path)!r})
assert builder.builder_config.fold == 2 and not builder.is_prepared()
""")


# ---- the summary --------------------------------------------------------------------------------


def test_summary_after_the_build_and_for_a_built_dataset(
    data: Data, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    hmdb_org_folder(manual, data)
    argv = ["hmdb51_frames", f"--data_dir={data_dir}", f"--config={SMALL}"]
    assert build_cli.main([*argv, f"--manual_dir={manual}", "--num_workers=1"]) == 0
    printed = capsys.readouterr().out
    builder = tfds.builder(f"hmdb51_frames/{SMALL}", data_dir=str(data_dir))
    path = Path(builder.data_dir) / summary.REPORT_NAME
    report = json.loads(path.read_text())
    train, test = report["splits"]["train"], report["splits"]["test"]
    # Fold 1 (manifest): RATRACE, 72 decoded frames, in train; TrumanShow, 48, in test.
    assert train["frames_per_video"] == {"min": 72, "median": 72, "max": 72}
    assert (train["frames"], test["frames"]) == (72, 48)
    assert train["too_short"] == []
    assert test["too_short"] == [
        {"video": "wave/TrumanShow_wave_f_nm_np1_fr_med_26.avi", "frames": 48}
    ]
    assert len(train["videos_per_class"]) == 51 and train["videos_per_class"]["wave"] == 1
    assert sum(test["videos_per_class"].values()) == 1
    assert train["bytes"] == sum(len(f) for f in builder.as_data_source(split="train")[0]["frames"])
    text = summary.format_summary(report, path)
    assert text in printed
    assert "too short for the paper's pretraining tuple (< 64 frames): 0 train, 1 test" in text
    assert "    wave 1/1" in text and "no videos (50): brush_hair, cartwheel" in text

    # The same summary later, in one command, without building anything.
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(video_frames.VideoFramesBuilder, "download_and_prepare", no_build)
    assert build_cli.main([*argv, "--summary"]) == 0
    assert capsys.readouterr().out.strip() == text

    # A report without the figures (or none, as from `tfds build`): read from the dataset.
    path.unlink()
    assert build_cli.main([*argv, "--summary"]) == 0
    scanned = capsys.readouterr().out.strip().splitlines()
    assert scanned[0] == f"hmdb51_frames/{SMALL}: 2 videos written, 0 skipped"
    assert scanned[1:] == text.splitlines()[2:]  # everything after the title and "from"


def test_summary_lists_skipped_videos_with_their_reason() -> None:
    split = summary.split_facts(
        [summary.VideoFacts("a/x.avi", "a", 100, 5000)],
        [{"video": "b/y.avi", "reason": "truncated (decoded 3 of 90 frames in the header)"}],
        ["a", "b"],
    )
    report = {"dataset": "d/split1", "splits": {"train": split}}
    text = summary.format_summary(report, width=100)
    assert "d/split1: 1 videos written, 1 skipped" in text
    assert "  skipped (1):\n    train: b/y.avi: truncated (decoded 3 of 90 frames" in text
    assert text.splitlines()[2].split() == ["train", "1", "1", "100", "/", "100", "/", "100",
                                            "100", "4.9", "KiB"]
    assert "videos per class (train), 1 of 2 classes:\n    a 1\n    no videos (1): b" in text
