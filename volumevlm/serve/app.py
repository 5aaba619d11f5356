"""The HTTP service: a FastAPI app around one loaded VolumeVLM.

::

    app = create_app("demo-output/model", token="s3cret", index="reports-index")
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: volumevlm serve --checkpoint ...

Endpoints (OpenAPI docs at ``/docs``, the schema at ``/openapi.json``; both need the
token when the server has one, and ``docs=False`` / ``--no-docs`` turns them off):

=========================  ===============================================================
``GET  /healthz``          liveness (no token needed); with the token also queue,
                           batching counters and memory
``GET  /v1/model``         versions, checkpoint, label names, findings, limits
``POST /v1/embed``         upload -> unit image embedding
``POST /v1/zero-shot``     upload -> {finding: P(present)}; ``?anatomy=true``: read in
                           the organs the model segments (anatomy head; 409 without it)
``POST /v1/phenotypes``    upload -> most likely phecodes; ``?anatomy=true`` likewise
``POST /v1/segment``       upload -> label mask as NIfTI in the input's geometry, or
                           per-structure statistics with ``?output=json``
``POST /v1/retrieve``      upload (or JSON ``{"text": ...}``) -> nearest index entries
=========================  ===============================================================

An upload is ``multipart/form-data`` with the CT in the form field ``file``: NIfTI
(.nii / .nii.gz), single-file NRRD, MetaImage (.mha) or a zip of one DICOM series.

How a request goes: the token is checked (when the server has one); the request is
admitted if fewer than ``queue_size`` are in flight (else 503); its body is streamed into
a private folder (0700, inside the server's own temp folder; removed when the request
ends, however it ends) with the size limit enforced while it arrives (413) and a minimum
upload rate (408). Then, on a reading thread (at most ``read_threads`` at once): the file
type is checked from its name and first bytes and NRRD / MetaImage headers are parsed
whole, refusing any reference to a file outside the upload (415); gzip and zip uploads
are unpacked into the private folder, counted while they inflate (413); THE reader reads
it with the voxel limit (413); the grid that resampling would make is checked against
the same limit (413); THE pipeline preprocesses it (unreadable input: 422, in our own
words, never quoting the file). The model's one thread runs only the model, batched with
concurrent requests (:mod:`volumevlm.serve.worker`); a segmentation goes back to the
input's geometry on the reading thread. The whole request must finish within
``timeout_s`` (504); a request that ends early drops its queued model job and its
reading work stops at its next step. Every error is a JSON body with one line naming the
problem; every response carries ``X-Not-For-Clinical-Use`` and every JSON body a
``not_for_clinical_use`` field: this is research software, not a medical device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gzip
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from volumevlm import NOT_FOR_CLINICAL_USE, __version__
from volumevlm.errors import InputError, TooLargeError, VolumeVLMError
from volumevlm.provenance import package_versions
from volumevlm.serve.errors import ServiceError
from volumevlm.serve.uploads import (
    ACCEPTED,
    DEFAULT_PACE,
    UPLOAD_FIELD,
    ReadLimits,
    UploadPace,
    check_content,
    receive_upload,
)
from volumevlm.serve.worker import BatchWorker, QueueFull

log = logging.getLogger("volumevlm.serve")

NOTICE_HEADER = "X-Not-For-Clinical-Use"
NOTICE_KEY = "not_for_clinical_use"
TOKEN_ENV = "VOLUMEVLM_TOKEN"
TMPDIR_ENV = "VOLUMEVLM_SERVE_TMPDIR"
DEFAULT_MAX_UPLOAD_MB = 512.0
# 512 x 512 x 1024 voxels (1 GiB as float32): a large CT; beyond it a request is refused.
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_QUEUE_SIZE = 16
DEFAULT_MIN_UPLOAD_KBPS = 32.0
MAX_TEXT_BODY = 64 * 1024
MAX_K = 1000
# A zero-shot request names at most this many findings, each at most this long: each new
# name costs a text-encoder pass on the model's thread and a place in the prompt cache.
MAX_FINDINGS = 64
MAX_FINDING_CHARS = 100
UPLOAD_ROOT_PREFIX = "volumevlm-serve-"
NIFTI_MEDIA_TYPE = "application/gzip"
DICOM_MEDIA_TYPE = "application/dicom"


# ---------------------------------------------------------------------- the service state


class Service:
    """What the app holds between requests: the model and its worker thread, the index,
    limits, the private upload folder, the reading threads and counters."""

    def __init__(self, model, *, index, token: str | None, max_upload_mb: float, max_voxels: int,
                 timeout_s: float, max_batch: int, batch_wait_ms: float, queue_size: int,
                 tmp_dir: str | os.PathLike | None, read_threads: int | None, checkpoint: str | None,
                 pace: UploadPace = DEFAULT_PACE, docs: bool = True):
        from volumevlm.inference.index import model_fingerprint
        from volumevlm.inference.pipeline import default_prompt_set

        self.model = model
        self.index = index
        self.token = token or None
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_upload_mb = float(max_upload_mb)
        self.max_voxels = int(max_voxels)
        self.timeout_s = float(timeout_s)
        self.queue_size = int(queue_size)
        self.pace = pace
        self.docs = bool(docs)
        self.read_limits = ReadLimits(max_voxels=self.max_voxels)
        self.checkpoint = checkpoint
        self.prompt_set = default_prompt_set(model)
        self.fingerprint = model_fingerprint(model)
        root = Path(tmp_dir or os.environ.get(TMPDIR_ENV) or tempfile.gettempdir()).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_upload_roots(root)
        # mkdtemp: a fresh folder only this user can enter (0700); uploads, unpacked
        # archives included, live below it. Its name carries our pid, so a later start
        # can tell a crashed server's leftovers from a running one's folder.
        self.upload_root = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_ROOT_PREFIX}{os.getpid()}-", dir=root))
        threads = read_threads or min(4, os.cpu_count() or 1)
        self.readers = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="volumevlm-read")
        # One slot per reading thread, held until the thread's work really ends (not when
        # a timed-out request stops waiting for it): the memory that reading takes is at
        # most ``threads`` times one volume's, and no read queues up behind abandoned work.
        self.read_slots = asyncio.Semaphore(threads)
        self.worker = BatchWorker(model, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000.0,
                                  queue_size=queue_size, index=index, prompt_set=self.prompt_set)
        self.inflight = 0
        self.started = time.time()
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()
        self.readers.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.upload_root, ignore_errors=True)

    async def in_thread(self, fn, *args):
        """Run blocking work (reading, preprocessing, inversion) on a reading thread once a
        reading slot is free. The await can be cancelled (the request's timeout) without
        waiting for the thread; the slot is freed when the thread's work ends."""
        loop = asyncio.get_running_loop()
        await self.read_slots.acquire()
        try:
            future = self.readers.submit(functools.partial(fn, *args))
        except BaseException:
            self.read_slots.release()
            raise
        # Done: finished, failed, or cancelled before it started.
        future.add_done_callback(lambda _: _call_soon(loop, self.read_slots.release))
        return await asyncio.wrap_future(future)

    @asynccontextmanager
    async def admitted(self):
        """At most ``queue_size`` requests in flight; one more is answered 503 at once."""
        if self.inflight >= self.queue_size:
            raise ServiceError(503, "busy", f"server busy: {self.inflight} requests in flight "
                                            f"(--queue-size {self.queue_size}); retry shortly", headers={"Retry-After": "1"})
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    @asynccontextmanager
    async def deadline(self):
        """The request's whole time limit: past it, whatever it awaits is cancelled and
        the answer is 504."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError:
            raise ServiceError(504, "timeout",
                               f"the request took longer than this server's limit of {self.timeout_s:g} s (--timeout)") from None

    @asynccontextmanager
    async def private_folder(self):
        """A fresh 0700 folder for one request's upload, removed however the request ends."""
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.upload_root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def run(self, verb: str, payload: Any, **options: Any):
        """A job on the model's thread; its result (or its error)."""
        import torch

        try:
            future = self.worker.submit(verb, payload, **options)
        except QueueFull:
            raise ServiceError(503, "busy", "server busy: the model's queue is full; retry shortly",
                               headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wrap_future(future)
        except torch.cuda.OutOfMemoryError:
            # Load, not the input: the worker already retried the batch's jobs one by one.
            raise ServiceError(503, "out_of_memory", "the model ran out of GPU memory; retry shortly",
                               headers={"Retry-After": "5"}) from None

    def model_facts(self) -> dict[str, Any]:
        model = self.model
        from volumevlm.inference.index import data_note

        facts = {
            "checkpoint": self.checkpoint,
            "fingerprint": self.fingerprint,
            "device": _device_name(model.device),
            "embed_dim": model.embed_dim,
            "heads": sorted(model.heads.keys()),
            "preprocess": model.preprocess.to_dict(),
            "data_note": data_note(model),
            "phecodes": len(model.phecode_vocab.codes),
        }
        return facts


def _call_soon(loop: asyncio.AbstractEventLoop, callback) -> None:
    """``callback`` on ``loop``'s thread; nothing once the loop has closed (shutdown)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


def remove_stale_upload_roots(root: Path) -> list[Path]:
    """Remove the upload folders that servers which are no longer running left in
    ``root`` (a crash skips the clean-up); the removed folders. A folder whose process
    still runs, or that is not ours, stays."""
    removed = []
    for folder in root.glob(f"{UPLOAD_ROOT_PREFIX}*"):
        pid_text = folder.name[len(UPLOAD_ROOT_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
            continue
        pid = int(pid_text)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # that server is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a running process of another user
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def _memory() -> dict[str, float | None]:
    """This process's resident memory now and at its peak, MB (Linux /proc; None elsewhere)."""
    found: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mb" if line.startswith("VmRSS:") else "peak_rss_mb"
                    found[key] = round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return found


# ---------------------------------------------------------------------- responses and errors


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({**body, NOTICE_KEY: NOT_FOR_CLINICAL_USE}, status_code=status, headers=headers)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    one_line = " ".join(str(message).split())
    return _json({"error": one_line, "code": code, "status": status},
                 status, {**(headers or {}), NOTICE_HEADER: NOT_FOR_CLINICAL_USE})


class NoticeMiddleware:
    """Adds the not-for-clinical-use header (and ``Cache-Control: no-store``: answers
    about a patient's scan must not sit in caches) to every HTTP response, and counts
    responses by status."""

    def __init__(self, app, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_notice(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                if NOTICE_HEADER.lower().encode() not in present:
                    headers.append((NOTICE_HEADER.encode(), NOT_FOR_CLINICAL_USE.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
                self.counter[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, send_with_notice)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for problem in err.errors()[:3]:
        where = [str(p) for p in problem.get("loc", ()) if p not in ("query", "body")]
        place = f"query parameter {'.'.join(where)}" if problem.get("loc", ("",))[0] == "query" else ".".join(where) or "request"
        parts.append(f"{place}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError):
        return _error(err.status, err.code, str(err), err.headers)

    @app.exception_handler(VolumeVLMError)
    async def input_error(request: Request, err: VolumeVLMError):
        return _error(422, "unprocessable", str(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return _error(400, "bad_request", _validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {err.detail}"
        return _error(err.status_code, code, message, dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error(500, "internal_error", f"internal server error ({type(err).__name__}); see the server log")


# ---------------------------------------------------------------------- reading an upload


def _reader_error(err: VolumeVLMError, upload) -> ServiceError:
    """What the client is told when reading, checking or preprocessing its upload failed:
    our own words about the client's file (never a library's text, which can quote the
    file's bytes, and never a server path); over a limit: 413."""
    if isinstance(err, ServiceError):
        return err
    problem = err.problem if isinstance(err, InputError) else str(err)
    # Paths of the private folder (an unpacked archive's members included) become the upload's name.
    problem = problem.replace(str(upload.path.parent), "<upload>")
    problem = re.sub(r"\s*\(raise it with [^)]*\)", "", problem)
    if isinstance(err, TooLargeError):
        return ServiceError(413, "too_many_voxels", f"{upload.name}: {problem} (this server's --max-voxels)")
    return ServiceError(422, "unreadable_volume", f"{upload.name}: {problem}")


def _volume_facts(volume, upload) -> dict[str, Any]:
    return {
        "name": upload.name,
        "bytes": upload.size,
        "format": volume.meta.get("format"),
        "shape": list(volume.shape),
        "spacing_mm": [round(float(s), 6) for s in volume.spacing],
        "orientation": volume.orientation,
    }


@dataclass
class ReadUpload:
    """An upload as read: ``facts`` for the answer, the Volume (kept only where the answer
    goes back to the input's geometry) and the preprocessed [1, X, Y, Z] image."""

    facts: dict[str, Any]
    volume: Any
    image: Any


class Abandoned(Exception):
    """The request this reading work was for has ended (timed out, disconnected)."""


def _read(service: Service, upload, ended: threading.Event, keep_volume: bool) -> ReadUpload:
    """Check, unpack, read (THE reader) and preprocess (THE pipeline) a saved upload,
    with every limit checked before the work it bounds; stops between steps once the
    request has ended. Blocking: runs on a reading thread."""
    from volumevlm.data.transforms import check_resampled_size, whole_field
    from volumevlm.inference.pipeline import prepare
    from volumevlm.io import read_volume

    def still_wanted():
        if ended.is_set():
            raise Abandoned()

    try:
        _, path = check_content(upload.path, upload.name, upload.suffix, service.read_limits)
        still_wanted()
        volume = read_volume(path, max_voxels=service.max_voxels)
        still_wanted()
        check_resampled_size(volume, service.model.preprocess, service.max_voxels)
        # A mask covers the whole input (segment_to_input's rule); embeddings see the
        # encoder's own field of view.
        config = whole_field(service.model.preprocess) if keep_volume else None
        image = prepare(volume, service.model, config=config).image
    except VolumeVLMError as err:
        raise _reader_error(err, upload) from None
    # Only the segmentation needs the volume again: freed now otherwise.
    return ReadUpload(_volume_facts(volume, upload), volume if keep_volume else None, image)


async def _upload_job(request: Request, verb: str, options: dict[str, Any], finish, check=None):
    """The common path of every upload endpoint: admission, deadline, private folder,
    upload, reading, ``check(read)`` (refuses before the model runs), the model's job, then
    ``finish(read, result)`` on a reading thread.
    When the request ends, however it ends, its reading work stops at its next step and
    its queued model job is dropped."""
    service: Service = request.app.state.service
    ended = threading.Event()
    try:
        async with service.admitted(), service.deadline(), service.private_folder() as folder:
            upload = await receive_upload(request, folder, max_bytes=service.max_upload_bytes, pace=service.pace)
            request.state.upload_name = upload.name
            read = await service.in_thread(_read, service, upload, ended, verb == "segment")
            if check is not None:
                check(read)
            try:
                result = await service.run(verb, read.image, **options)
            except VolumeVLMError as err:
                raise _reader_error(err, upload) from None
            return await service.in_thread(finish, read, result)
    finally:
        ended.set()


# ---------------------------------------------------------------------- the app


ANATOMY_HELP = ("read in the organs the model segments (the anatomy and segmentation heads, fitted by "
                "volumevlm train experiment=report_demo) instead of the global embedding")


def _need_anatomy(service, phenotypes: bool = False) -> None:
    """409 naming the recipe when the checkpoint cannot read organ by organ; checked before
    any upload is read."""
    from volumevlm.models.anatomy import NO_PHENOTYPES

    try:
        service.model.head("segmentation")
        head = service.model.head("anatomy")
    except VolumeVLMError as err:
        raise ServiceError(409, "missing_head", str(err).replace(f"{service.model.source}: ", "")) from None
    if phenotypes and not head.phecodes:
        raise ServiceError(409, "missing_head", NO_PHENOTYPES)


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary", "description": f"the CT: {ACCEPTED}"}},
                }
            }
        },
    }
}
RETRIEVE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **UPLOAD_BODY["requestBody"]["content"],
            "application/json": {
                "schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
            },
        },
    }
}
ERRORS = {status: {"description": text} for status, text in (
    (400, "malformed request (JSON error)"), (401, "missing or wrong bearer token"),
    (413, "upload or voxel count over the limit"), (415, "not an accepted file type"),
    (422, "the file could not be read as a CT volume"), (503, "server busy, retry"), (504, "timed out"))}


def create_app(
    checkpoint,
    *,
    device: str | None = None,
    token: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    index=None,
    tmp_dir: str | os.PathLike | None = None,
    read_threads: int | None = None,
    min_upload_kbps: float = DEFAULT_MIN_UPLOAD_KBPS,
    upload_grace_s: float = UploadPace.grace_s,
    docs: bool = True,
) -> FastAPI:
    """The service as an ASGI app; the model is loaded (or taken) once, at start-up.

    checkpoint: a checkpoint directory (loaded in the app's lifespan on ``device``,
        default CUDA when available) or an already loaded VolumeVLM.
    token: the bearer token every /v1 request must carry (None: no authentication).
    max_upload_mb / max_voxels: larger uploads / volumes are answered 413.
    timeout_s: a request's whole time limit (504). max_batch / batch_wait_ms: the worker's
        batching. queue_size: most requests in flight at once (more: 503).
    index: a retrieval index folder or an opened RetrievalIndex (for /v1/retrieve).
    tmp_dir: where the private upload folder goes (default $VOLUMEVLM_SERVE_TMPDIR, else
        the system temp folder); uploads and unpacked archives stay inside it, and what
        a crashed server left there is removed at start-up. read_threads: threads
        reading uploads (default min(4, CPUs)); at most that many volumes are in memory
        being read at once.
    min_upload_kbps / upload_grace_s: an upload slower than this after the grace period
        (or silent for the grace period) is dropped with 408.
    docs: serve /docs and /openapi.json (behind the token when there is one).
    """
    for name, value in (("max_upload_mb", max_upload_mb), ("max_voxels", max_voxels), ("timeout_s", timeout_s),
                        ("max_batch", max_batch), ("queue_size", queue_size), ("min_upload_kbps", min_upload_kbps),
                        ("upload_grace_s", upload_grace_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise VolumeVLMError(f"serve: {name} must be a positive number, got {value!r}")
    if batch_wait_ms < 0:
        raise VolumeVLMError(f"serve: batch_wait_ms must be >= 0, got {batch_wait_ms!r}")

    pace = UploadPace(min_bytes_per_s=min_upload_kbps * 1024.0, grace_s=upload_grace_s, idle_s=upload_grace_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model, source = _load_model(checkpoint, device)
        opened = _open_index(index, model)
        service = Service(model, index=opened, token=token, max_upload_mb=max_upload_mb, max_voxels=max_voxels,
                          timeout_s=timeout_s, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                          queue_size=queue_size, tmp_dir=tmp_dir, read_threads=read_threads, checkpoint=source,
                          pace=pace, docs=docs)
        app.state.service = service
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="volumevlm",
        version=__version__,
        summary="3D CT vision-language model over HTTP. " + NOT_FOR_CLINICAL_USE,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else "",
        lifespan=lifespan,
        # Served below, behind the token: the schema lists every limit and endpoint.
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    responses: Counter = Counter()
    app.state.responses = responses
    app.add_middleware(NoticeMiddleware, counter=responses)
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description=f"the server's token (--token or ${TOKEN_ENV})")

    def token_problem(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
        """Why the request may not use the service (None: it may)."""
        expected = request.app.state.service.token
        if expected is None:
            return None
        given = credentials.credentials if credentials is not None else ""
        if not given:
            return "missing bearer token"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return "wrong bearer token"
        return None

    async def authorized(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        problem = token_problem(request, credentials)
        if problem is not None:
            raise ServiceError(401, "unauthorized", f"{problem}: send 'Authorization: Bearer <token>'",
                               headers={"WWW-Authenticate": "Bearer"})

    secured = [Depends(authorized)]

    @app.get("/healthz", summary="liveness; with the token, also load, batching counters and memory")
    async def healthz(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        service: Service = request.app.state.service
        alive = service.worker.alive()
        status = "ok" if alive else "down: the model's thread has stopped"
        if token_problem(request, credentials) is not None:
            # Without the token: alive or not, nothing about load, memory or traffic.
            return _json({"status": status}, 200 if alive else 503)
        return _json({
            "status": status,
            "uptime_s": round(time.time() - service.started, 1),
            "inflight": service.inflight,
            "queue_size": service.queue_size,
            "batching": service.worker.stats(),
            "responses": dict(request.app.state.responses),
            "memory": _memory(),
        }, 200 if alive else 503)

    if docs:
        @app.get("/openapi.json", dependencies=secured, include_in_schema=False)
        async def openapi_schema():
            return JSONResponse(app.openapi())

        @app.get("/docs", dependencies=secured, include_in_schema=False)
        async def swagger_page():
            from fastapi.openapi.docs import get_swagger_ui_html

            return get_swagger_ui_html(openapi_url="/openapi.json", title="volumevlm API")

    @app.get("/v1/model", dependencies=secured, summary="versions, checkpoint, label names, findings, limits")
    async def model_info(request: Request):
        service: Service = request.app.state.service
        model = service.model
        segmentation = model.heads["segmentation"] if model.has_head("segmentation") else None
        index = service.index
        return _json({
            "model": service.model_facts(),
            "versions": package_versions("volumevlm", "torch", "monai", "transformers", "nibabel", "SimpleITK",
                                         "fastapi", "uvicorn"),
            "label_names": None if segmentation is None else {str(k): v for k, v in sorted(segmentation.label_names.items())},
            "findings": list(service.prompt_set.keys),
            "prompt_set": service.prompt_set.name,
            "index": None if index is None else {"count": len(index), "kinds": index.kind_counts},
            "limits": {
                "max_upload_mb": service.max_upload_mb,
                "max_voxels": service.max_voxels,
                "timeout_s": service.timeout_s,
                "max_batch": service.worker.max_batch,
                "queue_size": service.queue_size,
            },
            "accepted_uploads": ACCEPTED,
        })

    @app.post("/v1/embed", dependencies=secured, openapi_extra=UPLOAD_BODY, responses=ERRORS,
              summary="unit image embedding of an uploaded CT")
    async def embed(request: Request):
        service: Service = request.app.state.service

        def finish(read, embedding):
            return {"embedding": embedding, "dim": len(embedding), "model_fingerprint": service.fingerprint, "input": read.facts}

        return _json(await _upload_job(request, "embed", {}, finish))

    @app.post("/v1/zero-shot", dependencies=secured, openapi_extra=UPLOAD_BODY,
              responses={**ERRORS, 409: {"description": "anatomy=true on a checkpoint without the anatomy head"}},
              summary="{finding: P(present)} of an uploaded CT")
    async def zero_shot(request: Request, findings: list[str] | None = Query(
            None, description="findings to score (repeat, or comma-separate); default: the prompt set's"),
            anatomy: bool = Query(False, description=ANATOMY_HELP)):
        from volumevlm.inference.pipeline import with_findings

        service: Service = request.app.state.service
        if anatomy:
            _need_anatomy(service)
        wanted = _split_list(findings)
        if wanted is not None:
            if len(wanted) > MAX_FINDINGS:
                raise ServiceError(400, "bad_request", f"query parameter findings: {len(wanted)} names, "
                                                       f"at most {MAX_FINDINGS} per request")
            if any(len(name) > MAX_FINDING_CHARS for name in wanted):
                raise ServiceError(400, "bad_request", f"query parameter findings: a name longer than "
                                                       f"{MAX_FINDING_CHARS} characters")
            wanted = tuple(dict.fromkeys(wanted))  # a name asked twice is scored once
            try:
                with_findings(service.prompt_set, wanted)  # a bad name fails before any upload is read
            except VolumeVLMError as err:
                raise ServiceError(400, "bad_request", f"query parameter findings: {err}") from None

        def finish(read, probabilities):
            return {"probabilities": probabilities, "prompt_set": service.prompt_set.name, "anatomy": anatomy,
                    "input": read.facts}

        return _json(await _upload_job(request, "zero_shot", {"findings": wanted, "anatomy": anatomy}, finish))

    @app.post("/v1/phenotypes", dependencies=secured, openapi_extra=UPLOAD_BODY,
              responses={**ERRORS, 409: {"description": "anatomy=true on a checkpoint without the anatomy head"}},
              summary="most likely phecodes of an uploaded CT")
    async def phenotypes(request: Request, top_k: int = Query(10, ge=1, description="how many phecodes"),
                         anatomy: bool = Query(False, description=ANATOMY_HELP)):
        service: Service = request.app.state.service
        if anatomy:
            _need_anatomy(service, phenotypes=True)

        def finish(read, hits):
            return {"phenotypes": [{"phecode": c, "description": d, "probability": p} for c, d, p in hits],
                    "anatomy": anatomy, "input": read.facts}

        return _json(await _upload_job(request, "phenotypes", {"top_k": top_k, "anatomy": anatomy}, finish))

    @app.post("/v1/segment", dependencies=secured, openapi_extra=UPLOAD_BODY,
              responses={**ERRORS, 200: {"description": "the mask (.nii.gz) or, with output=json, statistics",
                                         "content": {NIFTI_MEDIA_TYPE: {}, "application/json": {}}},
                         409: {"description": "the checkpoint has no segmentation head"}},
              summary="label mask of an uploaded CT in its own geometry")
    async def segment(request: Request, output: Literal["nifti", "json", "dicom-seg"] = Query(
            "nifti", description="nifti: the mask as .nii.gz; json: per-structure voxels, volume and mean HU; "
                                 "dicom-seg: a DICOM Segmentation referencing the uploaded DICOM series")):
        service: Service = request.app.state.service
        if not service.model.has_head("segmentation"):
            try:
                service.model.head("segmentation")
            except VolumeVLMError as err:
                raise ServiceError(409, "missing_head", str(err).replace(f"{service.model.source}: ", "")) from None
        names = dict(service.model.heads["segmentation"].label_names)

        def finish(read, probabilities):
            from volumevlm.models.segmentation import probabilities_to_input

            # Back to the input's geometry here, on a reading thread, not the model's.
            mask = probabilities_to_input(service.model.heads["segmentation"], probabilities, read.image, read.volume)
            if output == "json":
                from volumevlm.inference.statistics import structure_statistics

                rows = structure_statistics(mask, read.volume, names)
                return {"structures": rows, "label_names": {str(k): v for k, v in sorted(names.items())},
                        "input": read.facts}
            if output == "dicom-seg":
                from volumevlm.inference.pipeline import mask_to_dicom_seg

                return mask_to_dicom_seg(read.volume, mask)
            return gzip.compress(mask.to_bytes(), compresslevel=6)

        def dicom_only(read):
            if output == "dicom-seg" and read.volume.meta.get("format") != "dicom":
                raise ServiceError(400, "bad_request", f"{read.facts['name']}: output=dicom-seg needs a DICOM upload "
                                                       f"(a zipped series or an enhanced CT .dcm); ask for output=nifti")

        result = await _upload_job(request, "segment", {}, finish, check=dicom_only)
        if output == "json":
            return _json(result)
        stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.zip|\.dcm)$", "", _upload_stem(request), flags=re.IGNORECASE)
        if output == "dicom-seg":
            return Response(result, media_type=DICOM_MEDIA_TYPE, headers={
                "Content-Disposition": f'attachment; filename="{stem}_seg.dcm"', NOTICE_HEADER: NOT_FOR_CLINICAL_USE})
        return Response(result, media_type=NIFTI_MEDIA_TYPE, headers={
            "Content-Disposition": f'attachment; filename="{stem}_mask.nii.gz"', NOTICE_HEADER: NOT_FOR_CLINICAL_USE})

    @app.post("/v1/retrieve", dependencies=secured, openapi_extra=RETRIEVE_BODY,
              responses={**ERRORS, 409: {"description": "the server has no retrieval index"}},
              summary="nearest index entries to an uploaded CT, or to a JSON text query")
    async def retrieve(request: Request,
                       k: int = Query(5, ge=1, le=MAX_K, description="how many hits"),
                       kind: Literal["report", "image", "all"] = Query("report", description="which entries")):
        from volumevlm.inference.index import BUILD_HINT

        service: Service = request.app.state.service
        index = service.index
        if index is None:
            raise ServiceError(409, "no_index", f"this server has no retrieval index; build one with `{BUILD_HINT}` "
                                                "and start the server with --index DIR")
        wanted = None if kind == "all" else kind
        if wanted is not None and index.kind_counts[wanted] == 0:
            raise ServiceError(400, "bad_request", f"query parameter kind: the index holds no {wanted} entries {index.kind_counts}")
        summary = {"k": k, "kind": kind, "index": {"count": len(index), "kinds": index.kind_counts}}
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            async with service.admitted(), service.deadline():
                text = await _text_query(request)
                hits = await service.run("retrieve_text", text, k=k, kind=wanted)
            return _json({"hits": hits, "query": {"text": text}, **summary})

        def finish(read, hits):
            return {"hits": hits, "query": {"input": read.facts}, **summary}

        # An anatomy index compares images through the anatomy head: the organ-by-organ pass.
        return _json(await _upload_job(request, "retrieve", {"k": k, "kind": wanted,
                                                             "anatomy": index.space == "anatomy"}, finish))

    return app


def _split_list(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    parts = tuple(part.strip() for value in values for part in value.split(",") if part.strip())
    return parts or None


def _upload_stem(request: Request) -> str:
    """A header-safe stem for the mask's file name."""
    return "mask" if not hasattr(request.state, "upload_name") else re.sub(r"[^A-Za-z0-9._-]+", "_", request.state.upload_name)


async def _text_query(request: Request) -> str:
    """The ``text`` of a JSON body {"text": ...}, read with a small size limit."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_TEXT_BODY:
            raise ServiceError(413, "upload_too_large", f"a text query body is limited to {MAX_TEXT_BODY // 1024} KiB")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServiceError(400, "bad_request", f"malformed JSON body ({err})") from None
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ServiceError(400, "bad_request", 'a JSON query must be {"text": "<non-empty query text>"}')
    return text


def _load_model(checkpoint, device: str | None):
    """(model, checkpoint folder as text) from a folder or an already loaded model."""
    import torch

    from volumevlm.inference.checkpoint import load

    if hasattr(checkpoint, "encode_image"):
        source = getattr(checkpoint, "source", None)
        return checkpoint.eval(), None if source is None else str(source)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(checkpoint, device=device)
    return model, str(Path(checkpoint).expanduser().resolve())


def _open_index(index, model):
    """An opened RetrievalIndex built with ``model`` (checked now, not per request), or None."""
    if index is None:
        return None
    from volumevlm.inference.index import RetrievalIndex

    opened = index if isinstance(index, RetrievalIndex) else RetrievalIndex.open(index)
    opened.check_model(model)
    return opened
