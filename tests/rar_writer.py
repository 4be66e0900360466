"""A minimal pure-Python writer of RAR archives with the "store" method, for tests only.

No `rar` tool is installed on the test machines (it is non-free), so the tests of
:mod:`vcp_jax.data.archives` build their RAR fixtures with this module and read them back with
the real decoder the project uses (unrar-cffi). Only what the tests need is written: regular files
and directories, stored uncompressed, no solid mode, volumes, encryption, comments or recovery
records.

Two formats are supported:

* RAR 1.5-4.x (``write_rar4``), the format of the UCF101 and HMDB51 archives, following the RAR
  technote: marker block, archive header (type 0x73), one file header (type 0x74) per member
  followed by its data, end-of-archive block (type 0x7B). Every block starts with HEAD_CRC, the low
  16 bits of the CRC32 of the header from HEAD_TYPE to its end.
* RAR 5.0 (``write_rar5``): signature, main archive header (type 1), file headers (type 2) each
  followed by the data area, end-of-archive header (type 5). Header fields are little-endian
  "vint"s (7 bits a byte, high bit = more bytes follow) and every header starts with the full
  CRC32 of the header from its size field on.

Member names are given with ``/`` as the separator. RAR 4 stores ``\\`` on Windows hosts (unrar on
Unix turns it back into ``/``), RAR 5 always stores ``/``.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

RAR4_MARKER = b"Rar!\x1a\x07\x00"
RAR5_SIGNATURE = b"Rar!\x1a\x07\x01\x00"

# Host OS codes written into file headers.
RAR4_HOST_MSDOS, RAR4_HOST_WIN32, RAR4_HOST_UNIX = 0, 2, 3
RAR5_HOST_WINDOWS, RAR5_HOST_UNIX = 0, 1

# RAR 4 file header flags (technote: "LHD_*").
_LHD_DIRECTORY = 0x00E0  # all three dictionary-size bits set means "this is a directory"
_LHD_UNICODE = 0x0200  # name is UTF-8 (when it holds no NUL byte, as unrar reads it)
_LONG_BLOCK = 0x8000  # ADD_SIZE (here PACK_SIZE) follows the fixed header

#: A member: (name, data); data ``None`` makes a directory entry.
Member = tuple[str, bytes | None]

_DOS_EPOCH = (1980, 1, 1, 0, 0, 0)


def _dos_time(mtime: float) -> int:
    """The 32-bit MS-DOS date/time RAR 4 stores (local time, 2 s resolution)."""
    t = time.localtime(mtime)
    year, month, day, hour, minute, second = t[:6]
    if year < 1980:
        year, month, day, hour, minute, second = _DOS_EPOCH
    return (year - 1980) << 25 | month << 21 | day << 16 | hour << 11 | minute << 5 | second // 2


def _rar4_block(head_type: int, flags: int, body: bytes) -> bytes:
    """One RAR 4 block header: HEAD_CRC, HEAD_TYPE, HEAD_FLAGS, HEAD_SIZE, then ``body``."""
    head_size = 7 + len(body)
    after_crc = struct.pack("<BHH", head_type, flags, head_size) + body
    return struct.pack("<H", zlib.crc32(after_crc) & 0xFFFF) + after_crc


def rar4_bytes(
    members: Iterable[Member],
    *,
    host_os: int = RAR4_HOST_UNIX,
    unp_ver: int = 29,
    mtime: float = 1_300_000_000.0,
) -> bytes:
    """The bytes of a RAR 4 archive storing ``members`` uncompressed, in the given order."""
    out = bytearray(RAR4_MARKER)
    # Archive header: HEAD_FLAGS 0 (not a volume, not solid), RESERVED1 (2 bytes), RESERVED2 (4).
    out += _rar4_block(0x73, 0, b"\x00" * 6)
    windows = host_os in (RAR4_HOST_MSDOS, RAR4_HOST_WIN32)
    for name, data in members:
        is_dir = data is None
        payload = b"" if is_dir else data
        if len(payload) >= 1 << 32:
            raise ValueError("members of 4 GiB or more need HIGH_PACK_SIZE; not supported")
        stored_name = name.replace("/", "\\") if windows else name
        name_bytes = stored_name.encode("utf-8")
        flags = _LONG_BLOCK
        if not name_bytes.isascii():
            flags |= _LHD_UNICODE
        if is_dir:
            flags |= _LHD_DIRECTORY
            attr = 0x10 if windows else 0o040755  # FILE_ATTRIBUTE_DIRECTORY / S_IFDIR|0755
        else:
            attr = 0x20 if windows else 0o100644  # FILE_ATTRIBUTE_ARCHIVE / S_IFREG|0644
        body = struct.pack(
            "<IIBIIBBHI",
            len(payload),  # PACK_SIZE (stored: same as UNP_SIZE)
            len(payload),  # UNP_SIZE
            host_os,
            zlib.crc32(payload),  # FILE_CRC
            _dos_time(mtime),  # FTIME
            unp_ver,  # UNP_VER: version needed to extract (20 = RAR 2.0, 29 = RAR 3.x)
            0x30,  # METHOD: 0x30 = store
            len(name_bytes),  # NAME_SIZE
            attr,  # ATTR
        )
        out += _rar4_block(0x74, flags, body + name_bytes)
        out += payload
    # End of archive block; 0x4000 = "skip if unknown", as rar writes it.
    out += _rar4_block(0x7B, 0x4000, b"")
    return bytes(out)


def _vint(value: int) -> bytes:
    """RAR 5 variable-length integer: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _rar5_header(fields: bytes) -> bytes:
    """One RAR 5 header: CRC32, header size (vint), then ``fields`` (from HEADER_TYPE on)."""
    size_and_fields = _vint(len(fields)) + fields
    return struct.pack("<I", zlib.crc32(size_and_fields)) + size_and_fields


