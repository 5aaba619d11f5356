"""``volumevlm serve``: the HTTP service (:mod:`volumevlm.serve.app`) on uvicorn.

::

    volumevlm serve --checkpoint demo-output/model --host 127.0.0.1 --port 8000
    VOLUMEVLM_TOKEN=s3cret volumevlm serve --checkpoint CKPT --index reports-index

The checkpoint (and the index, checked against it) are opened before the port is
bound, so a bad path or a busy port ends the command with one line and status 2. The
first line printed says where the service listens (``--port 0`` picks a free port).
The service is plain HTTP: put it behind a TLS-terminating proxy before it leaves the
machine, and give it a token (``--token`` or ``$VOLUMEVLM_TOKEN``; the environment
variable keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading

from volumevlm.errors import VolumeVLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from volumevlm.serve import app as service

    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. OUT/model of volumevlm train)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", help="torch device (default auto: cuda when available, else cpu)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token every /v1 request must send (default ${service.TOKEN_ENV}; none: no auth)")
    parser.add_argument("--index", default=None, help="retrieval index folder for /v1/retrieve (volumevlm index build)")
    parser.add_argument("--max-upload-mb", type=float, default=service.DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload in MB (default {service.DEFAULT_MAX_UPLOAD_MB:g}); larger: 413")
    parser.add_argument("--max-voxels", type=int, default=service.DEFAULT_MAX_VOXELS,
                        help=f"largest volume in voxels (default {service.DEFAULT_MAX_VOXELS}); larger: 413")
    parser.add_argument("--timeout", type=float, default=service.DEFAULT_TIMEOUT_S,
                        help=f"a request's time limit in seconds (default {service.DEFAULT_TIMEOUT_S:g}); past it: 504")
    parser.add_argument("--max-batch", type=int, default=service.DEFAULT_MAX_BATCH,
                        help=f"most requests per model batch (default {service.DEFAULT_MAX_BATCH})")
    parser.add_argument("--batch-wait-ms", type=float, default=service.DEFAULT_BATCH_WAIT_MS,
                        help=f"how long a request waits for others to batch with (default {service.DEFAULT_BATCH_WAIT_MS:g} ms)")
    parser.add_argument("--queue-size", type=int, default=service.DEFAULT_QUEUE_SIZE,
                        help=f"most requests in flight (default {service.DEFAULT_QUEUE_SIZE}); more: 503")
    parser.add_argument("--read-threads", type=int, default=None, help="threads reading uploads (default min(4, CPUs))")
    parser.add_argument("--tmp-dir", default=None,
                        help=f"where the private upload folder goes (default ${service.TMPDIR_ENV}, else the system temp folder)")
    parser.add_argument("--min-upload-kbps", type=float, default=service.DEFAULT_MIN_UPLOAD_KBPS,
                        help=f"slowest accepted upload in KiB/s after a {service.UploadPace.grace_s:g} s grace period "
                             f"(default {service.DEFAULT_MIN_UPLOAD_KBPS:g}); slower: 408")
    parser.add_argument("--no-docs", action="store_true", help="do not serve /docs and /openapi.json")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default info)")


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or one line saying why not."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise VolumeVLMError(f"{host}:{port}: cannot listen ({err.strerror or err})") from None
    return sock


def _quiet_stop_signals() -> dict:
    """No-op SIGINT / SIGTERM handlers (main thread only); the previous ones, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, lambda *_: None) for signum in (signal.SIGINT, signal.SIGTERM)}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from volumevlm import NOT_FOR_CLINICAL_USE
    from volumevlm.serve.app import TOKEN_ENV, _load_model, _open_index, create_app

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not 0 <= args.port <= 65535:
        raise VolumeVLMError(f"serve: --port must be 0..65535, got {args.port}")
    # Opened here, before the port is bound, so a bad checkpoint or index is one line.
    model, source = _load_model(args.checkpoint, args.device)
    index = _open_index(args.index, model)
    app = create_app(model, token=token, max_upload_mb=args.max_upload_mb, max_voxels=args.max_voxels,
                     timeout_s=args.timeout, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     queue_size=args.queue_size, index=index, tmp_dir=args.tmp_dir, read_threads=args.read_threads,
                     min_upload_kbps=args.min_upload_kbps, docs=not args.no_docs)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    docs = "" if args.no_docs else f" (API docs: http://{shown}:{port}/docs)"
    print(f"volumevlm serve: http://{shown}:{port}{docs}; checkpoint {source}; "
          f"{'bearer token required' if token else 'no token'}. {NOT_FOR_CLINICAL_USE}", flush=True)
    if not token and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without a token: anyone who reaches this port can use the model "
              f"(set --token or ${TOKEN_ENV})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # uvicorn stops cleanly on SIGINT / SIGTERM, then raises the signal again with the
    # handler that was in place before it ran: a no-op one here, so a requested stop
    # ends with status 0 instead of a KeyboardInterrupt or death by the signal.
    previous = _quiet_stop_signals()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not server.started:
        raise VolumeVLMError("serve: the service did not start (see the log above)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m volumevlm.serve.cli ...``: the same as ``volumevlm serve ...``."""
    parser = argparse.ArgumentParser(prog="volumevlm serve", description="serve a checkpoint over HTTP (not for clinical use)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except VolumeVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
