"""Tests of vcp_jax.data.archives: resumable, safe extraction of zip and RAR archives.

The RAR fixtures are written by tests/rar_writer.py (store method, no `rar` tool needed) and read
by the real decoder the project uses, the UnRAR library of unrar-cffi.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from tests import rar_writer
from vcp_jax.data import archives
from vcp_jax.data.archives import ArchiveError, extract

# Names with the characters HMDB51 video names hold, in nested folders.
FILES: dict[str, bytes] = {
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": b"RIFF" + bytes(range(256)) * 40,
    "cartwheel/Geena_und_die_Radschl_ge___;-)_cartwheel_f_cm_np1_fr_med_2.avi": b"\x00" * 3000,
    "cartwheel/[HD]_Cart_wheel!_(2)_&_more_#1+@~'_f_cm_np1_le_bad_0.avi": os.urandom(5000),
    "cartwheel/deeper/sub dir/x.txt": b"hello\r\n",
    "empty.bin": b"",
}
DIRS = ["brush_hair", "cartwheel", "cartwheel/deeper", "cartwheel/deeper/sub dir"]


def _members(files: dict[str, bytes] = FILES, dirs: list[str] = DIRS) -> list[rar_writer.Member]:
    return [(d, None) for d in dirs] + list(files.items())


def make_zip(path: Path, files: dict[str, bytes] = FILES, dirs: list[str] = DIRS) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(d + "/", b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


MAKERS = {
    "zip": make_zip,
    "rar4": lambda path, *a: rar_writer.write_rar4(path, _members(*a)),
    "rar4-windows": lambda path, *a: rar_writer.write_rar4(
        path, _members(*a), host_os=rar_writer.RAR4_HOST_WIN32, unp_ver=20
    ),
    "rar5": lambda path, *a: rar_writer.write_rar5(path, _members(*a)),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under root: unchanged means nothing was rewritten."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def assert_extracted(dest: Path, files: dict[str, bytes] = FILES) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name
    videos = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    visible = {v for v in videos if not Path(v).name.startswith(".")}
    assert visible == set(files)
    assert not [v for v in videos if v.endswith(".partial")]


# ---- the RAR writer itself ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rar4", "rar4-windows", "rar5"])
def test_rar_writer_is_read_by_unrar_cffi(tmp_path: Path, kind: str) -> None:
    from unrar.cffi import rarfile

    path = MAKERS[kind](tmp_path / "a.rar")
    assert rarfile.is_rarfile(str(path))
    rf = rarfile.RarFile(str(path))
    assert rf.namelist() == DIRS + list(FILES)  # "/" separators, whatever the host OS
    for name, data in FILES.items():
        assert rf.read(name) == data
    assert rf.testrar() is None  # every CRC checks


# ---- extract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MAKERS))
def test_extract_contents_archive_untouched_and_rerun_is_noop(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = MAKERS[kind](manual / "data.bin")  # no telling extension: magic bytes decide
    digest, stat = sha256(archive), archive.stat()
    dest = tmp_path / "out"

    assert extract(archive, dest, progress=False) == dest
    assert_extracted(dest)
    for d in DIRS:
        assert (dest / d).is_dir()
    assert sha256(archive) == digest
    assert archive.stat().st_mtime_ns == stat.st_mtime_ns
    assert [p.name for p in manual.iterdir()] == ["data.bin"]  # nothing written next to it

    before = snapshot(dest)

    def fail(*args: object) -> None:
        raise AssertionError("a complete extraction was redone")

    monkeypatch.setattr(archives, "_list_members", fail)
    extract(archive, dest, progress=False)
    assert snapshot(dest) == before


def test_extract_with_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = MAKERS["rar4"](tmp_path / "a.rar")
    extract(archive, tmp_path / "out", progress=True)
    assert "Extracting a.rar" in capsys.readouterr().err
    assert_extracted(tmp_path / "out")


def test_changed_archive_is_extracted_again_keeping_identical_files(tmp_path: Path) -> None:
    archive = MAKERS["rar4"](tmp_path / "a.rar")
    dest = tmp_path / "out"
    extract(archive, dest, progress=False)
    before = snapshot(dest)
    changed = dict(FILES, **{"empty.bin": b"now with data"})
    MAKERS["rar4"](archive, changed)
    os.utime(archive, ns=(1, 1))  # a different mtime invalidates the completion marker

    extract(archive, dest, progress=False)
    assert_extracted(dest, changed)
    after = snapshot(dest)
    assert after["empty.bin"] != before["empty.bin"]
    unchanged = [n for n in FILES if n != "empty.bin"]
    assert all(after[n] == before[n] for n in unchanged)  # same size: kept, not rewritten


def hmdb_layout(path: Path, inner_kind: str = "rar4") -> dict[str, bytes]:
    """An outer RAR holding one RAR per class, like hmdb51_org.rar; returns the expected files."""
    classes = {
        "brush_hair": {"April_09_brush_hair_u_nm_np1_ba_goo_0.avi": b"a" * 700},
        "cartwheel": {
            "Geena_und_die_Radschl_ge___;-)_cartwheel_f_cm_np1_fr_med_2.avi": b"b" * 900,
            "[HD]_Cart_wheel!_(2)_&_f_cm_np1_le_bad_0.avi": b"c" * 1100,
        },
    }
    outer = []
    expected = {}
    for cls, videos in classes.items():
        files = {f"{cls}/{name}": data for name, data in videos.items()}
        expected.update(files)
        buf = path.parent / f"{cls}.tmp"
        MAKERS[inner_kind](buf, files, [cls])
        outer.append((f"{cls}.rar", buf.read_bytes()))
        buf.unlink()
    rar_writer.write_rar4(path, outer)
    return expected


@pytest.mark.parametrize("inner_kind", ["rar4", "rar5", "zip"])
def test_extract_nested_archives(tmp_path: Path, inner_kind: str) -> None:
    archive = tmp_path / "hmdb51_org.rar"
    expected = hmdb_layout(archive, inner_kind)
    digest = sha256(archive)
    dest = tmp_path / "out"

    extract(archive, dest, nested=True, progress=False)
    assert_extracted(dest, expected)  # dest/<class>/<video>.avi, inner archives gone
    assert sha256(archive) == digest
    before = snapshot(dest)
    extract(archive, dest, nested=True, progress=False)
    assert snapshot(dest) == before


def test_without_nested_inner_archives_are_plain_files(tmp_path: Path) -> None:
    archive = tmp_path / "hmdb51_org.rar"
    hmdb_layout(archive)
    extract(archive, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.rar")) == [
        "brush_hair.rar",
        "cartwheel.rar",
    ]


# ---- resuming -----------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt / SIGTERM arriving in the middle of a member."""