def rar5_bytes(
    members: Iterable[Member],
    *,
    host_os: int = RAR5_HOST_UNIX,
    mtime: float = 1_300_000_000.0,
) -> bytes:
    """The bytes of a RAR 5 archive storing ``members`` uncompressed, in the given order."""
    out = bytearray(RAR5_SIGNATURE)
    # Main archive header: type 1, header flags 0, archive flags 0 (no volume, not solid).
    out += _rar5_header(_vint(1) + _vint(0) + _vint(0))
    for name, data in members:
        is_dir = data is None
        payload = b"" if is_dir else data
        name_bytes = name.encode("utf-8")
        # File flags: 0x0001 directory, 0x0002 Unix mtime present, 0x0004 data CRC32 present.
        file_flags = 0x0002 | (0x0001 if is_dir else 0x0004)
        if host_os == RAR5_HOST_UNIX:
            attr = 0o040755 if is_dir else 0o100644
        else:
            attr = 0x10 if is_dir else 0x20
        fields = (
            _vint(2)  # HEADER_TYPE: file
            + _vint(0x0002)  # HEADER_FLAGS: a data area follows the header
            + _vint(len(payload))  # DATA_SIZE
            + _vint(file_flags)
            + _vint(len(payload))  # UNPACKED_SIZE
            + _vint(attr)
            + struct.pack("<I", int(mtime))
            + (b"" if is_dir else struct.pack("<I", zlib.crc32(payload)))
            # COMPRESSION_INFO: algorithm version 0, not solid, method 0 (store), dictionary 0.
            + _vint(0)
            + _vint(host_os)
            + _vint(len(name_bytes))
            + name_bytes
        )
        out += _rar5_header(fields)
        out += payload
    # End of archive header: type 5, header flags 0, end-of-archive flags 0 (last volume).
    out += _rar5_header(_vint(5) + _vint(0) + _vint(0))
    return bytes(out)


def write_rar4(path: Path, members: Iterable[Member], **kwargs) -> Path:
    """Write a RAR 4 store-method archive of ``members`` to ``path``; returns ``path``."""
    path.write_bytes(rar4_bytes(members, **kwargs))
    return path


def write_rar5(path: Path, members: Iterable[Member], **kwargs) -> Path:
    """Write a RAR 5 store-method archive of ``members`` to ``path``; returns ``path``."""
    path.write_bytes(rar5_bytes(members, **kwargs))
    return path
