"""Resumable, safe extraction of the UCF101 / HMDB51 archives (zip and RAR).

The dataset builders (``tfds_builders/layouts.py``) find the archives in the user's manual dir
and call :func:`extract`, which guarantees that:

* the archives are only read, never modified or deleted (the manual dir may be read-only);
* every file is written under a temporary name and renamed into place when complete, so a file
  with its final name is always whole, whatever interrupts the run;
* a re-run after an interruption skips the files already extracted (same name and size) and
  finishes the rest; after a complete run a marker file makes the next run a no-op;
* member paths cannot escape the destination (absolute paths and ``..`` raise);
* corruption (bad CRC, truncated archive) raises :class:`ArchiveError` naming the archive instead
  of producing a shorter extraction that looks complete.

The format is detected from the magic bytes, not the file name. RAR (4.x and 5) is decoded with
the UnRAR library through unrar-cffi, zip with :mod:`zipfile`.

Typical use::

    if not is_extracted(archive, dest):
        check_contents(member_names(archive))  # before writing gigabytes
        extract(archive, dest, nested=True)  # hmdb51_org.rar: dest/<class>/<video>.avi
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["ArchiveError", "describe_top_level", "extract", "is_extracted", "member_names"]

Format = Literal["zip", "rar"]

_MAGICS: tuple[tuple[bytes, Format], ...] = (
    (b"Rar!\x1a\x07\x00", "rar"),  # RAR 1.5 - 4.x
    (b"Rar!\x1a\x07\x01\x00", "rar"),  # RAR 5
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip: only the end-of-central-directory record
)
_ARCHIVE_SUFFIXES = (".rar", ".zip")
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive is of an unknown format, corrupt or truncated, or holds an unsafe member path."""


@dataclasses.dataclass(frozen=True)
class _Member:
    """One archive entry, as listed by the archive (name with ``/`` separators)."""

    name: str
    size: int
    packed_size: int
    crc: int
    is_dir: bool


# A function that streams the current member's data into a binary file, calling back with the
# number of bytes written after each chunk (for the progress bar).
_CopyFn = Callable[[BinaryIO, Callable[[int], object]], None]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def extract(archive: Path, dest: Path, *, nested: bool = False, progress: bool = True) -> Path:
    """Extract a ``.zip`` or ``.rar`` archive into ``dest``, resumably; returns ``dest``.

    Args:
        archive: the archive; its format is detected from its first bytes. It is only read.
        dest: the folder to extract into (created if needed). Member ``a/b.avi`` lands at
            ``dest/a/b.avi``.
        nested: also extract member archives (``*.rar`` / ``*.zip`` inside the archive, such as
            the per-class RARs of ``hmdb51_org.rar``), each into the folder it lies in, and
            delete them once their own extraction completed. Applies recursively.
        progress: show a tqdm progress bar (bytes written).

    A complete extraction writes ``dest/.extracted-<archive name>.done`` holding the archive's
    size and mtime; while they match, calling again returns at once. An interrupted run, re-run,
    keeps the files already present with the right size and extracts the rest.

    Raises:
        FileNotFoundError: ``archive`` does not exist.
        ArchiveError: (a ``ValueError``) unknown format, corrupt or truncated archive, encrypted
            or multi-volume RAR, or a member path that is absolute or escapes ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    fmt = _detect_format(archive)
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest, archive.name):
        _extract(archive, fmt, dest, _fingerprint(archive), nested=nested, progress=progress)
    return dest


def is_extracted(archive: Path, dest: Path) -> bool:
    """Whether ``archive`` was completely extracted into ``dest`` by :func:`extract`.

    While the archive exists, its completion marker in ``dest`` must match its size and mtime
    (a re-downloaded archive counts as not extracted). Once the user deleted the archive, the
    marker alone vouches for the extraction, so a later build can still use the extracted copy.
    """
    archive, dest = Path(archive), Path(dest)
    marker = dest / _marker_name(archive.name)
    if archive.is_file():
        return _read_text(marker) == _fingerprint(archive)
    return marker.is_file()


def member_names(archive: Path) -> list[str]:
    """The names of the files in ``archive`` (``/`` separators, folders left out), headers only.

    Lets a caller check what an archive holds before extracting gigabytes of it.

    Raises:
        ArchiveError: unknown format, corrupt or truncated archive.
    """
    archive = Path(archive)
    members = _list_members(archive, _detect_format(archive))
    return [m.name.replace("\\", "/") for m in members if not m.is_dir]


def describe_top_level(names: Sequence[str], limit: int = 20) -> str:
    """``"UCF-101/, readme.txt"``: the top level of an archive's member names, for messages."""
    members = [_Member(name, 0, 0, 0, False) for name in names]
    return _describe(_top_level(members), limit)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def _extract(
    archive: Path,
    fmt: Format,
    dest: Path,
    fingerprint: str,
    *,
    nested: bool,
    progress: bool,
    inner: bool = False,
) -> None:
    """Extract ``archive`` into ``dest`` unless its marker there holds ``fingerprint``.

    ``inner``: ``archive`` was itself extracted from an archive (its progress bar is transient).
    """
    marker = dest / _marker_name(archive.name)
    if _read_text(marker) == fingerprint:
        return
    members = _list_members(archive, fmt)
    # Check every path before writing anything, so a malicious archive leaves no trace.
    for member in members:
        _target(dest, member, archive)
    total = sum(m.size for m in members if not m.is_dir)

    with (
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"Extracting {archive.name}",
            disable=not progress,
            leave=not inner,
        ) as bar,
        _entries(archive, fmt) as entries,
    ):
        for member, copy in entries:
            target = _target(dest, member, archive)
            if member.is_dir:
                target.mkdir(parents=True, exist_ok=True)
            elif nested and target.name.lower().endswith(_ARCHIVE_SUFFIXES):
                _extract_member_archive(archive, member, copy, target, bar, progress)
            elif _is_complete(target, member.size):
                # Written by an earlier, interrupted run (whole: files only get their final name
                # once complete). A temp file is only left if that run was killed mid-member.
                _partial_name(target).unlink(missing_ok=True)
                bar.update(member.size)
            else:
                _write_atomically(target, lambda f, copy=copy: _copy(archive, copy, f, bar.update))
    # The files were not fsync'ed one by one; flush them all before the marker that vouches for
    # them, so that a power cut can never leave a marker over empty or missing files.
    if hasattr(os, "sync"):
        os.sync()
    _write_atomically(marker, lambda f: f.write(fingerprint.encode()))