@pytest.mark.parametrize("kind", ["zip", "rar4"])
def test_interrupted_extraction_resumes(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = MAKERS[kind](tmp_path / "a.arc")
    dest = tmp_path / "out"
    victim = "cartwheel/[HD]_Cart_wheel!_(2)_&_more_#1+@~'_f_cm_np1_le_bad_0.avi"
    real_copy = archives._copy

    def interrupting_copy(archive, copy, out, on_bytes):
        def on_bytes_then_fail(n: int) -> None:
            if Path(out.name).name == f".{Path(victim).name}.partial":
                assert out.tell() > 0  # the temp file holds part of the member
                raise Interrupted
            on_bytes(n)

        # For RAR the exception is raised inside UnRAR's C callback and must come back out.
        real_copy(archive, copy, out, on_bytes_then_fail)

    monkeypatch.setattr(archives, "_copy", interrupting_copy)
    with pytest.raises(Interrupted):
        extract(archive, dest, progress=False)
    assert not (dest / victim).exists()  # no half-written file under the final name
    assert not list(dest.rglob("*.partial"))
    assert not (dest / ".extracted-a.arc.done").exists()
    done_before = snapshot(dest)
    assert "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi" in done_before

    monkeypatch.setattr(archives, "_copy", real_copy)
    extract(archive, dest, progress=False)
    assert_extracted(dest)
    after = snapshot(dest)
    assert all(after[name] == done_before[name] for name in done_before)  # finished work kept


@pytest.mark.parametrize("kind", ["zip", "rar5"])
def test_killed_extraction_resumes(tmp_path: Path, kind: str) -> None:
    """A run killed outright leaves a stale temp file and (say, after a crash) a short file."""
    archive = MAKERS[kind](tmp_path / "a.arc")
    dest = tmp_path / "out"
    video = dest / "cartwheel/Geena_und_die_Radschl_ge___;-)_cartwheel_f_cm_np1_fr_med_2.avi"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"\x00" * 10)  # wrong size: must be redone
    stale = video.with_name(f".{video.name}.partial")
    stale.write_bytes(b"junk")
    done = dest / "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"
    done.parent.mkdir(parents=True)
    done.write_bytes(FILES["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"])
    done_stale = done.with_name(f".{done.name}.partial")
    done_stale.write_bytes(b"junk")
    ino = done.stat().st_ino

    extract(archive, dest, progress=False)
    assert_extracted(dest)
    assert done.stat().st_ino == ino  # complete file kept
    assert not stale.exists() and not done_stale.exists()


