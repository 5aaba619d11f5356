"""Receiving a CT upload: a streamed multipart body into a private folder, with limits.

The body is parsed as it arrives (``python_multipart``), never buffered whole and never
spooled to the system temp folder: the bytes of the form field ``file`` go straight to
``<private folder>/upload<suffix>``, and the count stops the request (413) as soon as it
passes the limit. What the file is, is decided from its name's suffix and its first
bytes, before the reader sees it (415 for anything that is not NIfTI, single-file NRRD
or MetaImage, or a zip archive), so the reader (:func:`volumevlm.io.read_volume`) only
ever opens files of the kinds it is meant for.

A single-file NRRD or MetaImage header can name a separate data file anywhere on the
server's disks; such uploads are refused (415), so an upload never makes the server read
one of its own files.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volumevlm.errors import one_line
from volumevlm.serve.errors import ServiceError

UPLOAD_FIELD = "file"
# Suffix -> what the format is called in messages. .nhdr / .mhd (a header beside a
# separate data file) and DICOM folders cannot come as one uploaded file.
FORMATS: dict[str, str] = {
    ".nii.gz": "a gzipped NIfTI image",
    ".nii": "a NIfTI image",
    ".nrrd": "an NRRD image",
    ".mha": "a MetaImage (.mha) image",
    ".zip": "a zip archive of a DICOM series",
}
ACCEPTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha) or a zipped DICOM series (.zip)"
# Room for the multipart framing (boundaries, part headers) around the file itself.
FRAMING_ALLOWANCE = 64 * 1024
# How much of a file's start is looked at to tell what it is.
SNIFF_BYTES = 64 * 1024
_NIFTI1_MAGIC = b"n+1\x00"  # single-file NIfTI-1, at byte 344
_NIFTI2_MAGIC = b"n+2\x00"  # single-file NIfTI-2, at byte 4
_METAIMAGE_LINE = re.compile(rb"^\s*[A-Za-z][A-Za-z0-9_]*\s*=")
# Other formats people upload by mistake, named in the 415 message.
_KNOWN_OTHERS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG", "a PNG picture"),
    (0, b"\xff\xd8\xff", "a JPEG picture"),
    (0, b"%PDF", "a PDF document"),
    (0, b"GIF8", "a GIF picture"),
    (128, b"DICM", "a single DICOM file (zip the whole series and upload the .zip)"),
    (344, b"ni1\x00", "a NIfTI header of a .hdr/.img pair (convert it to one .nii file)"),
)


@dataclass
class Upload:
    """A received upload: ``path`` inside the request's private folder, ``name`` the
    client's file name (cleaned; for messages only), ``suffix`` its format, ``size`` bytes."""

    path: Path
    name: str
    suffix: str
    size: int


def clean_name(raw: Any) -> str:
    """The client's file name, safe to show: no folders, no control characters, short."""
    text = str(raw or "").replace("\\", "/").split("/")[-1]
    text = "".join(ch for ch in text if ch.isprintable()).strip()
    return (text[:120] or "upload")


def suffix_of(name: str) -> str | None:
    """The format suffix of a file name (".nii.gz", ...), None when it has none we know."""
    lower = name.lower()
    for suffix in FORMATS:
        if lower.endswith(suffix):
            return suffix
    return None


def _has_other_suffix(name: str) -> bool:
    return "." in name.strip(".") and suffix_of(name) is None


def _nifti_magic(head: bytes) -> bool:
    return head[344:348] == _NIFTI1_MAGIC or head[4:8] == _NIFTI2_MAGIC


def sniff(head: bytes) -> str | None:
    """The suffix the first bytes of a file say it has, or None."""
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return ".zip"
    if head[:4] == b"NRRD":
        return ".nrrd"
    if _nifti_magic(head):
        return ".nii"
    first_line = head.split(b"\n", 1)[0]
    if b"\x00" not in first_line and _METAIMAGE_LINE.match(first_line):
        return ".mha"
    return None


def _describe(head: bytes) -> str:
    for offset, magic, what in _KNOWN_OTHERS:
        if head[offset : offset + len(magic)] == magic:
            return what
    found = sniff(head)
    return FORMATS[found] if found else "an unrecognised format"


def _text_header(head: bytes, end: bytes) -> str:
    """The ASCII header of an NRRD / MetaImage file: up to ``end`` (or what was read)."""
    cut = head.find(end)
    return head[: cut if cut >= 0 else len(head)].decode("latin-1")


