"""Receiving a CT upload: a streamed multipart body into a private folder, with limits.

The body is parsed as it arrives (``python_multipart``), never buffered whole and never
spooled to the system temp folder: the bytes of the form field ``file`` go straight to
``<private folder>/upload.part``; the count stops the request (413) as soon as it passes
the limit, and a client slower than :class:`UploadPace` is dropped (408).

Then :func:`check_content` (on a reading thread) decides what the file is from its
name's suffix and its first bytes (415 for anything that is not NIfTI, single-file NRRD
or MetaImage, or a zip archive) and prepares it for THE reader
(:func:`volumevlm.io.read_volume`), which only ever opens files of the kinds it is meant
for. An NRRD or MetaImage header can name a separate data file anywhere on the server's
disks: the whole header is parsed, line by line, and any reference outside the upload,
wherever it stands, is refused (415) before the reader opens the file. Compressed
uploads (.nii.gz, .zip) are unpacked here, counted as they inflate, never past the
limits (413).
"""

from __future__ import annotations

import asyncio
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
    ".dcm": "a DICOM file (an enhanced multi-frame CT)",
}
ACCEPTED = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha), a zipped DICOM series (.zip) "
            "or an enhanced multi-frame CT (.dcm)")
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
    (344, b"ni1\x00", "a NIfTI header of a .hdr/.img pair (convert it to one .nii file)"),
)


@dataclass
class Upload:
    """A received upload: ``path`` inside the request's private folder, ``name`` the
    client's file name (cleaned; for messages only), ``suffix`` its format, ``size`` bytes."""

    path: Path
    name: str
    suffix: str | None
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
    if head[128:132] == b"DICM":
        return ".dcm"
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


# The NRRD fields (teem's list, names compared without spaces and case) that stay inside
# the file. "data file" is not among them: it points the reader at another file.
_NRRD_FIELDS = frozenset({
    "content", "number", "type", "blocksize", "dimension", "space", "spacedimension", "sizes", "spacings",
    "thicknesses", "axismins", "axismaxs", "centers", "centerings", "kinds", "labels", "units", "min", "max",
    "oldmin", "oldmax", "endian", "encoding", "lineskip", "byteskip", "sampleunits", "spaceunits", "spaceorigin",
    "spacedirections", "measurementframe",
})
_NRRD_MAGIC = re.compile(rb"NRRD000[1-5]")
_METAIMAGE_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)")
_METAIMAGE_LOCAL = re.compile(r"ElementDataFile\s*=\s*LOCAL\s*")
# Longest header an upload may have; a CT header is a few hundred bytes.
MAX_HEADER_BYTES = 1 << 20


def _header_lines(path: Path, name: str, what: str, last_line):
    """The text lines of the header of the NRRD / MetaImage file at ``path``, up to and
    including the one for which ``last_line(line)`` is true (that line is not yielded
    for NRRD's blank line). Every line must end in LF or CR LF: a bare CR is a line end
    for some readers and not for others, and a check and a reader that split lines
    differently can be told apart by a crafted file, so such headers are refused."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES + 1)
    lines: list[str] = []
    at = 0
    while True:
        cut = head.find(b"\n", at)
        if cut < 0:
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: {what} header that does not end within its first {MAX_HEADER_BYTES // 1024} KiB")
        raw = head[at:cut]
        at = cut + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\r" in raw:
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: {what} header with a bare CR line end; save it with LF line ends")
        if any(byte < 0x20 and byte != 0x09 or byte == 0x7F for byte in raw):
            raise ServiceError(415, "unsupported_media_type", f"{name}: {what} header with control characters")
        line = raw.decode("latin-1")
        if last_line(line):
            return lines, line
        lines.append(line)


def _check_nrrd_header(path: Path, name: str) -> None:
    """Refuse (415) an NRRD whose header names a separate data file, or holds a field we
    do not know (so a new way of naming one cannot slip through), wherever it stands."""
    lines, _ = _header_lines(path, name, "an NRRD", lambda line: line.strip() == "")
    if not lines or not _NRRD_MAGIC.fullmatch(lines[0].strip().encode("latin-1")):
        raise ServiceError(415, "unsupported_media_type", f"{name}: not an NRRD file (no NRRD000N first line)")
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            continue
        field, colon, _ = text.partition(":")
        key = "".join(field.split()).lower()
        if key in ("datafile", "data_file"):
            raise ServiceError(415, "unsupported_media_type",
                               f"{name}: an NRRD header pointing at a separate data file; upload an NRRD with attached data")
        if colon and text[len(field):].startswith(":="):
            continue  # a key/value pair: free text the reader keeps as metadata
        if not colon or key not in _NRRD_FIELDS:
            raise ServiceError(415, "unsupported_media_type", f"{name}: an NRRD header line that is not a known field")


def _check_metaimage_header(path: Path, name: str) -> None:
    """Refuse (415) a MetaImage whose data is not inside the file: the header ends at
    its one ``ElementDataFile`` line, which must say LOCAL; the name may appear nowhere
    before it (not inside another field's value either)."""
    def is_data_file_line(line: str) -> bool:
        return "elementdatafile" in line.lower()

    lines, last = _header_lines(path, name, "a MetaImage", is_data_file_line)
    for line in lines:
        if not _METAIMAGE_KEY.fullmatch(line) and line.strip():
            raise ServiceError(415, "unsupported_media_type", f"{name}: a MetaImage header line that is not 'Key = Value'")
    # Exactly as MetaImage writers put it: a reader that matched the key another way
    # (case, leading space) might read past a line this check took for the last one.
    if not _METAIMAGE_LOCAL.fullmatch(last):
        raise ServiceError(415, "unsupported_media_type",
                           f"{name}: a MetaImage whose data is not inside the file (ElementDataFile must be LOCAL)")


def _nifti_header_voxels(head: bytes) -> tuple[int, int]:
    """(voxels, bytes of the image data including vox_offset) a NIfTI header declares."""
    import io

    import nibabel as nib

    header_class = nib.Nifti2Header if head[4:8] == _NIFTI2_MAGIC else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(head), check=False)
    shape = [max(1, int(n)) for n in header.get_data_shape()]
    voxels = 1
    for n in shape:
        voxels *= n
    data_bytes = voxels * max(1, int(header["bitpix"])) // 8
    return voxels, int(header["vox_offset"]) + data_bytes