def test_interrupted_nested_extraction_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "hmdb51_org.rar"
    expected = hmdb_layout(archive)
    dest = tmp_path / "out"
    real_extract = archives._extract
    calls = []

    def interrupt_second_class(arc, *args, **kw):
        calls.append(arc.name)
        if arc.name == "cartwheel.rar":
            raise Interrupted
        return real_extract(arc, *args, **kw)

    monkeypatch.setattr(archives, "_extract", interrupt_second_class)
    with pytest.raises(Interrupted):
        archives.extract(archive, dest, nested=True, progress=False)
    assert (dest / "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi").is_file()
    assert not (dest / "brush_hair.rar").exists()  # done: inner archive removed
    assert (dest / "cartwheel.rar").is_file()  # kept to resume from

    calls.clear()

    def record(arc, *args, **kw):
        calls.append(arc.name)
        return real_extract(arc, *args, **kw)

    monkeypatch.setattr(archives, "_extract", record)
    extract(archive, dest, nested=True, progress=False)
    assert_extracted(dest, expected)
    assert "brush_hair.rar" not in calls  # the finished class was not extracted again


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_name", ["../evil", "a/../../evil", "/abs/evil", "a\\..\\..\\evil"])
@pytest.mark.parametrize("kind", ["zip", "rar4"])
def test_path_traversal_raises_before_writing(tmp_path: Path, kind: str, bad_name: str) -> None:
    files = {"good/first.avi": b"x" * 10, bad_name: b"pwned"}
    archive = MAKERS[kind](tmp_path / "a.arc", files, [])
    dest = tmp_path / "deep" / "out"
    with pytest.raises(ArchiveError, match="unsafe member path"):
        extract(archive, dest, progress=False)
    assert not list(tmp_path.rglob("evil"))
    assert not (dest / "good").exists()  # refused before anything was written


def test_unknown_format_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "videos.rar"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="videos.rar"):
        extract(path, tmp_path / "out", progress=False)


def test_missing_archive_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        extract(tmp_path / "nope.rar", tmp_path / "out", progress=False)


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated mid-data":
        return data[:-300]  # into the last member's data, end block lost
    if how == "truncated headers":
        return data[:30]
    if how == "flipped data byte":  # CRC error in the last member
        i = len(data) - 400
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated mid-data", "truncated headers", "flipped data byte"])
@pytest.mark.parametrize("kind", ["rar4", "rar5", "zip"])
def test_corrupt_archive_raises_naming_it(tmp_path: Path, kind: str, how: str) -> None:
    files = {"a/first.avi": os.urandom(2000), "a/last.avi": os.urandom(2000)}
    good = MAKERS[kind](tmp_path / "good", files, ["a"])
    archive = tmp_path / "broken_UCF101.rar"
    archive.write_bytes(_corrupt(good.read_bytes(), how))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match="broken_UCF101.rar") as info:
        extract(archive, dest, progress=False)
    assert "corrupt" in str(info.value) or "truncated" in str(info.value)
    assert not (dest / ".extracted-broken_UCF101.rar.done").exists()
    assert not (dest / "a/last.avi").exists()
    assert not list(dest.rglob("*.partial"))