def _extract_member_archive(
    archive: Path,
    member: _Member,
    copy: _CopyFn,
    target: Path,
    bar: tqdm,
    progress: bool,
) -> None:
    """Extract the archive ``member`` (at ``target`` once written) into ``target.parent``."""
    # The inner archive is gone once extracted, so its marker identifies it by its entry in the
    # outer archive instead of by its own size and mtime.
    fingerprint = f"member {member.name} of {archive.name}: size={member.size} crc={member.crc:08x}"
    if _read_text(target.parent / _marker_name(target.name)) == fingerprint:
        bar.update(member.size)
        return
    if _is_complete(target, member.size):
        # Kept by an interrupted run to resume from: no need to copy it out again.
        bar.update(member.size)
    else:
        _write_atomically(target, lambda f: _copy(archive, copy, f, bar.update))
    _extract(
        target,
        _detect_format(target),
        target.parent,
        fingerprint,
        nested=True,
        progress=progress,
        inner=True,
    )
    target.unlink()


def _copy(archive: Path, copy: _CopyFn, out: BinaryIO, on_bytes: Callable[[int], object]) -> None:
    """Run ``copy``, turning the zip decoder's corruption errors into :class:`ArchiveError`."""
    try:
        copy(out, on_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise ArchiveError(f"{archive} is corrupt or truncated: {err}") from err


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through a temporary sibling renamed into place once complete.

    The temporary name is fixed (not random) so that a run killed outright leaves at most one
    stale temp file per member, which the re-run overwrites; it starts with a dot so that globs
    like ``*.avi`` never see it. No fsync per file (slow for 13,320 videos): a file lost or
    emptied by a power cut has the wrong size and is extracted again by the next run.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(target)
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def _is_complete(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def _marker_name(archive_name: str) -> str:
    return f".extracted-{archive_name}.done"


def _lock_name(archive_name: str) -> str:
    return f".extracting-{archive_name}.lock"


def _fingerprint(archive: Path) -> str:
    st = archive.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def _locked(dest: Path, archive_name: str) -> Iterator[None]:
    """Hold an exclusive lock so that two processes never extract the same archive into ``dest``
    at once (they would write the same temporary files). The lock file stays behind."""
    with open(dest / _lock_name(archive_name), "a") as lock:
        if fcntl is None:  # not POSIX: no locking
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _target(dest: Path, member: _Member, archive: Path) -> Path:
    """The path ``member`` extracts to, refusing names that would land outside ``dest``."""
    # Backslashes are separators too: zips made on Windows may use them. Treating them as such
    # can only make a path more nested, never escape.
    name = member.name.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":"  # "C:/..." from Windows
    if name.startswith("/") or drive or ".." in parts:
        raise ArchiveError(f"{archive}: unsafe member path {member.name!r} (escapes {dest})")
    if not parts and not member.is_dir:
        raise ArchiveError(f"{archive}: member with an empty name")
    return dest.joinpath(*parts)


def _top_level(members: Sequence[_Member]) -> dict[str, bool]:
    """The top-level names of an archive, each mapped to whether it is a folder."""
    top: dict[str, bool] = {}
    for m in members:
        parts = [p for p in m.name.replace("\\", "/").split("/") if p not in ("", ".")]
        if parts:
            top[parts[0]] = top.get(parts[0], False) or m.is_dir or len(parts) > 1
    return top


def _describe(top: dict[str, bool], limit: int = 20) -> str:
    names = [f"{n}/" if is_dir else n for n, is_dir in sorted(top.items())]
    if not names:
        return "nothing"
    more = f" ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def _detect_format(path: Path) -> Format:
    """``"zip"`` or ``"rar"`` from the file's magic bytes; :class:`ArchiveError` otherwise."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, fmt in _MAGICS:
        if head.startswith(magic):
            return fmt
    raise ArchiveError(
        f"{path} is not a zip or RAR archive (it starts with {head!r}; "
        "expected b'Rar!\\x1a\\x07' or b'PK\\x03\\x04')"
    )


def _list_members(archive: Path, fmt: Format) -> list[_Member]:
    """All entries of ``archive``, reading headers only; raises on a corrupt or truncated one."""
    if fmt == "zip":
        with _open_zip(archive) as zf:
            return [_zip_member(archive, info) for info in zf.infolist()]
    _check_rar_blocks(archive)
    with _RarArchive(archive, list_only=True) as rar:
        return list(rar.headers())


@contextlib.contextmanager
def _entries(archive: Path, fmt: Format) -> Iterator[Iterator[tuple[_Member, _CopyFn]]]:
    """The entries of ``archive`` in order, each with a function that streams its data.

    For RAR an entry's data can only be read while it is the current one, before the iteration
    moves on; entries whose data is not read are skipped (without decoding, in a non-solid
    archive).
    """
    if fmt == "zip":
        with _open_zip(archive) as zf:
            yield ((_zip_member(archive, info), _zip_copier(zf, info)) for info in zf.infolist())
    else:
        with _RarArchive(archive, list_only=False) as rar:
            yield ((m, rar.copy_current) for m in rar.headers())


# ---- zip ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_zip(archive: Path) -> Iterator[zipfile.ZipFile]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError) as err:
        raise ArchiveError(f"{archive} is corrupt or truncated: {err}") from err
    with zf:
        yield zf


def _zip_member(archive: Path, info: zipfile.ZipInfo) -> _Member:
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted; not supported")
    return _Member(info.filename, info.file_size, info.compress_size, info.CRC, info.is_dir())


def _zip_copier(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _CopyFn:
    def copy(out: BinaryIO, on_bytes: Callable[[int], object]) -> None:
        # zipfile checks the CRC when the member has been read to its end.
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                on_bytes(len(chunk))

    return copy


# ---- RAR ------------------------------------------------------------------------------------

# UnRAR library codes (dll.hpp).
_ERAR_SUCCESS = 0
_ERAR_END_ARCHIVE = 10
_ERAR_MESSAGES = {
    11: "out of memory",
    12: "bad data: CRC error or truncated archive",
    13: "not a valid RAR archive",
    14: "unknown archive format (damaged or truncated header?)",
    15: "cannot open the archive (or a volume of it)",
    16: "cannot create a file",
    17: "cannot close a file",
    18: "read error",
    19: "write error",
    20: "buffer too small",
    21: "unknown error",
    22: "password required",
    23: "cannot open a reference file",
    24: "wrong password",
}
_RHDF_SPLIT = 0x01 | 0x02  # split before / after: a multi-volume archive
_RHDF_ENCRYPTED = 0x04
_RHDF_DIRECTORY = 0x20
_UCM_PROCESSDATA = 1


def _unrar():
    """The cffi handles of the UnRAR library bundled with unrar-cffi."""
    try:
        # Importing unrarlib registers the Python callback that UnRAR's C callback stub calls.
        from unrar.cffi import unrarlib
        from unrar.cffi._unrarlib import ffi, lib
    except ImportError as err:  # pragma: no cover - it is in requirements.txt
        raise ImportError(
            "extracting RAR archives needs unrar-cffi: pip install unrar-cffi"
        ) from err
    return unrarlib, ffi, lib


def _check_rar_blocks(archive: Path) -> None:
    """Walk the chain of RAR blocks (headers only, seeking over data) to catch a truncated file.

    UnRAR notices a file cut inside a member's data only when it reaches that member, possibly
    hours into the extraction, and it reads a file cut between two members, or inside a RAR 5
    header, as a shorter but valid archive. The chain of block sizes tells at once.
    """
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        rar5 = f.read(8) == b"Rar!\x1a\x07\x01\x00"
        pos = start = 8 if rar5 else 7
        while pos < size:
            start = pos
            f.seek(pos)
            if rar5:
                # CRC32, header size (vint), header type, flags, [extra size], [data size].
                head = f.read(4 + 3)
                header_size, after = _read_vint(head, 4)
                if header_size > 1 << 21:  # the format caps headers at 2 MB
                    raise ArchiveError(f"{archive} is corrupt: bad block header at byte {pos}")
                f.seek(pos + after)
                header = f.read(header_size)
                if after == 4 or len(header) < header_size:
                    break
                head_type, i = _read_vint(header, 0)
                flags, i = _read_vint(header, i)
                if flags & 0x0001:  # extra area present
                    _, i = _read_vint(header, i)
                data_size = _read_vint(header, i)[0] if flags & 0x0002 else 0
                if head_type in (4, 5):  # encrypted headers follow (unsupported) / end of archive
                    return
                pos += after + header_size + data_size
            else:
                # HEAD_CRC, HEAD_TYPE, HEAD_FLAGS, HEAD_SIZE, [ADD_SIZE], ... [HIGH_PACK_SIZE].
                head = f.read(36)
                if len(head) < 7:
                    break
                head_type, flags, header_size = struct.unpack_from("<BHH", head, 2)
                data_size = 0
                if flags & 0x8000:  # LONG_BLOCK: ADD_SIZE (PACK_SIZE of a file) follows
                    if len(head) < 11:
                        break
                    data_size = struct.unpack_from("<I", head, 7)[0]
                    if head_type in (0x74, 0x7A) and flags & 0x0100 and len(head) >= 36:
                        data_size += struct.unpack_from("<I", head, 32)[0] << 32  # LHD_LARGE
                if head_type == 0x7B or (head_type == 0x73 and flags & 0x0080):
                    return  # end of archive / encrypted headers follow (unsupported)
                if header_size < 7:
                    raise ArchiveError(f"{archive} is corrupt: bad block header at byte {pos}")
                pos += header_size + data_size
        # RAR 1.5 - 2.x wrote no end-of-archive block: a RAR 4 chain may end exactly at the end.
        if pos == size and not rar5:
            return
    raise ArchiveError(
        f"{archive} is truncated: the block at byte {start} of this {size}-byte file is cut off, "
        "or the end-of-archive block is missing; download it again"
    )


def _read_vint(buf: bytes, i: int) -> tuple[int, int]:
    """A RAR 5 variable-length integer at ``buf[i:]``: (value, index after it); (0, i) if cut."""
    value = shift = 0
    for j in range(i, min(len(buf), i + 10)):
        value |= (buf[j] & 0x7F) << shift
        shift += 7
        if not buf[j] & 0x80:
            return value, j + 1
    return 0, i


class _RarArchive:
    """A RAR archive read through the UnRAR library calls that unrar-cffi exposes.

    unrar-cffi's own ``RarFile`` is not used: its ``open()`` re-scans the archive for each member
    and gathers the whole member in memory by repeated ``bytes`` concatenation, and its header
    loop stops silently on any error code, so a corrupt or truncated archive reads as a shorter,
    valid one. Here data is streamed to the output file and every error code raises.
    """

    def __init__(self, path: Path, *, list_only: bool) -> None:
        self.path = path
        self._unrarlib, self._ffi, self._lib = _unrar()
        lib = self._lib
        mode = lib.C_RAR_OM_LIST_INCSPLIT if list_only else lib.C_RAR_OM_EXTRACT
        self._open_data = self._unrarlib.RAROpenArchiveDataEx(os.fspath(path), mode)
        self._handle = lib.RAROpenArchiveEx(self._open_data.value)
        result = self._open_data.value.OpenResult
        if result != _ERAR_SUCCESS:
            if self._handle != self._ffi.NULL:
                lib.RARCloseArchive(self._handle)
            self._fail(result)
        self._pending = False  # whether the current member's data is still to be processed
        self._name = ""

    def __enter__(self) -> _RarArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lib.RARCloseArchive(self._handle)

    def _fail(self, code: int, member: str | None = None) -> None:
        what = f" (member {member!r})" if member else ""
        reason = _ERAR_MESSAGES.get(code, f"UnRAR error {code}")
        raise ArchiveError(f"{self.path} is corrupt or unreadable{what}: {reason}")

    def headers(self) -> Iterator[_Member]:
        """Each member in turn; its data can be read with :meth:`copy_current` meanwhile."""
        lib = self._lib
        while True:
            data = self._unrarlib.RARHeaderDataEx()
            result = lib.RARReadHeaderEx(self._handle, data)
            if result == _ERAR_END_ARCHIVE:
                return
            if result != _ERAR_SUCCESS:
                # UnRAR reports a damaged header only when asked for the next one, so every
                # listing must run to the end to notice it.
                self._fail(result)
            d = data[0]
            name = self._ffi.string(d.FileNameW)
            if d.Flags & _RHDF_ENCRYPTED:
                raise ArchiveError(f"{self.path}: member {name!r} is encrypted; not supported")
            if d.Flags & _RHDF_SPLIT:
                raise ArchiveError(f"{self.path} is part of a multi-volume archive; not supported")
            self._name = name
            self._pending = True
            yield _Member(
                name=name,
                size=d.UnpSize + (d.UnpSizeHigh << 32),
                packed_size=d.PackSize + (d.PackSizeHigh << 32),
                crc=d.FileCRC,
                is_dir=bool(d.Flags & _RHDF_DIRECTORY),
            )
            if self._pending:
                self._process(lib.C_RAR_SKIP, None)

    def copy_current(self, out: BinaryIO, on_bytes: Callable[[int], object]) -> None:
        """Stream the current member's data into ``out``; UnRAR checks its CRC at the end."""
        ffi = self._ffi

        def write(chunk_ptr: object, size: int) -> None:
            out.write(ffi.buffer(ffi.cast("char *", chunk_ptr), size))
            on_bytes(size)

        self._process(self._lib.C_RAR_TEST, write)

    def _process(self, operation: int, write: Callable[[object, int], None] | None) -> None:
        if not self._pending:
            raise RuntimeError("a RAR member's data can be processed only once")
        self._pending = False
        ffi, lib = self._ffi, self._lib
        errors: list[BaseException] = []

        def callback(msg: int, p1: object, p2: int) -> int:
            # An exception must not escape into C: cffi would print it and carry on. Keep it,
            # abort the extraction (-1), and raise it once back in Python.
            if msg != _UCM_PROCESSDATA:
                return -1  # a password or the next volume is asked for: not supported
            try:
                if write is not None:
                    write(p1, p2)
            except BaseException as err:  # re-raised below, KeyboardInterrupt included
                errors.append(err)
                return -1
            return 1

        handle = ffi.new_handle(callback)  # kept alive by this local until the call returns
        lib.RARSetCallbackPtr(self._handle, lib.PyUNRARCALLBACKStub, handle)
        try:
            result = lib.RARProcessFileW(self._handle, operation, ffi.NULL, ffi.NULL)
        finally:
            lib.RARSetCallbackPtr(self._handle, ffi.NULL, ffi.NULL)
        if errors:
            raise errors[0]
        if result != _ERAR_SUCCESS:
            self._fail(result, self._name)
