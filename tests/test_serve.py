"""The HTTP service (volumevlm serve) through a real HTTP client on loopback.

Real uvicorn servers (in a thread of this process, and one started as the
``volumevlm serve`` command) on 127.0.0.1, httpx as the client. The checkpoint is the
tiny untrained one of the pipeline tests (fast_dev_run on a 12-case synthetic cohort,
NOT clinical data, with a segmentation and a report head): answers are compared with the
Python API on the same files, not judged for quality.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import uvicorn

import volumevlm
from ct_files import seg_content, write_itk, zip_series
from pretrain_helpers import make_checkpoints
from volumevlm.inference.index import build_index
from volumevlm.inference.statistics import structure_statistics
from volumevlm.io import VolumeWarning, read_volume
from volumevlm.io.writers import write_dicom_series, write_nifti
from volumevlm.models.segmentation import read_label_names
from volumevlm.serve.app import create_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOTICE = volumevlm.NOT_FOR_CLINICAL_USE
# The main server's limits: the phantoms (30 x 26 x 16 = 12,480 voxels, a few kB) fit.
MAX_VOXELS = 20_000
MAX_UPLOAD_MB = 1.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- data


def lps_affine(spacing, shape) -> np.ndarray:
    """Voxel -> RAS mm of an LPS-stored grid (DICOM's order) centred on the origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    return affine


def phantom(shape=(30, 26, 16), spacing=(10.0, 12.0, 16.0)) -> tuple[np.ndarray, np.ndarray]:
    """Integer HU (so DICOM stores them exactly): air, a soft-tissue ellipsoid and a bone
    blob off every symmetry plane."""
    affine = lps_affine(spacing, shape)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((xyz / (120.0, 90.0, 100.0)) ** 2).sum(-1) <= 1.0] = 40.0
    hu[(((xyz - (50.0, -30.0, 40.0)) / 25.0) ** 2).sum(-1) <= 1.0] = 700.0
    return hu, affine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints, the reference model, the phantom in every upload format, an index."""
    root = tmp_path_factory.mktemp("serve")
    checkpoints = make_checkpoints(root)
    model = volumevlm.load(checkpoints["full"])
    files = root / "files"
    files.mkdir()
    hu, affine = phantom()
    inputs = {
        "nii.gz": write_nifti(files / "ct.nii.gz", hu, affine),
        "nii": write_nifti(files / "ct.nii", hu, affine),
        "nrrd": write_itk(files / "ct.nrrd", hu, affine),
        "mha": write_itk(files / "ct.mha", hu, affine),
        "zip": zip_series(write_dicom_series(files / "series", hu, affine, patient_id="PHANTOM"), files / "series.zip"),
    }
    big_hu, big_affine = phantom(shape=(40, 40, 20), spacing=(8.0, 8.0, 12.0))  # 32,000 voxels > MAX_VOXELS
    big = {
        "nii.gz": write_nifti(files / "big.nii.gz", big_hu, big_affine),
        "zip": zip_series(write_dicom_series(files / "big_series", big_hu, big_affine, patient_id="BIG"), files / "big.zip"),
    }
    cohort = checkpoints["cohort"] / "manifest.jsonl"
    index = build_index(model, root / "index", reports=cohort, images=cohort)
    return {**checkpoints, "model": model, "inputs": inputs, "big": big, "index": index}


# ---------------------------------------------------------------------- servers


@contextlib.contextmanager
def running(checkpoint, tmp_dir: Path, **options):
    """A real uvicorn server with create_app(...) on a free loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    app = create_app(checkpoint, device="cpu", tmp_dir=tmp_dir, **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def leftover_files(root: Path) -> list[Path]:
    """Files (anything but empty folders) under a server's temp root."""
    return [p for p in root.rglob("*") if not p.is_dir()]


def upload_folders(root: Path) -> list[Path]:
    return list(root.glob("volumevlm-serve-*/upload-*"))


@pytest.fixture(scope="module")
def main_server(setup, tmp_path_factory):
    """Token, index, small limits, and a long batching window so concurrent requests batch."""
    tmp_root = tmp_path_factory.mktemp("uploads")
    with running(setup["full"], tmp_root, token=TOKEN, index=setup["index"].folder, max_voxels=MAX_VOXELS,
                 max_upload_mb=MAX_UPLOAD_MB, max_batch=8, batch_wait_ms=250, read_threads=4, timeout_s=120) as url:
        yield {"url": url, "tmp": tmp_root}


@pytest.fixture()
def client(main_server):
    with httpx.Client(base_url=main_server["url"], headers=AUTH, timeout=60) as c:
        yield c
    # Every request of every test, success or error, leaves nothing behind.
    assert leftover_files(main_server["tmp"]) == [] and upload_folders(main_server["tmp"]) == []


def post_file(client, endpoint: str, path: Path, name: str | None = None, **params):
    with open(path, "rb") as f:
        return client.post(endpoint, params=params, files={"file": (name or path.name, f.read())})


def assert_error(response, status: int, *words: str) -> dict:
    """A JSON error: the status, one line mentioning ``words``, the notice in body and header."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["code"] and body["not_for_clinical_use"] == NOTICE
    assert "\n" not in body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), (word, body["error"])
    assert response.headers["x-not-for-clinical-use"] == NOTICE
    return body


def ok_json(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["x-not-for-clinical-use"] == NOTICE
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["not_for_clinical_use"] == NOTICE
    return body


# ---------------------------------------------------------------------- every endpoint


def test_every_endpoint_answers_what_the_python_api_gives(setup, client):
    model, path = setup["model"], setup["inputs"]["nii.gz"]

    embedded = ok_json(post_file(client, "/v1/embed", path))
    reference = model.embed(path)
    assert embedded["dim"] == model.embed_dim == len(embedded["embedding"])
    np.testing.assert_allclose(embedded["embedding"], reference.numpy(), atol=1e-5)
    from volumevlm.inference.index import model_fingerprint

    assert embedded["model_fingerprint"] == model_fingerprint(model)
    assert embedded["input"]["shape"] == [30, 26, 16] and embedded["input"]["orientation"] == "LPS"

    scored = ok_json(post_file(client, "/v1/zero-shot", path))
    expected = model.zero_shot(path)
    assert list(scored["probabilities"]) == list(expected)
    np.testing.assert_allclose(list(scored["probabilities"].values()), list(expected.values()), atol=1e-5)
    chosen = ok_json(post_file(client, "/v1/zero-shot", path, findings="splenomegaly,gallstones"))["probabilities"]
    assert chosen == pytest.approx({k: expected[k] for k in ("splenomegaly", "gallstones")}, abs=1e-5)

    top = ok_json(post_file(client, "/v1/phenotypes", path, top_k=4))["phenotypes"]
    expected_top = model.phenotypes(path, top_k=4)
    assert [row["phecode"] for row in top] == [code for code, _, _ in expected_top]
    for row, (_, description, p) in zip(top, expected_top):
        assert row["description"] == description and row["probability"] == pytest.approx(p, abs=1e-5)

    # The mask: the same voxels as model.segment on the same file, in the input geometry.
    response = post_file(client, "/v1/segment", path)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert response.headers["x-not-for-clinical-use"] == NOTICE
    assert 'filename="ct_mask.nii.gz"' in response.headers["content-disposition"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    local = model.segment(path)
    volume = read_volume(path)
    assert mask.shape == volume.shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(local.dataobj))
    names = model.head("segmentation").label_names
    assert read_label_names(mask) == names

    stats = ok_json(post_file(client, "/v1/segment", path, output="json"))
    rows = structure_statistics(local, volume, names)
    assert [r["name"] for r in stats["structures"]] == [r["name"] for r in rows]
    for got, want in zip(stats["structures"], rows):
        assert got["voxels"] == want["voxels"] and got["volume_ml"] == pytest.approx(want["volume_ml"])
        assert (got["mean_hu"] is None) == (want["mean_hu"] is None)
        if want["mean_hu"] is not None:
            assert got["mean_hu"] == pytest.approx(want["mean_hu"], abs=1e-4)
    assert sum(r["voxels"] for r in stats["structures"]) == int((np.asarray(local.dataobj) > 0).sum())

    hits = ok_json(post_file(client, "/v1/retrieve", path, k=3, kind="all"))["hits"]
    expected_hits = model.retrieve(path, k=3, index=setup["index"], kind=None)
    assert [h["id"] for h in hits] == [h["id"] for h in expected_hits]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected_hits], abs=1e-5)
    text = "FINDINGS: LIVER: enlarged liver."
    by_text = ok_json(client.post("/v1/retrieve", params={"k": 2, "kind": "report"}, json={"text": text}))
    expected_text = setup["index"].query_text(model, text, 2, "report")
    assert [h["id"] for h in by_text["hits"]] == [h["id"] for h in expected_text]
    assert [h["score"] for h in by_text["hits"]] == pytest.approx([h["score"] for h in expected_text], abs=1e-5)
    assert by_text["query"] == {"text": text}


def test_every_upload_format_reads_like_the_python_api(setup, client):
    model = setup["model"]
    reference = model.zero_shot(setup["inputs"]["nii.gz"])
    for kind, path in setup["inputs"].items():
        got = ok_json(post_file(client, "/v1/zero-shot", path))
        assert got["input"]["shape"] == [30, 26, 16], kind
        np.testing.assert_allclose(list(got["probabilities"].values()), list(model.zero_shot(path).values()), atol=1e-5,
                                   err_msg=kind)
        # The same phantom stored five ways: the same answer (DICOM holds the same integer HU).
        np.testing.assert_allclose(list(got["probabilities"].values()), list(reference.values()), atol=1e-5, err_msg=kind)
    # The format comes from the content when the name has no suffix.
    unnamed = ok_json(post_file(client, "/v1/zero-shot", setup["inputs"]["nrrd"], name="scan"))
    assert unnamed["input"]["format"] == "nrrd"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(post_file(client, "/v1/segment", setup["inputs"]["zip"]).content))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(model.segment(setup["inputs"]["zip"]).dataobj))


def test_model_health_and_docs(setup, main_server, client):
    info = ok_json(client.get("/v1/model"))
    model = setup["model"]
    assert info["label_names"] == {str(k): v for k, v in sorted(model.head("segmentation").label_names.items())}
    assert info["findings"] == list(model.zero_shot(setup["inputs"]["nii.gz"]))
    assert info["versions"]["volumevlm"] == volumevlm.__version__ and info["versions"]["torch"]
    assert info["model"]["embed_dim"] == model.embed_dim and info["model"]["heads"] == ["report", "segmentation"]
    assert info["limits"]["max_voxels"] == MAX_VOXELS and info["index"]["count"] == len(setup["index"])
    # Without the token: alive, and nothing about load, memory or traffic.
    anonymous = ok_json(httpx.get(main_server["url"] + "/healthz"))
    assert set(anonymous) == {"status", "not_for_clinical_use"} and anonymous["status"] == "ok"
    wrong = ok_json(httpx.get(main_server["url"] + "/healthz", headers={"Authorization": "Bearer nope"}))
    assert "memory" not in wrong and "responses" not in wrong
    health = ok_json(client.get("/healthz"))
    assert health["status"] == "ok" and health["memory"]["rss_mb"] > 0 and health["inflight"] >= 0
    # The schema and its page need the token too.
    for path in ("/openapi.json", "/docs"):
        assert_error(httpx.get(main_server["url"] + path), 401, "missing bearer token")
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.headers["x-not-for-clinical-use"] == NOTICE
    paths = schema.json()["paths"]
    for path in ("/v1/segment", "/v1/zero-shot", "/v1/phenotypes", "/v1/retrieve", "/v1/embed", "/healthz", "/v1/model"):
        assert path in paths
    upload = paths["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# ---------------------------------------------------------------------- bad requests


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "volumevlmtestboundary") -> tuple[bytes, dict]:
    """A multipart/form-data body by hand: (field, filename, content) per part."""
    out = bytearray()
    for field, filename, content in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"Content-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_malformed_truncated_and_wrong_type_uploads_are_4xx_json(setup, tmp_path, client):
    good = setup["inputs"]["nii.gz"].read_bytes()
    raw_nii = setup["inputs"]["nii"].read_bytes()

    def send(name, content, endpoint="/v1/zero-shot"):
        return client.post(endpoint, files={"file": (name, content)})

    # Not a multipart upload at all, or no file in it.
    assert_error(client.post("/v1/zero-shot", json={"image": "ct.nii.gz"}), 415, "multipart/form-data")
    assert_error(client.post("/v1/segment", data={"note": "no file"}, files={"other": ("x", b"y")}), 400, "no file", "'file'")
    body, headers = multipart([("file", "a.nii.gz", good), ("file", "b.nii.gz", good)])
    assert_error(client.post("/v1/zero-shot", content=body, headers=headers), 400, "more than one file")
    assert_error(client.post("/v1/zero-shot", content=b"this is not multipart",
                             headers={"content-type": "multipart/form-data; boundary=xyz"}), 400)
    # The body ends inside the file (a truncated request).
    body, headers = multipart([("file", "ct.nii.gz", good)])
    assert_error(client.post("/v1/zero-shot", content=body[: len(body) // 2], headers=headers), 400, "truncated upload")
    # Whole requests carrying truncated or corrupt files: the reader's one line, about the client's file name.
    truncated = assert_error(send("ct.nii.gz", good[: len(good) * 2 // 3]), 422, "ct.nii.gz", "truncated")
    assert "upload-" not in truncated["error"] and str(tempfile_root()) not in truncated["error"]
    assert_error(send("ct.nii", raw_nii[:2000]), 422, "ct.nii")
    assert_error(send("ct.nii.gz", good[:40]), 422, "truncated or corrupt")
    assert_error(send("series.zip", b"PK\x03\x04" + b"\x00" * 200), 422, "series.zip", "zip")
    notes = io.BytesIO()
    with zipfile.ZipFile(notes, "w") as zf:
        zf.writestr("notes.txt", "not a DICOM file")
    assert_error(send("series.zip", notes.getvalue()), 422, "no DICOM series")
    assert_error(send("empty.nii.gz", b""), 400, "empty")
    # Wrong types: by name, and by content under a CT name.
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    assert_error(send("photo.png", png), 415, "photo.png", "unsupported file type")
    assert_error(send("ct.nii.gz", png), 415, "ct.nii.gz", "PNG")
    assert_error(send("scan", b"%PDF-1.7 ..." + bytes(100)), 415, "PDF")
    assert_error(send("ct.nii.gz", gzip.compress(b"hello " * 100)), 415, "not a NIfTI")
    assert_error(send("ct.mha", raw_nii), 415, "ct.mha", "NIfTI")
    dicom_slice = sorted((setup["root"] / "files" / "series").iterdir())[0].read_bytes()
    assert_error(send("slice", dicom_slice), 422, "single DICOM slice", "zip")
    # Headers pointing at the server's own files are refused before anything reads them.
    detached = b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = /etc/hostname\n"
    assert_error(send("ct.mha", detached), 415, "ElementDataFile must be LOCAL")
    nrrd = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/hostname\n\n"
    assert_error(send("ct.nrrd", nrrd), 415, "separate data file")
    # A valid file whose volume is not a CT volume.
    flat = write_nifti(tmp_path / "flat.nii.gz", np.full((30, 26, 1), -1000.0, dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert_error(post_file(client, "/v1/zero-shot", flat), 422, "flat.nii.gz")
    # Bad query parameters, routes and methods.
    path = setup["inputs"]["nii.gz"]
    assert_error(post_file(client, "/v1/retrieve", path, k=0), 400, "query parameter k")
    assert_error(post_file(client, "/v1/segment", path, output="xml"), 400, "query parameter output")
    assert_error(post_file(client, "/v1/zero-shot", path, findings="9 lives"), 400, "findings")
    assert_error(client.post("/v1/retrieve", json={"txt": "liver"}), 400, "text")
    assert_error(client.post("/v1/retrieve", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/segment"), 405)


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_oversize_uploads_and_voxel_counts_are_413(setup, client):
    big_body = os.urandom(int(2.5 * 2**20))
    # Declared too large (Content-Length): refused before the body is read.
    assert_error(client.post("/v1/zero-shot", files={"file": ("big.nii.gz", big_body)}), 413, "upload larger", "--max-upload-mb")
    # No Content-Length (chunked): counted while it streams in.
    body, headers = multipart([("file", "big.nii.gz", big_body)])

    def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    assert_error(client.post("/v1/zero-shot", content=chunks(), headers=headers), 413, "upload larger")
    # A small file holding more voxels than the server takes: 413 whatever its format.
    for kind, path in setup["big"].items():
        error = assert_error(post_file(client, "/v1/segment", path), 413, "32000 voxels", str(MAX_VOXELS), "--max-voxels")
        assert error["code"] == "too_many_voxels", kind


# ---------------------------------------------------------------------- concurrency


def test_concurrent_requests_are_batched_and_all_correct(setup, main_server, client):
    model = setup["model"]
    paths = [setup["inputs"][k] for k in ("nii.gz", "nii", "nrrd", "mha", "zip", "nii.gz", "nii", "nrrd")]
    expected = model.zero_shot(setup["inputs"]["nii.gz"])
    before = client.get("/healthz").json()["batching"]

    async def fire():
        async with httpx.AsyncClient(base_url=main_server["url"], headers=AUTH, timeout=120) as c:
            requests = [c.post("/v1/zero-shot", files={"file": (p.name, p.read_bytes())}) for p in paths]
            requests += [c.post("/v1/embed", files={"file": (p.name, p.read_bytes())}) for p in paths[:2]]
            requests.append(c.post("/v1/segment", files={"file": (paths[0].name, paths[0].read_bytes())}))
            return await asyncio.gather(*requests)

    responses = asyncio.run(fire())
    for response in responses[: len(paths)]:
        np.testing.assert_allclose(list(ok_json(response)["probabilities"].values()), list(expected.values()), atol=1e-5)
    reference = model.embed(paths[0]).numpy()
    for response in responses[len(paths) : -1]:
        np.testing.assert_allclose(ok_json(response)["embedding"], reference, atol=1e-5)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(responses[-1].content))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(model.segment(paths[0]).dataobj))
    after = client.get("/healthz").json()["batching"]
    zero_shot_jobs = after["jobs_per_verb"]["zero_shot"] - before["jobs_per_verb"].get("zero_shot", 0)
    assert zero_shot_jobs == len(paths)
    # Evidence of batching: fewer model batches than jobs, and some batch held several.
    assert after["batches"] - before["batches"] < after["jobs"] - before["jobs"]
    assert after["largest_batch"] >= 2


# ---------------------------------------------------------------------- auth


def test_bearer_token_is_required_except_for_health(main_server, setup):
    url, path = main_server["url"], setup["inputs"]["nii.gz"]
    files = {"file": ("ct.nii.gz", path.read_bytes())}
    missing = assert_error(httpx.post(url + "/v1/zero-shot", files=files), 401, "missing bearer token")
    assert missing["code"] == "unauthorized"
    wrong = httpx.post(url + "/v1/zero-shot", files=files, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "wrong bearer token")
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(url + "/v1/model"), 401)
    assert_error(httpx.get(url + "/v1/model", headers={"Authorization": f"Basic {TOKEN}"}), 401)
    ok_json(httpx.post(url + "/v1/zero-shot", files=files, headers=AUTH))
    ok_json(httpx.get(url + "/v1/model", headers=AUTH))
    ok_json(httpx.get(url + "/healthz"))
    assert leftover_files(main_server["tmp"]) == []


# ---------------------------------------------------------------------- load, time and the temp folder


class SlowBody:
    """A multipart upload that stops after its first part until ``release`` is set."""

    def __init__(self, content: bytes, name: str = "ct.nii.gz", pause_s: float | None = None):
        self.body, self.headers = multipart([("file", name, content)])
        self.release = threading.Event()
        self.sent_first = threading.Event()
        self.pause_s = pause_s

    def __iter__(self):
        half = len(self.body) // 2
        yield self.body[:half]
        self.sent_first.set()
        self.release.wait(self.pause_s)
        yield self.body[half:]


def post_in_thread(url: str, endpoint: str, body: SlowBody) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def post():
        try:
            result["response"] = httpx.post(url + endpoint, content=iter(body), headers=body.headers, timeout=60)
        except httpx.HTTPError as err:  # kept for the assertion message
            result["error"] = err

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, result


def test_full_queue_is_503_and_uploads_live_in_a_private_folder(setup, tmp_path):
    path = setup["inputs"]["nii.gz"]
    with running(setup["full"], tmp_path, queue_size=1, max_batch=1) as url:
        slow = SlowBody(path.read_bytes())
        thread, result = post_in_thread(url, "/v1/zero-shot", slow)
        assert slow.sent_first.wait(30)
        deadline = time.monotonic() + 30
        while not list(upload_folders(tmp_path)) or not list(upload_folders(tmp_path)[0].iterdir()):
            assert time.monotonic() < deadline, "the upload never reached its folder"
            time.sleep(0.02)
        # While it streams in: one private folder (0700) below the server's own (0700).
        [folder] = upload_folders(tmp_path)
        assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
        assert [p.name for p in folder.iterdir()] == ["upload.part"]
        # The one admitted request holds the queue: the next is turned away at once.
        busy = httpx.post(url + "/v1/zero-shot", files={"file": ("ct.nii.gz", path.read_bytes())}, timeout=30)
        assert_error(busy, 503, "busy", "--queue-size")
        assert busy.headers["retry-after"] == "1"
        slow.release.set()
        thread.join(60)
        assert result.get("response") is not None, result
        ok_json(result["response"])
        ok_json(httpx.post(url + "/v1/zero-shot", files={"file": ("ct.nii.gz", path.read_bytes())}, timeout=60))
        assert leftover_files(tmp_path) == [] and upload_folders(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the server's folder goes with it


def test_a_request_past_the_timeout_is_504_and_cleaned_up(setup, tmp_path):
    path = setup["inputs"]["nii.gz"]
    with running(setup["full"], tmp_path, timeout_s=0.5) as url:
        slow = SlowBody(path.read_bytes(), pause_s=2.0)
        started = time.monotonic()
        thread, result = post_in_thread(url, "/v1/zero-shot", slow)
        thread.join(60)
        assert result.get("response") is not None, result
        assert_error(result["response"], 504, "0.5 s", "--timeout")
        assert time.monotonic() - started >= 0.5
        assert leftover_files(tmp_path) == [] and upload_folders(tmp_path) == []
        health = httpx.get(url + "/healthz").json()
        assert health["inflight"] == 0 and health["responses"]["504"] == 1


# ---------------------------------------------------------------------- the command


def test_volumevlm_serve_command_runs_stops_and_explains_missing_parts(setup, tmp_path):
    env = {**os.environ, "VOLUMEVLM_TOKEN": "from-env"}
    uploads = tmp_path / "uploads"
    command = [sys.executable, "-m", "volumevlm.cli", "serve", "--checkpoint", str(setup["plain"]), "--port", "0",
               "--tmp-dir", str(uploads), "--log-level", "warning"]
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        first = process.stdout.readline()
        assert first.startswith("volumevlm serve: http://127.0.0.1:") and NOTICE in first, first + (tmp_path / "server.log").read_text()
        url = first.split()[2]
        headers = {"Authorization": "Bearer from-env"}
        deadline = time.monotonic() + 60
        while True:
            try:
                ok_json(httpx.get(url + "/healthz"))
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert_error(httpx.get(url + "/v1/model"), 401)
        assert ok_json(httpx.get(url + "/v1/model", headers=headers))["label_names"] is None
        files = {"file": ("ct.nii.gz", setup["inputs"]["nii.gz"].read_bytes())}
        # A checkpoint without a segmentation head, a server without an index: 409 saying what to do.
        assert_error(httpx.post(url + "/v1/segment", files=files, headers=headers), 409, "no segmentation head", "segment_demo")
        assert_error(httpx.post(url + "/v1/retrieve", files=files, headers=headers), 409, "volumevlm index build", "--index")
        ok_json(httpx.post(url + "/v1/zero-shot", files=files, headers=headers))
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert list(uploads.iterdir()) == []


def test_bad_checkpoint_or_busy_port_is_one_line(setup, tmp_path, capsys):
    from volumevlm.serve.cli import main

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: checkpoint directory not found"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["--checkpoint", str(setup["plain"]), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 127.0.0.1:") and "cannot listen" in err and "\n" not in err


# ---------------------------------------------------------------------- hostile clients

HEADER_TRICK_SECRET = b"S3CRET-LINE-ONE root:x:0:0\nsecond line\n"
NRRD_FIELDS = ["type: uint8", "dimension: 3", "sizes: 2 2 2", "encoding: raw"]
MHA_FIELDS = "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"


def nrrd_bytes(lines: list[str], newline: bytes = b"\n") -> bytes:
    return newline.join(line.encode() for line in lines) + newline + newline


def header_tricks(secret: Path) -> dict[str, bytes]:
    """Headers that point the reader at ``secret``, each past one way of checking them
    that fell short: the place in the header, the line ends, other fields' values, the
    spelling, the encoding that makes the reader quote the file in its error."""
    padding = [f"# padding line {i:05d} " + "x" * 40 for i in range(1500)]  # > 64 KiB before the trick
    return {
        "late.nrrd": nrrd_bytes(["NRRD0004", *padding, *NRRD_FIELDS, f"data file: {secret}"]),
        "cr.nrrd": nrrd_bytes(["NRRD0004", *NRRD_FIELDS, f"data file: {secret}"], newline=b"\r"),
        "ascii.nrrd": nrrd_bytes(["NRRD0004", *NRRD_FIELDS[:3], "encoding: ascii", f"data file: {secret}"]),
        "skip.nrrd": nrrd_bytes(["NRRD0004", *NRRD_FIELDS, "byte skip: 3", f"DataFile: {secret}"]),
        "comment.mha": (MHA_FIELDS + f"Comment = ElementDataFile = LOCAL\nElementDataFile = {secret}\n").encode(),
        "name.mha": (MHA_FIELDS + f"Name = ElementDataFile = LOCAL\nElementDataFile = {secret}\n").encode(),
        "lower.mha": (MHA_FIELDS + f"elementdatafile = LOCAL\nElementDataFile = {secret}\n").encode(),
    }


def test_headers_pointing_at_server_files_are_refused_without_echo(setup, client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(HEADER_TRICK_SECRET)
    missing = tmp_path / "no-such-file.txt"
    for name, content in header_tricks(secret).items():
        # Locally, the reader follows the header (a user's own detached data is legitimate):
        # the trick is live, it reads the secret or quotes it in its error.
        local = tmp_path / name
        local.write_bytes(content)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VolumeWarning)  # the secret's bytes are no HU values
                volume = read_volume(local)
            read = np.transpose(volume.array, (2, 1, 0)).astype(np.uint8).tobytes()
            assert read in HEADER_TRICK_SECRET, name
        except volumevlm.errors.InputError as err:
            assert "S3CRET" in str(err), (name, str(err))
        # Over HTTP: refused before any read, the same answer whether the file exists or not.
        for target in (secret, missing):
            body = content.replace(str(secret).encode(), str(target).encode())
            for endpoint in ("/v1/embed", "/v1/segment"):
                response = client.post(endpoint, files={"file": (name, body)})
                error = assert_error(response, 415, name)
                assert b"S3CRET" not in response.content and b"second line" not in response.content
                assert str(tmp_path) not in error["error"]
        first = client.post("/v1/embed", files={"file": (name, content)}).json()["error"]
        other = client.post("/v1/embed", files={"file": (name, content.replace(str(secret).encode(), str(missing).encode()))})
        assert other.json()["error"] == first, name


def test_reader_errors_never_quote_the_upload(setup, client):
    # Attached ASCII data the reader cannot parse: its library error quotes the bytes.
    words = "TOPSECRETWORD and more"
    upload = nrrd_bytes(["NRRD0004", *NRRD_FIELDS[:3], "encoding: ascii"]) + words.encode() + b"\n"
    response = client.post("/v1/embed", files={"file": ("words.nrrd", upload)})
    assert_error(response, 422, "words.nrrd")
    assert b"TOPSECRETWORD" not in response.content


def gzip_bomb(header_shape, data_bytes: int, dtype=np.float64) -> bytes:
    """A .nii.gz: a valid NIfTI header for ``header_shape`` followed by ``data_bytes``
    zero bytes, compressed a MiB at a time (a few hundred kB for hundreds of MB)."""
    header = nib.Nifti1Header()
    header.set_data_shape(header_shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        gz.write(header.binaryblock + b"\x00" * 4)
        zeros = bytes(1 << 20)
        for _ in range(data_bytes >> 20):
            gz.write(zeros)
    return out.getvalue()


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmHWM:"))


def test_work_a_small_upload_causes_is_bounded_before_it_is_done(setup, main_server, client, tmp_path):
    peak_before = peak_rss_mb()
    # 8,000 voxels of 50 mm: within --max-voxels as read, 84 x 84 x 50 once resampled.
    coarse = write_nifti(tmp_path / "coarse.nii.gz", np.full((20, 20, 20), -1000.0, np.float32), np.diag([50.0] * 3 + [1.0]))
    error = assert_error(post_file(client, "/v1/segment", coarse), 413, "coarse.nii.gz", "resampling", str(MAX_VOXELS))
    assert error["code"] == "too_many_voxels"
    # 200 MiB of zeros behind a header that declares 20,000 voxels at most: stopped while inflating.
    bomb = gzip_bomb((10, 10, 10), 200 << 20)
    assert len(bomb) < MAX_UPLOAD_MB * 2**20
    assert_error(client.post("/v1/embed", files={"file": ("bomb.nii.gz", bomb)}), 413, "bomb.nii.gz", "more than")
    # A header that declares more voxels than allowed: refused before inflating at all.
    declared = gzip_bomb((600, 600, 600), 8 << 20)
    assert_error(client.post("/v1/embed", files={"file": ("big.nii.gz", declared)}), 413, "216000000 voxels")
    # A zip whose members inflate past the limit, whatever its headers say.
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("slice1.dcm", "w", force_zip64=True) as member:
            for _ in range(200):
                member.write(bytes(1 << 20))
    assert_error(client.post("/v1/embed", files={"file": ("bomb.zip", packed.getvalue())}), 413, "bomb.zip", "more than")
    # Two bombs at once add nothing up either.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/embed", files={"file": ("bomb.nii.gz", bomb)}), range(2)))
    assert [a.status_code for a in answers] == [413, 413]
    # Inflated a MiB at a time: the server (this process) never held the bombs in memory.
    assert peak_rss_mb() - peak_before < 100
    # Findings: a bounded number of names per request.
    many = ",".join(["splenomegaly", "gallstones"] * 1500)
    assert_error(post_file(client, "/v1/zero-shot", setup["inputs"]["nii.gz"], findings=many), 400, "3000 names", "at most")
    long_name = "a" * 500
    assert_error(post_file(client, "/v1/zero-shot", setup["inputs"]["nii.gz"], findings=long_name), 400, "longer than")
    # After all of it, a normal upload gets the same embedding as the Python API.
    embedded = ok_json(post_file(client, "/v1/embed", setup["inputs"]["nii.gz"]))
    np.testing.assert_allclose(embedded["embedding"], setup["model"].embed(setup["inputs"]["nii.gz"]).numpy(), atol=1e-5)


def trickle(url: str, path: Path, bytes_per_s: float, stop: threading.Event, result: dict) -> None:
    """A client that sends an upload's request head, then its body at ``bytes_per_s``,
    until the server answers (or ``stop``); the status line and the time it came, kept."""
    host, port = url.removeprefix("http://").split(":")
    body, headers = multipart([("file", "ct.nii.gz", path.read_bytes())])
    head = (f"POST /v1/embed HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {headers['content-type']}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        sock.settimeout(1.0 / bytes_per_s if bytes_per_s else 60)
        sent = 0
        while not stop.is_set():
            try:
                reply = sock.recv(4096)
                result["status"] = int(reply.split(b" ", 2)[1]) if reply else None
                result["after_s"] = time.monotonic() - started
                return
            except socket.timeout:
                if bytes_per_s and sent < len(body):
                    try:
                        sock.sendall(body[sent : sent + 1])
                    except OSError:
                        pass
                    sent += 1
            except OSError as err:  # reset by the server
                result["error"] = repr(err)
                return


def test_slow_and_hung_clients_are_dropped_and_free_their_slots(setup, tmp_path):
    path = setup["inputs"]["nii.gz"]
    # Four admission slots, a 1 s grace for uploads, a 60 s request limit.
    with running(setup["full"], tmp_path, queue_size=4, upload_grace_s=1.0, min_upload_kbps=8.0, timeout_s=60) as url:
        stop = threading.Event()
        slow = [{} for _ in range(3)]
        threads = [threading.Thread(target=trickle, args=(url, path, 20.0, stop, r), daemon=True) for r in slow]
        silent: dict = {}
        threads.append(threading.Thread(target=trickle, args=(url, path, 0.0, stop, silent), daemon=True))
        for t in threads:
            t.start()
        time.sleep(0.3)
        # Four hostile clients hold every slot for now; normal requests keep being answered soon after.
        answers = []
        deadline = time.monotonic() + 30
        while len(answers) < 3 and time.monotonic() < deadline:
            response = httpx.post(url + "/v1/embed", files={"file": ("ct.nii.gz", path.read_bytes())}, timeout=30)
            if response.status_code == 200:
                answers.append(response)
            else:
                assert_error(response, 503, "busy")
                time.sleep(0.2)
        for t in threads:
            t.join(30)
        stop.set()
        assert len(answers) == 3
        for result in (*slow, silent):
            # Dropped by the pace rule (408) after about the grace, long before the 60 s limit.
            assert result.get("status") == 408 and result["after_s"] < 10, result
        health = httpx.get(url + "/healthz").json()
        assert health["inflight"] == 0 and health["responses"]["408"] == 4
        assert leftover_files(tmp_path) == []
    # A request that hangs past the deadline frees its slot for the next one.
    with running(setup["full"], tmp_path, queue_size=1, upload_grace_s=30.0, timeout_s=1.0) as url:
        stop, hung = threading.Event(), {}
        thread = threading.Thread(target=trickle, args=(url, path, 0.0, stop, hung), daemon=True)
        thread.start()
        thread.join(30)
        assert hung.get("status") == 504, hung
        ok_json(httpx.post(url + "/v1/embed", files={"file": ("ct.nii.gz", path.read_bytes())}, timeout=30))
        stop.set()


def test_uploads_stay_under_the_tmp_dir_and_a_crash_s_leftovers_go(setup, tmp_path, monkeypatch):
    # What a crashed server left (its pid is gone), and the folder of one still running (ours).
    dead_pid = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    crashed = tmp_path / f"volumevlm-serve-{dead_pid}-abc123"
    (crashed / "upload-x").mkdir(parents=True)
    (crashed / "upload-x" / "upload.nii.gz").write_bytes(b"left over")
    alive = tmp_path / f"volumevlm-serve-{os.getppid()}-def456"
    alive.mkdir()
    # The system temp folder is not for uploads: an unpacked zip must land under tmp_dir.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        folder = mkdtemp(*args, **kwargs)
        made.append(Path(folder))
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with running(setup["full"], tmp_path, max_voxels=MAX_VOXELS) as url:
        assert not crashed.exists() and alive.exists()
        ok_json(httpx.post(url + "/v1/zero-shot", files={"file": ("series.zip", setup["inputs"]["zip"].read_bytes())},
                           timeout=60))
        broken = io.BytesIO()
        with zipfile.ZipFile(broken, "w") as zf:
            zf.writestr("a/b/slice.dcm", b"\x00" * 200)
        error = assert_error(httpx.post(url + "/v1/embed", files={"file": ("series.zip", broken.getvalue())}, timeout=60),
                             422, "series.zip")
        assert str(tmp_path) not in error["error"] and "volumevlm-serve" not in error["error"]
    assert made and all(system_tmp not in folder.parents for folder in made), made
    assert list(system_tmp.iterdir()) == []


def test_segment_as_dicom_seg_over_http_equals_the_python_api(setup, client, tmp_path):
    from volumevlm.io import write_dicom_enhanced

    model = setup["model"]
    api = tmp_path / "api.dcm"
    model.segment(setup["inputs"]["zip"], out=api)
    response = post_file(client, "/v1/segment", setup["inputs"]["zip"], output="dicom-seg")
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    assert response.headers["content-disposition"] == 'attachment; filename="series_seg.dcm"'
    served = tmp_path / "served.dcm"
    served.write_bytes(response.content)
    assert seg_content(served) == seg_content(api) and seg_content(api)["frames"]
    # One enhanced multi-frame CT file is an upload of its own.
    volume = read_volume(setup["inputs"]["zip"])
    enhanced = write_dicom_enhanced(tmp_path / "enhanced.dcm", volume.array, volume.affine, patient_id="PHANTOM")
    model.segment(enhanced, out=tmp_path / "api_enhanced.dcm")
    response = post_file(client, "/v1/segment", enhanced, output="dicom-seg")
    (tmp_path / "served_enhanced.dcm").write_bytes(response.content)
    assert seg_content(tmp_path / "served_enhanced.dcm") == seg_content(tmp_path / "api_enhanced.dcm")
    # A NIfTI upload has no DICOM to reference: one line, before the model runs.
    assert_error(post_file(client, "/v1/segment", setup["inputs"]["nii.gz"], output="dicom-seg"), 400,
                 "ct.nii.gz", "dicom-seg needs a DICOM upload")


def test_zero_shot_and_phenotypes_organ_by_organ_over_http_equal_the_python_api(setup, client, tmp_path):
    """``?anatomy=true`` reads in the organs the model segments, batched as the other
    requests are: the answers equal ``model.zero_shot(x, anatomy=True)`` and
    ``model.phenotypes(x, anatomy=True)`` on the same files; a checkpoint without the
    anatomy head answers 409 with the recipe, before reading the upload."""
    from volumevlm.models.anatomy import AnatomyHead, organ_statistics_width

    path = setup["inputs"]["nii.gz"]
    assert_error(post_file(client, "/v1/zero-shot", path, anatomy="true"), 409, "anatomy", "experiment=report_demo")
    assert_error(post_file(client, "/v1/phenotypes", path, anatomy="true"), 409, "anatomy", "experiment=report_demo")

    model = volumevlm.load(setup["full"])
    torch.manual_seed(3)
    classes = model.head("segmentation").config.num_classes
    head = AnatomyHead(["SPLEEN", "PERITONEUM"], {"splenomegaly": "SPLEEN", "ascites": "PERITONEUM"},
                       organ_classes=classes, feature_dim=model.encoder.config.dim + organ_statistics_width(),
                       embed_dim=model.embed_dim, phecodes=list(model.phecode_vocab.codes)[:3])
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.3)
    model.attach_head("anatomy", head.eval())
    checkpoint = model.save_pretrained(tmp_path / "anatomy")
    model = volumevlm.load(checkpoint)
    files = [setup["inputs"]["nii.gz"], setup["inputs"]["nrrd"]]
    # An anatomy index (global + organ-system vectors): the server compares uploads through
    # the same organ-by-organ pass.
    cohort = setup["cohort"] / "manifest.jsonl"
    anatomy_index = build_index(model, tmp_path / "anatomy_index", reports=cohort, images=cohort, anatomy=True)
    with running(checkpoint, tmp_path / "uploads", max_batch=4, batch_wait_ms=200, index=anatomy_index.folder) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            for file in files:
                hits = ok_json(post_file(c, "/v1/retrieve", file, k=3, kind="all"))["hits"]
                expected_hits = model.retrieve(file, k=3, index=anatomy_index, kind=None)
                assert [h["id"] for h in hits] == [h["id"] for h in expected_hits]
                assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected_hits], abs=1e-4)
            by_text = ok_json(c.post("/v1/retrieve", params={"k": 2, "kind": "report"}, json={"text": "Splenomegaly."}))
            assert [h["id"] for h in by_text["hits"]] == [h["id"] for h in anatomy_index.query_text(model, "Splenomegaly.", 2,
                                                                                                   "report")]
            for file in files:
                scored = ok_json(post_file(c, "/v1/zero-shot", file, anatomy="true"))
                expected = model.zero_shot(file, anatomy=True)
                assert scored["anatomy"] is True and list(scored["probabilities"]) == list(expected)
                np.testing.assert_allclose(list(scored["probabilities"].values()), list(expected.values()), atol=1e-4)
                # Read organ by organ, the routed findings differ from the global reading.
                assert scored["probabilities"]["splenomegaly"] != pytest.approx(model.zero_shot(file)["splenomegaly"])
                chosen = ok_json(post_file(c, "/v1/zero-shot", file, anatomy="true", findings="ascites"))
                assert chosen["probabilities"] == pytest.approx({"ascites": expected["ascites"]}, abs=1e-4)
                top = ok_json(post_file(c, "/v1/phenotypes", file, anatomy="true", top_k=2))["phenotypes"]
                expected_top = model.phenotypes(file, top_k=2, anatomy=True)
                assert [row["phecode"] for row in top] == [code for code, _, _ in expected_top]
                assert [row["probability"] for row in top] == pytest.approx([p for _, _, p in expected_top], abs=1e-4)
            # Without the option the same server answers from the global embedding.
            plain = ok_json(post_file(c, "/v1/zero-shot", files[0]))
            assert plain["anatomy"] is False
            np.testing.assert_allclose(list(plain["probabilities"].values()),
                                       list(model.zero_shot(files[0]).values()), atol=1e-5)