@dataclass(frozen=True)
class ReadLimits:
    """What one upload may unpack to: ``max_voxels`` voxels (as the reader counts them)
    and, for archives, about 4 bytes per allowed voxel."""

    max_voxels: int

    @property
    def max_unpacked_bytes(self) -> int:
        from volumevlm.io.readers import zip_unpack_limit

        return zip_unpack_limit(self.max_voxels)


def check_content(path: Path, name: str, declared: str | None, limits: ReadLimits) -> tuple[str, Path]:
    """(format suffix, what the reader should open) for the saved upload at ``path``.

    Its first bytes must be what its name says (or, without a known suffix, one of the
    accepted formats): 415 otherwise. NRRD and MetaImage headers are parsed whole and
    refused (415) when they point outside the file. A gzipped NIfTI is inflated here,
    beside the upload, no further than its header's declared size (413 past the voxel
    limit or the declared size); a zip is unpacked here, counted while inflating (413).
    Blocking: run it on a reading thread."""
    from volumevlm.io.archives import inflate_gzip, unpack_zip

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
                inner = f.read(544)
        except (OSError, EOFError, zlib.error):
            raise ServiceError(422, "unreadable_volume", f"{name}: truncated or corrupt gzip data") from None
        if len(inner) < 348 or not _nifti_magic(inner):
            raise ServiceError(415, "unsupported_media_type", f"{name}: gzip data that is not a NIfTI image")
        try:
            voxels, declared_bytes = _nifti_header_voxels(inner)
        except Exception:
            raise ServiceError(422, "unreadable_volume", f"{name}: not a readable NIfTI header") from None
        if voxels > limits.max_voxels:
            raise ServiceError(413, "too_many_voxels",
                               f"{name}: {voxels} voxels, more than this server's limit of {limits.max_voxels} (--max-voxels)")
        inflated = path.with_name("upload.nii")
        # Room for header extensions and a trailing byte or two beyond the declared data.
        inflate_gzip(path, inflated, max_bytes=min(declared_bytes + (1 << 20), limits.max_unpacked_bytes), source=name)
        path.unlink()
        return declared, inflated
    if declared == ".nrrd":
        _check_nrrd_header(path, name)
    elif declared == ".mha":
        _check_metaimage_header(path, name)
    elif declared == ".zip":
        series = path.with_name("series")
        series.mkdir()
        unpack_zip(path, series, max_bytes=limits.max_unpacked_bytes, source=name)
        path.unlink()
        return declared, series
    return declared, path.rename(path.with_name(f"upload{declared}"))


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


@dataclass(frozen=True)
class UploadPace:
    """How slow an upload may be: after ``grace_s`` seconds it must have averaged
    ``min_bytes_per_s``, and no wait for the next bytes may pass ``idle_s``. A client
    that trickles bytes would otherwise hold an admission slot until the deadline."""

    min_bytes_per_s: float = 32 * 1024
    grace_s: float = 10.0
    idle_s: float = 10.0


DEFAULT_PACE = UploadPace()


async def receive_upload(request, folder: Path, *, max_bytes: int, pace: UploadPace = DEFAULT_PACE,
                         field: str = UPLOAD_FIELD) -> Upload:
    """Stream the multipart body of ``request`` and save its ``field`` file in ``folder``
    as ``upload.part`` (what it is, is checked later by :func:`check_content`).

    Raises ServiceError: 415 (not multipart, or a file name of another format), 413 (the
    declared or the streamed size passes ``max_bytes``), 408 (slower than ``pace``), 400
    (malformed multipart, no or several files, an empty file).
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
    clock = asyncio.get_running_loop().time
    started = clock()
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), timeout=pace.idle_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ServiceError(408, "upload_too_slow", f"no upload bytes for {pace.idle_s:g} s; the request is dropped") from None
            received += len(chunk)
            if received > max_bytes + FRAMING_ALLOWANCE:
                raise too_large
            elapsed = clock() - started
            if elapsed > pace.grace_s and received < pace.min_bytes_per_s * elapsed:
                raise ServiceError(408, "upload_too_slow",
                                   f"upload slower than this server's minimum of {pace.min_bytes_per_s / 1024:g} KiB/s "
                                   f"after {pace.grace_s:g} s; the request is dropped")
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
    return Upload(path=target, name=state["name"], suffix=state["suffix"], size=state["size"])
