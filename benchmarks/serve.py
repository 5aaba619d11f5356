"""Load test of the HTTP service (``volumevlm serve``): N concurrent clients, bounded time.

Starts a local server as its own process (``python -m volumevlm.serve.cli``, a random
bearer token in its environment, a free loopback port) or targets ``--url``; uploads one
CT volume from each of ``--clients`` concurrent httpx clients, back to back, for
``--duration`` seconds per endpoint, after a warm-up. Reports per endpoint: requests,
errors (anything but 200; must be zero), throughput, p50 / p90 / p99 latency, the mean
model batch the server formed, and the server's resident memory before and after (its
growth). Results: a Rich table on stdout and
``benchmarks/results/serve-<device>-<YYYY-MM-DD>.json`` naming the device, versions,
date and command.

Without ``--checkpoint`` a tiny untrained checkpoint is built first (fast_dev_run on a
12-case synthetic cohort, NOT clinical data, with an untrained segmentation head): the
figures then measure the service's own overhead (upload, reading, preprocessing,
batching, encoding the answer) around a tiny model, not a real model's speed. The
uploaded volume is a synthetic phantom (``--input-shape``) unless ``--input`` names a file.

    python benchmarks/serve.py                                  # CPU, tiny model, zero-shot + segment
    python benchmarks/serve.py --clients 8 --duration 30 --endpoints zero-shot,embed,segment
    python benchmarks/serve.py --checkpoint CKPT --device cuda --max-batch 16 --clients 32
    python benchmarks/serve.py --url http://127.0.0.1:8000 --token "$VOLUMEVLM_TOKEN" --input ct.nii.gz
    python benchmarks/serve.py --clients 16 --hostile 4 --endpoints embed   # under attack, side by side

With ``--hostile N`` each endpoint is measured twice in the same run: alone, then with N
hostile clients at the same time, cycling through an NRRD header that points at a
server file, a gzip bomb, a tiny file with 50 mm voxels and an upload trickling at
20 bytes/s. Every hostile request must be refused (4xx, never 200 or 5xx) and the
well-behaved clients must see no errors; their latency beside the clean row shows what
the attack costs them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from volumevlm.provenance import cpu_name, package_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENDPOINTS = {
    "zero-shot": "/v1/zero-shot",
    "embed": "/v1/embed",
    "phenotypes": "/v1/phenotypes",
    "segment": "/v1/segment",
    "segment-json": "/v1/segment?output=json",
    "retrieve": "/v1/retrieve",
}
# Shrinks the demo experiment to seconds on a CPU (the sizes of the test suite's tiny model).
TINY_MODEL = [
    "data.preprocess.target_spacing=[12.0,12.0,20.0]", "data.preprocess.spatial_size=[32,32,16]",
    "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0",
    "model.encoder.patch_size=[8,8,4]", "model.encoder.dim=32", "model.encoder.depth=2", "model.encoder.heads=2",
    "model.encoder.drop_path=0.0", "model.encoder.grad_checkpointing=false",
    "model.text.dim=32", "model.text.depth=1", "model.text.heads=2", "model.text.vocab_size=400",
    "model.text.max_length=128", "model.embed_dim=32", "model.optimizer.warmup_steps=2",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
    "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar",
]


# ---------------------------------------------------------------------- what to serve


def build_tiny_checkpoint(work: Path) -> Path:
    """An untrained tiny checkpoint with a segmentation head, from the synthetic cohort."""
    import torch

    import volumevlm
    from volumevlm.data.synthetic import generate_cohort
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    from volumevlm.train.cli import compose_config
    from volumevlm.train.train import train

    cohort = work / "cohort"
    generate_cohort(cohort, n=12, seed=0, shape=(32, 32, 16), workers=1, progress=False)
    config = compose_config([f"data.root={cohort}", f"output_dir={work / 'pretrain'}", *TINY_MODEL,
                             "experiment=demo", "debug=fdr"])
    _, objects = train(config)
    model = volumevlm.load(objects["model_dir"])
    torch.manual_seed(0)
    model.attach_head("segmentation", SegmentationNet.from_encoder(
        model.encoder, SegmentationConfig(feature_size=4, roi_size=model.preprocess.spatial_size)).eval())
    note = "untrained tiny model on the synthetic cohort (NOT clinical data), built by benchmarks/serve.py"
    return model.save_pretrained(work / "model", provenance={"data_note": note})


def synthetic_input(work: Path, shape: tuple[int, int, int]) -> Path:
    """One synthetic phantom case (NOT clinical data) of the given shape, as .nii.gz."""
    from volumevlm.data.synthetic import generate_cohort

    generate_cohort(work / "input", n=1, seed=7, shape=shape, workers=1, progress=False)
    return sorted((work / "input" / "images").glob("*.nii.gz"))[0]


def start_server(checkpoint: Path, work: Path, args, token: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "volumevlm.serve.cli", "--checkpoint", str(checkpoint), "--port", "0",
               "--device", args.device, "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--queue-size", str(args.queue_size), "--tmp-dir", str(work / "uploads"), "--log-level", "warning",
               "--max-voxels", str(args.max_voxels)]
    if args.index:
        command += ["--index", args.index]
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                               env={**os.environ, "VOLUMEVLM_TOKEN": token})
    first = process.stdout.readline()
    if not first.startswith("volumevlm serve: http"):
        process.kill()
        raise SystemExit(f"error: the server did not start: {first.strip()} {(work / 'server.log').read_text()[-2000:]}")
    return process, first.split()[2]


# ---------------------------------------------------------------------- the load


def hostile_uploads() -> list[tuple[str, bytes]]:
    """(name, bytes) of uploads a careless or hostile client sends; each must be refused."""
    import gzip
    import io

    import nibabel as nib
    import numpy as np

    padding = b"".join(b"# padding line %05d %s\n" % (i, b"x" * 40) for i in range(1500))
    trick = (b"NRRD0004\n" + padding + b"type: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: ascii\n"
             b"data file: /etc/passwd\n\n")
    header = nib.Nifti1Header()
    header.set_data_shape((10, 10, 10))
    header.set_data_dtype(np.float64)
    header["vox_offset"] = 352
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb", compresslevel=9) as gz:
        gz.write(header.binaryblock + bytes(4))
        for _ in range(200):
            gz.write(bytes(1 << 20))
    coarse = nib.Nifti1Image(np.full((48, 48, 48), -1000, dtype=np.int16), np.diag([50.0, 50.0, 50.0, 1.0]))
    return [("trick.nrrd", trick), ("bomb.nii.gz", bomb.getvalue()), ("coarse.nii.gz", gzip.compress(coarse.to_bytes()))]


async def trickle(url: str, endpoint: str, payload: bytes, headers: dict, bytes_per_s: float, stop: float) -> object:
    """An upload sent at ``bytes_per_s``: the status the server answers with (or why none)."""
    host, _, port = url.removeprefix("http://").partition(":")
    boundary = "volumevlmbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.nii.gz\"\r\n\r\n").encode()
    body += payload + f"\r\n--{boundary}--\r\n".encode()
    head = f"POST {endpoint} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    head += f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    reader, writer = await asyncio.open_connection(host, int(port or 80))
    try:
        writer.write(head.encode())
        await writer.drain()
        for offset in range(len(body)):
            try:
                reply = await asyncio.wait_for(reader.read(64), timeout=1.0 / bytes_per_s)
                return int(reply.split(b" ", 2)[1]) if reply else "closed"
            except asyncio.TimeoutError:
                if time.perf_counter() > stop + 60:
                    return "never answered"
                writer.write(body[offset : offset + 1])
                await writer.drain()
        return "sent all"
    except OSError as err:
        return f"{type(err).__name__}"
    finally:
        writer.close()


async def load(url: str, endpoint: str, payload: bytes, name: str, clients: int, duration: float, headers: dict,
               hostile: int = 0) -> tuple[list, list]:
    """(records, hostile records): (start offset s, latency s, status or error text) of every
    request of ``clients`` concurrent loops posting ``payload`` for ``duration`` seconds,
    and of ``hostile`` loops sending :func:`hostile_uploads` and slow uploads meanwhile."""
    import httpx

    records: list[tuple[float, float, object]] = []
    attacks: list[tuple[float, float, object]] = []
    bad = hostile_uploads() if hostile else []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        began = time.perf_counter()
        stop = began + duration

        async def one_client():
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    response = await client.post(endpoint, files={"file": (name, payload)})
                    outcome: object = response.status_code
                    if response.status_code != 200:
                        outcome = f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    outcome = f"{type(err).__name__}: {err}"
                records.append((started - began, time.perf_counter() - started, outcome))

        async def one_attacker(first: int):
            turn = first
            while time.perf_counter() < stop:
                started = time.perf_counter()
                kind = turn % (len(bad) + 1)
                turn += 1
                try:
                    if kind == len(bad):
                        outcome: object = await trickle(url, endpoint, payload, headers, 20.0, stop)
                    else:
                        response = await client.post(endpoint, files={"file": bad[kind]})
                        outcome = response.status_code
                except httpx.HTTPError as err:
                    outcome = f"{type(err).__name__}: {err}"
                attacks.append((started - began, time.perf_counter() - started, outcome))

        await asyncio.gather(*(one_client() for _ in range(clients)), *(one_attacker(i) for i in range(hostile)))
    return records, attacks


def health(url: str, headers: dict) -> dict:
    import httpx

    return httpx.get(url + "/healthz", headers=headers, timeout=60).json()


def summarise(endpoint: str, records: list, elapsed: float, before: dict, after: dict, clients: int,
              attacks: list | None = None, hostile: int = 0) -> dict:
    import numpy as np

    latencies = np.array([latency for _, latency, outcome in records if outcome == 200]) * 1000.0
    errors = [outcome for _, _, outcome in records if outcome != 200]
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    jobs = after["batching"]["jobs"] - before["batching"]["jobs"]

    def pct(q):
        return float(np.percentile(latencies, q)) if latencies.size else None

    # The well-behaved clients' own window: a slow hostile upload may end after theirs.
    window = max((start + latency for start, latency, _ in records), default=elapsed)
    return {
        "endpoint": endpoint,
        "clients": clients,
        "duration_s": round(elapsed, 2),
        "requests": len(records),
        "ok": int(latencies.size),
        "errors": len(errors),
        "error_examples": sorted({str(e) for e in errors})[:5],
        "throughput_rps": latencies.size / window if window > 0 else None,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": float(latencies.max()) if latencies.size else None},
        "mean_batch": jobs / batches if batches else None,
        "model_busy_s": round(after["batching"]["busy_s"] - before["batching"]["busy_s"], 3),
        "server_rss_mb": {"before": before["memory"]["rss_mb"], "after": after["memory"]["rss_mb"],
                          "growth": _minus(after["memory"]["rss_mb"], before["memory"]["rss_mb"]),
                          "peak_after": after["memory"]["peak_rss_mb"]},
        "hostile_clients": hostile,
        "hostile": None if not hostile else {
            "requests": len(attacks or []),
            "answers": dict(sorted(Counter(str(o) for _, _, o in attacks or []).items())),
            # Every hostile request refused with a 4xx: none served, none a server error.
            "all_refused": all(isinstance(o, int) and 400 <= o < 500 for _, _, o in attacks or []),
        },
    }


def _minus(a, b):
    return None if a is None or b is None else round(a - b, 1)


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("endpoint", "clients", "hostile", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms",
                   "mean batch", "RSS before MB", "RSS after MB", "growth MB", "hostile answers"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        answers = "-" if not r["hostile"] else " ".join(f"{k}x{v}" for k, v in r["hostile"]["answers"].items())
        table.add_row(r["endpoint"], str(r["clients"]), str(r["hostile_clients"]), str(r["requests"]), str(r["errors"]),
                      fmt(r["throughput_rps"], "{:.2f}"),
                      fmt(r["latency_ms"]["p50"]), fmt(r["latency_ms"]["p90"]), fmt(r["latency_ms"]["p99"]),
                      fmt(r["mean_batch"], "{:.2f}"), fmt(r["server_rss_mb"]["before"]), fmt(r["server_rss_mb"]["after"]),
                      fmt(r["server_rss_mb"]["growth"]), answers)
    Console(width=max(Console().width, 150)).print(table)


# ---------------------------------------------------------------------- main


def _device_label(device: str) -> str:
    if device.startswith("cpu"):
        return "cpu"
    inner = re.search(r"\((.*)\)", device)
    return re.sub(r"[^A-Za-z0-9]+", "-", inner.group(1) if inner else device).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one here)")
    parser.add_argument("--token", default=os.environ.get("VOLUMEVLM_TOKEN"), help="bearer token for --url")
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: build a tiny untrained one)")
    parser.add_argument("--index", help="retrieval index for the retrieve endpoint")
    parser.add_argument("--device", default="cpu", help="server device (default cpu)")
    parser.add_argument("--endpoints", default="zero-shot,segment", help=f"comma list of {', '.join(ENDPOINTS)}")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per endpoint (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="sequential requests per endpoint before timing (default 3)")
    parser.add_argument("--input", help="CT file to upload (default: a synthetic phantom)")
    parser.add_argument("--input-shape", default="96,96,48", help="shape of the synthetic phantom (default 96,96,48)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-voxels", type=int, default=4_000_000,
                        help="the server's --max-voxels (default 4,000,000: room for the phantom, not for the 50 mm file)")
    parser.add_argument("--hostile", type=int, default=0,
                        help="also measure each endpoint with this many hostile clients at once (default 0: not)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    unknown = [e for e in endpoints if e not in ENDPOINTS]
    if unknown:
        parser.error(f"unknown endpoints {unknown}; choose from {', '.join(ENDPOINTS)}")

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="volumevlm-serve-bench-"))
    process = None
    notes: list[str] = []
    try:
        if args.input:
            upload = Path(args.input)
        else:
            shape = tuple(int(v) for v in args.input_shape.split(","))
            upload = synthetic_input(work, shape)
            notes.append(f"upload: one synthetic phantom {args.input_shape} voxels (NOT clinical data), {upload.stat().st_size} bytes")
        if args.url:
            url, token = args.url.rstrip("/"), args.token
        else:
            checkpoint = Path(args.checkpoint) if args.checkpoint else None
            if checkpoint is None:
                print("building a tiny untrained checkpoint on the synthetic cohort ...", flush=True)
                checkpoint = build_tiny_checkpoint(work)
                notes.append("model: tiny UNTRAINED checkpoint (encoder dim 32, 32x32x16 input) built by this script: "
                             "the figures are the service's overhead around a tiny model, not a real model's speed")
            token = secrets.token_urlsafe(16)
            process, url = start_server(checkpoint, work, args, token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                health(url, headers)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("error: the server does not answer /healthz") from None
                time.sleep(0.2)
        info = httpx.get(url + "/v1/model", headers=headers, timeout=60).json()
        payload = upload.read_bytes()
        rows = []
        first = health(url, headers)
        for endpoint in endpoints:
            path = ENDPOINTS[endpoint]
            for _ in range(args.warmup):
                response = httpx.post(url + path, headers=headers, files={"file": (upload.name, payload)}, timeout=600)
                if response.status_code != 200:
                    raise SystemExit(f"error: warm-up {endpoint}: {response.status_code} {response.text[:300]}")
            for hostile in sorted({0, args.hostile}):
                before = health(url, headers)
                began = time.perf_counter()
                records, attacks = asyncio.run(load(url, path, payload, upload.name, args.clients, args.duration,
                                                    headers, hostile))
                elapsed = time.perf_counter() - began
                after = health(url, headers)
                rows.append(summarise(endpoint, records, elapsed, before, after, args.clients, attacks, hostile))
                print(f"  {endpoint} ({hostile} hostile): {rows[-1]['ok']} ok, {rows[-1]['errors']} errors, "
                      f"{rows[-1]['throughput_rps']:.2f} req/s", flush=True)
        last = health(url, headers)
        device = info["model"]["device"]
        label = _device_label(device)
        title = f"volumevlm serve, {args.clients} clients x {args.duration:g} s ({'CPU: ' + cpu_name() if label == 'cpu' else device})"
        print_table(rows, title)
        payload_json = {
            "benchmark": "HTTP service load test (benchmarks/serve.py)",
            "device": device if label != "cpu" else f"cpu ({cpu_name()}, {os.cpu_count()} cores shared by server and clients)",
            "versions": package_versions("volumevlm", "torch", "monai", "fastapi", "uvicorn", "httpx", "python-multipart"),
            "date": started.isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["serve.py", *argv]),
            "server": {"url": url if args.url else "local (python -m volumevlm.serve.cli)", "max_batch": args.max_batch,
                       "batch_wait_ms": args.batch_wait_ms, "queue_size": args.queue_size, "max_voxels": args.max_voxels,
                       "checkpoint": info["model"].get("checkpoint") if args.checkpoint or args.url else "tiny (built)",
                       "model": {k: info["model"][k] for k in ("embed_dim", "preprocess", "heads")}},
            "upload": {"name": upload.name, "bytes": len(payload)},
            "rows": rows,
            "server_rss_mb": {"start_before_warmup": first["memory"]["rss_mb"], "end": last["memory"]["rss_mb"],
                              "peak": last["memory"]["peak_rss_mb"]},
            "total_errors": sum(r["errors"] for r in rows),
            "notes": notes,
            "wall_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"serve-{label}-{started.date().isoformat()}.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload_json, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
        if payload_json["total_errors"]:
            print(f"error: {payload_json['total_errors']} failed requests (must be 0)", file=sys.stderr)
            return 1
        if not all(r["hostile"]["all_refused"] for r in rows if r["hostile"]):
            print("error: a hostile request was not refused with a 4xx", file=sys.stderr)
            return 1
        return 0
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
