"""Unpacking compressed inputs with the unpacked size counted as it is produced.

A gzip or zip header can say anything about the size of what it holds; a few megabytes
of compressed zeros can inflate to gigabytes. These functions write what they unpack to
files in a folder the caller owns, a chunk at a time, and stop with
:class:`~volumevlm.errors.TooLargeError` the moment the running count passes the limit,
so memory stays at one chunk and disk at the limit, whatever the archive claims.
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
import zlib
from pathlib import Path

from volumevlm.errors import InputError, TooLargeError, one_line

CHUNK_BYTES = 1 << 20
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _copy_counted(read, write, *, limit: int, counted: int, source: str, what: str) -> int:
    """Copy ``read(CHUNK_BYTES)`` chunks to ``write`` until EOF; the running total from
    ``counted`` must stay within ``limit``. Returns the new total."""
    while True:
        chunk = read(CHUNK_BYTES)
        if not chunk:
            return counted
        counted += len(chunk)
        if counted > limit:
            raise TooLargeError(source, f"{what} unpacks to more than {limit} bytes (the limit)")
        write(chunk)


def inflate_gzip(path: str | os.PathLike, out: str | os.PathLike, *, max_bytes: int, source: str | None = None) -> int:
    """Decompress the gzip file ``path`` into ``out``; the number of bytes written.

    Raises TooLargeError past ``max_bytes`` of output (``out`` is removed then) and
    InputError for a broken or truncated gzip stream."""
    source = source or str(path)
    out = Path(out)
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            return _copy_counted(src.read, dst.write, limit=max_bytes, counted=0, source=source, what="the gzip stream")
    except (OSError, EOFError, zlib.error) as err:
        out.unlink(missing_ok=True)
        raise InputError(source, "truncated or corrupt gzip data", detail=one_line(err)) from None
    except TooLargeError:
        out.unlink(missing_ok=True)
        raise


def unpack_zip(path: str | os.PathLike, folder: str | os.PathLike, *, max_bytes: int, max_members: int = 100_000,
               source: str | None = None) -> list[Path]:
    """Unpack the regular files of the zip archive ``path`` into ``folder`` (flat).

    Each member is written under a fresh name made from its index and the last part of
    its stored name, so no stored path (absolute, ``..``, a link) can place a file
    outside ``folder`` or over another. Folder entries are skipped. The bytes are
    counted while inflating: past ``max_bytes`` in all, TooLargeError. Encrypted members,
    more than ``max_members`` entries or a broken archive: InputError."""
    source = source or str(path)
    folder = Path(folder)
    written: list[Path] = []
    counted = 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > max_members:
                raise TooLargeError(source, f"a zip archive of {len(members)} entries (at most {max_members})")
            for index, info in enumerate(members):
                if info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    raise InputError(source, "an encrypted zip archive")
                stem = _UNSAFE_NAME.sub("_", info.filename.replace("\\", "/").rsplit("/", 1)[-1])[:80]
                target = folder / f"{index:06d}_{stem or 'member'}"
                with archive.open(info) as src, open(target, "xb") as dst:
                    counted = _copy_counted(src.read, dst.write, limit=max_bytes, counted=counted, source=source,
                                            what="the zip archive")
                written.append(target)
    # zipfile raises NotImplementedError for a compression method it cannot inflate.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, zlib.error) as err:
        raise InputError(source, "not a readable zip archive", detail=one_line(err)) from None
    return written