def check_content(path: Path, name: str, declared: str | None) -> str:
    """The format suffix of the saved upload at ``path``: its first bytes must be what its
    name says (or, without a known suffix, one of the accepted formats). Raises 415 for
    another format or an NRRD / MetaImage header pointing at a separate data file, 422
    when a gzip stream breaks within its first bytes."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    found = sniff(head)
    if declared is None:
        if found is None:
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: {_describe(head)}; upload {ACCEPTED}")
        declared = found
    elif found != declared:
        raise ServiceError(415, "unsupported_media_type",
                           f"{name}: the name says {FORMATS[declared]} but the content is {_describe(head)}")
    if declared == ".nii.gz":
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(352)
        except (OSError, EOFError, zlib.error) as err:
            raise ServiceError(422, "unreadable_volume", f"{name}: truncated or corrupt gzip data ({err})") from None
        if len(inner) >= 8 and not _nifti_magic(inner):
            raise ServiceError(415, "unsupported_media_type", f"{name}: gzip data that is not a NIfTI image")
    elif declared == ".nrrd":
        header = _text_header(head, b"\n\n")
        if re.search(r"^\s*data ?file\s*:", header, flags=re.IGNORECASE | re.MULTILINE):
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: an NRRD header pointing at a separate data file; upload an NRRD with attached data")
    elif declared == ".mha":
        header = _text_header(head, b"ElementDataFile")
        tail = head[len(header):].split(b"\n", 1)[0].decode("latin-1")
        value = tail.split("=", 1)[1].strip() if "=" in tail else None
        if value is None or value.upper() != "LOCAL":
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: a MetaImage whose data is not inside the file (ElementDataFile must be LOCAL)")
    return declared


class _PartHeaders:
    """Collects one multipart part's headers as python_multipart reports them."""

    def __init__(self):
        self.items: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()

    def field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def end(self) -> None:
        self.items[self._field.decode("latin-1").strip().lower()] = self._value.decode("utf-8", "replace").strip()
        self._field.clear()
        self._value.clear()

    def disposition(self) -> tuple[str | None, str | None]:
        """(form field name, file name) from Content-Disposition."""
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.items.get("content-disposition", ""))
        decode = lambda key: options[key].decode("utf-8", "replace") if key in options else None  # noqa: E731
        return decode(b"name"), decode(b"filename")


async def receive_upload(request, folder: Path, *, max_bytes: int, field: str = UPLOAD_FIELD) -> Upload:
    """Stream the multipart body of ``request`` and save its ``field`` file in ``folder``.

    Raises ServiceError: 415 (not multipart, or a file name of another format), 413 (the
    declared or the streamed size passes ``max_bytes``), 400 (malformed multipart, no or
    several files, an empty file).
    """
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header
    from starlette.requests import ClientDisconnect

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise ServiceError(415, "unsupported_media_type",
                           f"expected a multipart/form-data upload with the CT file in the form field {field!r}")
    limit_mb = max_bytes / 2**20
    too_large = ServiceError(413, "upload_too_large", f"upload larger than this server's limit of {limit_mb:g} MB (--max-upload-mb)")
    declared_length = request.headers.get("content-length")
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes + FRAMING_ALLOWANCE:
        raise too_large

    state: dict[str, Any] = {"headers": None, "sink": None, "files": 0, "size": 0, "name": None, "suffix": None,
                             "complete": False}
    target = folder / "upload.part"

    def on_part_begin() -> None:
        state["headers"] = _PartHeaders()

    def on_headers_finished() -> None:
        name, filename = state["headers"].disposition()
        if name != field:
            return
        state["files"] += 1
        if state["files"] > 1:
            raise ServiceError(400, "bad_request", f"more than one file in the form field {field!r}; upload one volume per request")
        client = clean_name(filename)
        if filename and _has_other_suffix(client):
            raise ServiceError(415, "unsupported_media_type", f"{client}: unsupported file type; upload {ACCEPTED}")
        state["name"], state["suffix"] = client, suffix_of(client)
        state["sink"] = open(target, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        sink = state["sink"]
        if sink is None:
            return  # another form field: not kept
        state["size"] += end - start
        if state["size"] > max_bytes:
            raise too_large
        sink.write(data[start:end])

    def on_part_end() -> None:
        if state["sink"] is not None:
            state["sink"].close()
            state["sink"] = None
            state["complete"] = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": lambda d, s, e: state["headers"].field(d, s, e),
        "on_header_value": lambda d, s, e: state["headers"].value(d, s, e),
        "on_header_end": lambda: state["headers"].end(),
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(options[b"boundary"], callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + FRAMING_ALLOWANCE:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise ServiceError(400, "bad_request", f"malformed multipart body ({one_line(err)})") from None
    except ClientDisconnect:
        raise ServiceError(400, "bad_request", "the client closed the connection before the upload ended") from None
    finally:
        if state["sink"] is not None:
            state["sink"].close()
    if state["files"] == 0:
        raise ServiceError(400, "bad_request", f"no file in the form field {field!r} (send multipart/form-data with {field}=@CT)")
    if not state["complete"]:
        raise ServiceError(400, "bad_request", f"{state['name']}: the body ended inside the file (a truncated upload)")
    if state["size"] == 0:
        raise ServiceError(400, "bad_request", f"{state['name']}: the uploaded file is empty")
    suffix = check_content(target, state["name"], state["suffix"])
    path = target.rename(folder / f"upload{suffix}")
    return Upload(path=path, name=state["name"], suffix=suffix, size=state["size"])