@pytest.mark.parametrize("kind", ["rar4", "rar5"])
def test_truncated_rar_is_caught_by_unrar_too(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the up-front block walk, UnRAR's own error for a cut member still surfaces."""
    monkeypatch.setattr(archives, "_check_rar_blocks", lambda archive: None)
    files = {"a/first.avi": os.urandom(2000), "a/last.avi": os.urandom(2000)}
    good = MAKERS[kind](tmp_path / "good", files, ["a"])
    archive = tmp_path / "cut.rar"
    archive.write_bytes(_corrupt(good.read_bytes(), "truncated mid-data"))
    with pytest.raises(ArchiveError, match=r"cut\.rar .*a/last\.avi"):
        extract(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out/a/first.avi").read_bytes() == files["a/first.avi"]
    assert not (tmp_path / "out/a/last.avi").exists()


def test_rar5_cut_between_members_raises(tmp_path: Path) -> None:
    """UnRAR reads a RAR 5 file cut exactly between two members as a valid, shorter archive."""
    files = {"a/first.avi": b"1" * 2000, "a/last.avi": b"2" * 2000}
    data = rar_writer.rar5_bytes(_members(files, ["a"]))
    end_of_first = data.index(b"1" * 2000) + 2000
    archive = tmp_path / "cut.rar"
    archive.write_bytes(data[:end_of_first])
    with pytest.raises(ArchiveError, match="cut.rar is truncated"):
        extract(archive, tmp_path / "out", progress=False)


def test_corrupt_rar_header_raises(tmp_path: Path) -> None:
    data = bytearray(rar_writer.rar4_bytes(_members()))
    data[data.index(b"empty.bin") + 1] ^= 0x01  # name changes, header CRC no longer matches
    archive = tmp_path / "a.rar"
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="a.rar"):
        extract(archive, tmp_path / "out", progress=False)


# ---- is_extracted, member_names -----------------------------------------------------------------


def test_is_extracted_follows_the_archive_and_survives_its_deletion(tmp_path: Path) -> None:
    archive = MAKERS["rar4"](tmp_path / "UCF101.rar")
    dest = tmp_path / "out"
    assert not archives.is_extracted(archive, dest)
    extract(archive, dest, progress=False)
    assert archives.is_extracted(archive, dest)
    os.utime(archive, ns=(1, 1))  # re-downloaded: extract it again
    assert not archives.is_extracted(archive, dest)
    extract(archive, dest, progress=False)
    archive.unlink()  # the user frees the space: the complete extraction still counts
    assert archives.is_extracted(archive, dest)
    assert not archives.is_extracted(tmp_path / "other.rar", dest)


def test_interrupted_extraction_is_not_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = MAKERS["zip"](tmp_path / "a.zip")

    def interrupted(*args: object) -> None:
        raise Interrupted

    monkeypatch.setattr(archives, "_copy", interrupted)
    with pytest.raises(Interrupted):
        extract(archive, tmp_path / "out", progress=False)
    assert not archives.is_extracted(archive, tmp_path / "out")
    archive.unlink()
    assert not archives.is_extracted(archive, tmp_path / "out")


@pytest.mark.parametrize("kind", list(MAKERS))
def test_member_names_lists_files_without_extracting(tmp_path: Path, kind: str) -> None:
    archive = MAKERS[kind](tmp_path / "a.arc")
    names = archives.member_names(archive)
    assert names == list(FILES)  # "/" separators, folders left out
    assert archives.describe_top_level(names) == "brush_hair/, cartwheel/, empty.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arc"]


def test_member_names_of_a_corrupt_archive_raises(tmp_path: Path) -> None:
    archive = tmp_path / "UCF101.rar"
    archive.write_bytes(rar_writer.rar4_bytes(_members())[:-300])
    with pytest.raises(ArchiveError, match="UCF101.rar"):
        archives.member_names(archive)


def test_zip_member_read_error_is_archive_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.txt", b"x" * 5000)
    data = bytearray(buf.getvalue())
    data[40] ^= 0xFF  # inside the deflate stream
    archive = tmp_path / "a.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="a.zip"):
        extract(archive, tmp_path / "out", progress=False)
