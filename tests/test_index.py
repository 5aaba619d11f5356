"""The retrieval index (issue 6, section 2): exact chunked top-k against brute force (ties
included), reports / organ-system sections / images from the real files, ``volumevlm index
build`` and ``query`` as subprocesses, ``retrieve`` (model.retrieve), corrupt folders and
mismatched models as one-line errors.

The model is a tiny checkpoint pretrained for one fast_dev_run step on a 12-case
synthetic cohort (NOT clinical data): its rankings mean nothing, so real-model results
are checked against brute-force cosines over the same embeddings, and exact tie order on
hand-made vectors whose cosines are exact in float arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.inference.index import (
    IndexWriter,
    RetrievalIndex,
    build_index,
    model_fingerprint,
    read_reports,
    retrieve,
    top_k,
)
from volumevlm.text.sections import split_report

CLI = [sys.executable, "-m", "volumevlm.cli"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cohort folder, checkpoint folder): synthetic cohort (NOT clinical data) and a model
    trained one step on it from the real configs."""
    from volumevlm.train.train import train

    root = tmp_path_factory.mktemp("index")
    cohort = make_cohort(root / "cohort")
    _, objects = train(shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr"))
    return cohort, Path(objects["model_dir"])


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """An index of every report section and every image of the cohort, 16 rows a chunk,
    built through the CLI: (index folder, the build command's stdout summary)."""
    cohort, checkpoint = tiny
    out = tmp_path_factory.mktemp("built") / "idx"
    manifest = cohort / "manifest.jsonl"
    done = _cli("index", "build", "--checkpoint", str(checkpoint), "--reports", str(manifest), "--manifest", str(manifest),
                "--sections", "--out", str(out), "--chunk-size", "16", "--no-progress")
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The console script in a fresh interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The same command line through volumevlm.cli.main in this process (no new
    interpreter to start): (exit status, stdout, stderr)."""
    from volumevlm.cli import main

    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def _manifest_rows(cohort: Path) -> list[dict]:
    return [json.loads(line) for line in (cohort / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _stored(index: RetrievalIndex) -> torch.Tensor:
    """Every stored vector, upcast and renormalised as a query sees them: float32 [N, E]."""
    return torch.cat([vectors for _, vectors in index._chunks(torch.device("cpu"))])


def _brute_force(queries: torch.Tensor, vectors: torch.Tensor, k: int, allowed: list[int]) -> list[list[tuple[float, int]]]:
    """Reference ranking: every allowed entry's cosine in one matmul, sorted by (-score, index)."""
    scores = F.normalize(queries.float(), dim=1) @ vectors.T
    return [sorted(((float(row[j]), j) for j in allowed), key=lambda t: (-t[0], t[1]))[:k] for row in scores]


# ---------------------------------------------------------------------- exact top-k on hand-made vectors


def _dyadic_unit_vectors(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[n, dim] with four entries of +-1/2 and the rest 0: unit length exactly, and every
    cosine between two of them is a multiple of 1/4, exact in any summation order (so the
    chunked and the one-matmul scores are bitwise equal and ties are true ties)."""
    out = torch.zeros(n, dim)
    for i in range(n):
        where = torch.randperm(dim, generator=generator)[:4]
        out[i, where] = 0.5 * (torch.randint(0, 2, (4,), generator=generator) * 2 - 1).float()
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chunked_top_k_equals_brute_force_including_ties(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    n, dim = 61, 6  # 61 entries in chunks of 7: 9 chunks, the last one partial
    vectors = _dyadic_unit_vectors(n, dim, g)
    vectors[40] = vectors[3]  # exact duplicates in other chunks
    vectors[59] = vectors[3]
    kinds = ["report" if i % 3 else "image" for i in range(n)]
    with IndexWriter(tmp_path / "idx", fingerprint="sha256:test", dtype=dtype, chunk_size=7) as writer:
        for lo in range(0, n, 5):  # batches that do not line up with the chunks
            writer.add(vectors[lo : lo + 5] * 3.0, [{"kind": kinds[i], "id": f"e{i}"} for i in range(lo, min(lo + 5, n))])
        index = writer.commit()
    assert len(index) == n and len(index.header["chunks"]) == 9 and index.kind_counts == {"report": 40, "image": 21}
    assert torch.equal(_stored(index), vectors)  # stored at unit length; +-1/2 is exact in float16 too
    queries = _dyadic_unit_vectors(9, dim, g)
    queries[0] = vectors[3]
    for kind in (None, "report", "image"):
        allowed = [i for i in range(n) if kind is None or kinds[i] == kind]
        for k in (1, 4, 13, 61, 100):
            scores, indices = index.search(queries, k, kind)
            expected = _brute_force(queries, vectors, k, allowed)
            assert indices.tolist() == [[j for _, j in row] for row in expected], (kind, k)
            assert scores.tolist() == [[s for s, _ in row] for row in expected], (kind, k)
    hits = index.query(queries[0], k=3)[0]
    assert [(h["rank"], h["index"], h["id"], h["score"]) for h in hits] == [(1, 3, "e3", 1.0), (2, 40, "e40", 1.0), (3, 59, "e59", 1.0)]


def test_top_k_breaks_ties_by_lower_column():
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, columns = top_k(scores, 3)
    assert columns.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert values.tolist() == [[0.75, 0.75, 0.5], [0.0, 0.0, 0.0]]


def test_random_vectors_in_float16_match_brute_force(tmp_path):
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(300, 16, generator=g)
    with IndexWriter(tmp_path / "idx", fingerprint="sha256:test", chunk_size=64) as writer:
        writer.add(vectors, [{"kind": "report", "id": str(i)} for i in range(300)])
        index = writer.commit()
    stored = _stored(index)
    # float16 keeps ~3 decimal digits of each unit vector
    assert torch.allclose(stored, F.normalize(vectors, dim=1), atol=1e-3)
    queries = torch.randn(5, 16, generator=g)
    scores, indices = index.search(queries, 10)
    expected = _brute_force(queries, stored, 10, list(range(300)))
    assert indices.tolist() == [[j for _, j in row] for row in expected]
    assert torch.allclose(scores, torch.tensor([[s for s, _ in row] for row in expected]), atol=1e-6)


# ---------------------------------------------------------------------- corpora


def test_reports_and_sections_are_read_from_jsonl_csv_and_txt(tiny, tmp_path):
    cohort, _ = tiny
    rows = _manifest_rows(cohort)
    whole = read_reports(cohort / "manifest.jsonl")
    assert [meta["id"] for _, meta in whole] == [row["id"] for row in rows]
    assert [text for text, _ in whole] == [row["report"].strip() for row in rows]
    sections = read_reports(cohort / "manifest.jsonl", sections=True)
    expected = [(row["id"], header, f"{header}: {body}") for row in rows for header, body in split_report(row["report"]).items()]
    assert [(m["report_id"], m["section"], text) for text, m in sections] == expected
    assert all(m["id"] == f"{m['report_id']}#{m['section']}" and m["text"] == text for text, m in sections)
    assert {"LIVER AND BILIARY TREE", "SPLEEN", "IMPRESSION"} <= {m["section"] for _, m in sections}

    (tmp_path / "one.txt").write_text(rows[0]["report"])
    (tmp_path / "more.csv").write_text('id,report\nr1,"LIVER AND BILIARY TREE: Normal.\nSPLEEN: Enlarged."\nr2,\n')
    mixed = read_reports([tmp_path / "one.txt", tmp_path / "more.csv"], sections=True)
    assert [m["id"] for _, m in mixed][-2:] == ["r1#LIVER AND BILIARY TREE", "r1#SPLEEN"]  # r2 has no report
    assert mixed[0][1]["report_id"] == "one"
    (tmp_path / "bad.csv").write_text("id,text\n1,x\n")
    (tmp_path / "dup.txt").write_text("x")
    for bad, words in (([tmp_path / "bad.csv"], "no 'report' column"), ([tmp_path / "one.txt", tmp_path / "one.txt"], "duplicate"),
                       ([tmp_path / "x.pdf"], "unsupported")):
        with pytest.raises(VolumeVLMError, match=words) as err:
            read_reports(bad)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- the real model, through the CLI


def test_cli_build_holds_every_section_and_image_embedded_by_the_model(tiny, built):
    cohort, checkpoint = tiny
    out, summary = built
    rows = _manifest_rows(cohort)
    n_sections = sum(len(split_report(row["report"])) for row in rows)
    assert summary["count"] == n_sections + len(rows) and summary["kinds"] == {"report": n_sections, "image": len(rows)}
    assert summary["chunks"] == -(-summary["count"] // 16)
    index = RetrievalIndex.open(out)
    assert index.checkpoint == str(checkpoint.resolve())
    assert "NOT clinical" in index.header["info"]["data_note"]
    model = volumevlm.load(checkpoint)
    assert index.fingerprint == model_fingerprint(model)
    stored = _stored(index)
    # The stored vectors are the model's embeddings (float16 storage: ~1e-3).
    texts = [index.entry(i)["text"] for i in range(n_sections)]
    with torch.no_grad():
        assert torch.allclose(stored[:n_sections], model.encode_text(texts), atol=2e-3)
        x = volumevlm.preprocess(cohort / rows[3]["image"], model.preprocess)
        assert torch.allclose(stored[n_sections + 3], model.encode_image(x.as_tensor()[None])[0], atol=2e-3)
    assert index.entry(n_sections + 3) == {"kind": "image", "id": rows[3]["id"], "source": str((cohort / rows[3]["image"]).resolve())}


def test_cli_query_by_text_and_image_gives_the_brute_force_top_k(tiny, built, capsys):
    cohort, checkpoint = tiny
    out, _ = built
    index = RetrievalIndex.open(out)
    stored = _stored(index)
    reports = [i for i in range(len(index)) if index.entry(i)["kind"] == "report"]
    images = [i for i in range(len(index)) if index.entry(i)["kind"] == "image"]
    model = volumevlm.load(checkpoint)
    text = index.entry(5)["text"]

    done = _cli("index", "query", "--index", str(out), "--checkpoint", str(checkpoint), "--text", text, "-k", "7", "--json")
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    with torch.no_grad():
        query = model.encode_text([text])
    expected = _brute_force(query, stored, 7, reports + images)[0]
    # An untrained model has near-equal cosines: the top-k scores must match, and every hit's
    # own brute-force cosine must be its score.
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert [h["score"] for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)
    reference = F.normalize(query, dim=1) @ stored.T
    assert [h["score"] for h in hits] == pytest.approx([float(reference[0, h["index"]]) for h in hits], abs=1e-5)
    assert all(h == {**index.entry(h["index"]), **{k: h[k] for k in ("rank", "score", "index")}} for h in hits)

    image = cohort / _manifest_rows(cohort)[2]["image"]
    status, stdout, stderr = _main(capsys, "index", "query", "--index", str(out), "--image", str(image), "-k", "3", "--kind", "image")
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[:4] == ["1", "+1.0000", "image", "case_00002"]


def test_retrieve_returns_report_sections_for_any_input_form(tiny, built):
    cohort, checkpoint = tiny
    out, _ = built
    model = volumevlm.load(checkpoint)
    index = RetrievalIndex.open(out)
    stored = _stored(index)
    reports = [i for i in range(len(index)) if index.entry(i)["kind"] == "report"]
    path = cohort / _manifest_rows(cohort)[4]["image"]

    hits = retrieve(model, path, k=5, index=out)
    assert len(hits) == 5 and all(h["kind"] == "report" and "#" in h["id"] for h in hits)
    from volumevlm.inference.pipeline import embed

    query = embed(model, path)[None]
    expected = _brute_force(query, stored, 5, reports)[0]
    assert [h["score"] for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)

    image = nib.load(str(path))
    same = retrieve(model, (image.get_fdata(), image.affine), k=5, index=index)  # an opened index, (array, affine)
    assert [h["index"] for h in same] == [h["index"] for h in hits]
    many = retrieve(model, [path, image], k=2, index=index, kind=None)
    assert len(many) == 2 and [h["index"] for h in many[0]] == [h["index"] for h in many[1]]
    assert many[0][0]["kind"] == "image" and many[0][0]["score"] == pytest.approx(1.0, abs=1e-4)  # itself
    assert model.retrieve(path, k=5, index=out) == hits  # the VolumeVLM method is the same verb

    with pytest.raises(VolumeVLMError) as err:
        retrieve(model, path)
    assert "\n" not in str(err.value) and "volumevlm index build" in str(err.value)


# ---------------------------------------------------------------------- errors


def test_mismatched_model_is_refused_in_one_line(tiny, built, tmp_path, capsys):
    cohort, checkpoint = tiny
    out, _ = built
    model = volumevlm.load(checkpoint)
    fingerprint = model_fingerprint(model)
    assert model_fingerprint(volumevlm.load(checkpoint)) == fingerprint
    # A downstream head does not change the embeddings, so the index stays valid.
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet

    model.attach_head("segmentation", SegmentationNet.from_encoder(model.encoder, SegmentationConfig(feature_size=4)))
    assert model_fingerprint(model) == fingerprint
    with torch.no_grad():
        next(model.text_projection.parameters()).view(-1)[0] += 0.01
    assert model_fingerprint(model) != fingerprint
    path = cohort / _manifest_rows(cohort)[0]["image"]
    with pytest.raises(VolumeVLMError) as err:
        retrieve(model, path, index=out)
    message = str(err.value)
    assert "\n" not in message and "different model" in message and str(out) in message

    other = model.save_pretrained(tmp_path / "other")
    status, stdout, stderr = _main(capsys, "index", "query", "--index", str(out), "--checkpoint", str(other), "--text", "SPLEEN: Normal.")
    assert status == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "different model" in stderr


def _small_index(folder: Path) -> RetrievalIndex:
    with IndexWriter(folder, fingerprint="sha256:test", chunk_size=4) as writer:
        writer.add(torch.randn(10, 8, generator=torch.Generator().manual_seed(2)),
                   [{"kind": "report", "id": f"r{i}", "text": f"report {i}"} for i in range(10)])
        return writer.commit()


def _corruptions():
    def edit_json(path: Path, **changes):
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    return {
        "chunk file deleted": lambda d: (d / "chunks" / "chunk-00001.safetensors").unlink(),
        "chunk file truncated": lambda d: (d / "chunks" / "chunk-00002.safetensors").write_bytes(
            (d / "chunks" / "chunk-00002.safetensors").read_bytes()[:-20]),
        "index.json not JSON": lambda d: (d / "index.json").write_text("{oops"),
        "index.json count wrong": lambda d: edit_json(d / "index.json", count=11),
        "index.json dtype wrong": lambda d: edit_json(d / "index.json", dtype="float32"),
        "entries.jsonl truncated": lambda d: (d / "entries.jsonl").write_bytes((d / "entries.jsonl").read_bytes()[:-3]),
        "lookup deleted": lambda d: (d / "entries.safetensors").unlink(),
        "not an index": lambda d: (d / "index.json").write_text(json.dumps({"format": "something else"})),
        "index.json deleted": lambda d: (d / "index.json").unlink(),
        "index.json unknown space": lambda d: edit_json(d / "index.json", info={"space": "organs"}),
    }


@pytest.mark.parametrize("name", list(_corruptions()))
def test_corrupt_index_folders_fail_in_one_line_naming_the_file(tmp_path, name):
    folder = _small_index(tmp_path / "idx").folder
    _corruptions()[name](folder)
    with pytest.raises(VolumeVLMError) as err:
        RetrievalIndex.open(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message


def test_corrupt_folder_through_the_cli_and_safe_rebuilds(tmp_path, capsys):
    folder = _small_index(tmp_path / "idx").folder
    (folder / "entries.safetensors").write_bytes(b"garbage")
    status, _, stderr = _main(capsys, "index", "query", "--index", str(folder), "--checkpoint", str(tmp_path), "--text", "x")
    assert status == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert "entries.safetensors" in stderr

    # A rebuild replaces the old index whole, and leaves no temporary folder behind.
    index = _small_index(folder)
    assert len(RetrievalIndex.open(folder)) == 10 and index.entry(9)["text"] == "report 9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    # A folder that is not an index is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(VolumeVLMError, match="not a retrieval index"):
        _small_index(other)
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["idx", "notes"]
    # A build that fails half-way leaves nothing.
    with pytest.raises(VolumeVLMError, match="zero or not finite"):
        with IndexWriter(tmp_path / "half", fingerprint="sha256:test") as writer:
            writer.add(torch.zeros(2, 4), [{"kind": "report", "id": "a"}, {"kind": "report", "id": "b"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "notes"]


def test_build_index_from_python_with_image_paths(tiny, tmp_path):
    cohort, checkpoint = tiny
    model = volumevlm.load(checkpoint)
    paths = [cohort / row["image"] for row in _manifest_rows(cohort)[:3]]
    index = build_index(model, tmp_path / "img", images=paths, dtype="float32", chunk_size=2)
    assert index.kind_counts == {"report": 0, "image": 3} and [index.entry(i)["id"] for i in range(3)] == [p.name[:-7] for p in paths]
    with pytest.raises(VolumeVLMError, match="no report entries"):
        retrieve(model, paths[0], index=index)
    hits = retrieve(model, paths[1], k=1, index=index, kind="image")
    assert hits[0]["id"] == paths[1].name[:-7] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(VolumeVLMError) as err:
        build_index(model, tmp_path / "bad", images=[bad])
    assert "\n" not in str(err.value) and str(bad) in str(err.value) and not (tmp_path / "bad").exists()


def test_anatomy_index_scores_by_the_global_and_the_organ_system_cosines(tiny, tmp_path, capsys):
    """``--anatomy``: each report and image is stored as [global / sqrt 2, each organ-system
    section / sqrt(2 S)], by hand here from the text tower, the segmentation head and the
    anatomy head; an image query's hits are the brute-force ranking of those vectors; a
    query text without section headers is its global embedding alone; the heads' weights
    are part of the fingerprint."""
    from volumevlm.models.anatomy import AnatomyHead, organ_features, organ_labels, organ_statistics_width
    from volumevlm.models.report import encoder_features
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    cohort, checkpoint = tiny
    model = volumevlm.load(checkpoint)
    with pytest.raises(VolumeVLMError, match="segmentation") as err:
        build_index(model, tmp_path / "none", reports=cohort / "manifest.jsonl", anatomy=True)
    assert "\n" not in str(err.value) and not (tmp_path / "none").exists()
    torch.manual_seed(5)
    seg = SegmentationNet.from_encoder(model.encoder, SegmentationConfig(feature_size=4, roi_size=model.preprocess.spatial_size))
    model.attach_head("segmentation", seg.eval())
    sections = ["SPLEEN", "KIDNEYS AND URETERS", "LIVER AND BILIARY TREE"]
    head = AnatomyHead(sections, {"splenomegaly": "SPLEEN"}, organ_classes=seg.config.num_classes,
                       feature_dim=model.encoder.config.dim + organ_statistics_width(), embed_dim=model.embed_dim)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.3)
    model.attach_head("anatomy", head.eval())
    model = volumevlm.load(model.save_pretrained(tmp_path / "anatomy_ckpt"))
    head, seg = model.head("anatomy"), model.head("segmentation")
    rows = _manifest_rows(cohort)
    manifest = cohort / "manifest.jsonl"
    status, out, err = _main(capsys, "index", "build", "--checkpoint", str(tmp_path / "anatomy_ckpt"), "--reports",
                             str(manifest), "--manifest", str(manifest), "--anatomy", "--dtype", "float32",
                             "--out", str(tmp_path / "idx"), "--no-progress")
    assert status == 0, err
    assert json.loads(out)["space"] == "anatomy"
    index = RetrievalIndex.open(tmp_path / "idx")
    assert index.space == "anatomy" and index.header["info"]["anatomy_sections"] == sections
    assert index.kind_counts == {"report": len(rows), "image": len(rows)}
    assert index.embed_dim == (1 + len(sections)) * model.embed_dim

    def by_hand(global_emb: torch.Tensor, section_emb: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(global_emb, dim=-1) / 2 ** 0.5]
        parts += [F.normalize(row, dim=-1) / (2 * len(sections)) ** 0.5 if row.any() else row for row in section_emb]
        return torch.cat(parts)

    with torch.no_grad():
        reports = []
        for row in rows:
            split = split_report(row["report"])
            # A whole report as pretraining matched it (this tower reads whole reports).
            assert not model.text_config.sections
            global_emb = model.encode_text([row["report"]])[0]
            section_emb = torch.stack([model.encode_text([f"{name}: {split[name]}"])[0] if split.get(name, "").strip()
                                       else torch.zeros(model.embed_dim) for name in sections])
            reports.append(by_hand(global_emb, section_emb))
        images = []
        for row in rows:
            x = volumevlm.preprocess(cohort / row["image"], model.preprocess).as_tensor()[None]
            out = model.encoder(x)
            tokens, grid = encoder_features(out)
            organs = organ_features(tokens, grid, x, organ_labels(seg, x), seg.config.num_classes, head.organ_statistics,
                                    model.preprocess.hu_window)
            images.append(by_hand(model.encode_image(x)[0], head(organs)[0]))
    expected = torch.cat([torch.stack(reports), torch.stack(images)])
    assert any(r[model.embed_dim:].abs().sum() > 0 for r in reports)  # the sections are there
    stored = _stored(index)
    assert torch.allclose(stored, F.normalize(expected, dim=1), atol=1e-5)
    # An image query: the brute-force ranking of the by-hand vectors, through retrieve().
    query = cohort / rows[2]["image"]
    hits = retrieve(model, query, k=4, index=index)
    reference = _brute_force(images[2][None], F.normalize(expected, dim=1), 4, list(range(len(rows))))[0]
    assert [h["index"] for h in hits] == [j for _, j in reference]
    assert [h["score"] for h in hits] == pytest.approx([s for s, _ in reference], abs=1e-5)
    # A query text without section headers: its global embedding, the sections' part zero.
    text = "Splenomegaly."
    with torch.no_grad():
        vector = torch.cat([model.encode_text([text])[0] / 2 ** 0.5, torch.zeros(len(sections) * model.embed_dim)])
    got = index.query_text(model, text, k=3, kind="report")
    assert [h["index"] for h in got] == [h["index"] for h in index.query(vector, 3, "report")[0]]
    # The anatomy head's weights are part of what the index was built with.
    with torch.no_grad():
        model.head("anatomy").weight.add_(0.01)
    with pytest.raises(VolumeVLMError, match="different model") as err:
        retrieve(model, query, index=index)
    assert "\n" not in str(err.value)
    with pytest.raises(VolumeVLMError, match="drop --sections or --anatomy") as err:
        build_index(model, tmp_path / "both", reports=manifest, sections=True, anatomy=True)
    assert "\n" not in str(err.value)


def test_whole_reports_are_embedded_as_pretraining_matched_them(tiny, tmp_path):
    """``encode_reports`` (what evaluation's retrieval and a whole-report index compare images
    with): a tower that reads whole reports embeds the text at once; a tower trained on
    sections, the re-normalised mean of the sections' embeddings."""
    from volumevlm.text.sections import report_sections

    cohort, checkpoint = tiny
    model = volumevlm.load(checkpoint).eval()
    reports = [row["report"] for row in _manifest_rows(cohort)[:3]]
    with torch.no_grad():
        whole = model.encode_reports(reports)
        assert torch.allclose(whole, model.encode_text(reports), atol=1e-6)
        index = build_index(model, tmp_path / "whole", reports=cohort / "manifest.jsonl", dtype="float32")
        assert torch.allclose(_stored(index)[:3], whole, atol=1e-5)
        model.text_config.sections = True
        by_sections = model.encode_reports(reports)
        expected = torch.stack([F.normalize(model.encode_text(report_sections(r)).mean(0), dim=-1) for r in reports])
        assert torch.allclose(by_sections, expected, atol=1e-6) and not torch.allclose(by_sections, whole, atol=1e-3)
        index = build_index(model, tmp_path / "sections", reports=cohort / "manifest.jsonl", dtype="float32")
        assert torch.allclose(_stored(index)[:3], by_sections, atol=1e-5)
