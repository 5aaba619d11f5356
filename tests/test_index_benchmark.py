"""benchmarks/index.py, the retrieval-index scale benchmark: a tiny end-to-end run through
its real child processes, and its exactness check catching wrong answers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "index.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("volumevlm_index_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_is_exact_and_records_everything(bench, tmp_path):
    # One size: each size costs two fresh Python processes (build, query) importing torch.
    work, results = tmp_path / "work", tmp_path / "results"
    sizes, chunk, queries, dim = (5000,), 700, 6, 16
    argv = ["--sizes", ",".join(map(str, sizes)), "--dim", str(dim), "--chunk-size", str(chunk), "--batch-size", "512",
            "--queries", str(queries), "--k", "10", "--workdir", str(work), "--out", str(results), "--no-progress"]
    assert bench.main(argv) == 0

    files = sorted(results.glob("index-cpu-*.json"))
    assert [f.name.endswith("-failed.json") for f in files] == [False]
    data = json.loads(files[0].read_text())
    assert data["exact"] is True and data["failure"] is None
    assert data["device"].startswith("cpu (")
    assert all(data["versions"][name] for name in ("torch", "safetensors", "numpy", "python"))
    assert data["date"][:10] in files[0].name
    assert data["command"] == "benchmarks/index.py " + " ".join(argv)
    assert data["settings"]["sizes"] == list(sizes) and data["settings"]["chunk_size"] == chunk

    assert [row["entries"] for row in data["rows"]] == list(sizes)
    for row in data["rows"]:
        n = row["entries"]
        assert row["exact"] is True
        build, query, check = row["build"], row["query"], row["verification"]
        # Several chunks: the chunked merge is what is being checked.
        assert build["chunks"] == math.ceil(n / chunk) >= 3
        assert build["count"] == n
        assert build["kind_counts"] == {"report": n - n // 4, "image": n // 4}  # every 4th entry is an image
        assert build["total_s"] > 0 and build["index_s"] > 0
        for memory in (build["memory"], query["memory"]):
            assert memory["hwm_reset"] is True
            assert memory["peak_rss_mb"] >= memory["start_rss_mb"] > 50  # a Python process with torch loaded
            assert memory["growth_mb"] == pytest.approx(memory["peak_rss_mb"] - memory["start_rss_mb"], abs=0.11)
        # float16 rows of dim 16 are 32 bytes each, plus the safetensors headers.
        assert n * dim * 2 < row["disk_bytes"]["chunks"] < n * dim * 2 + build["chunks"] * 1024
        assert row["disk_bytes"]["total"] > row["disk_bytes"]["chunks"]
        assert query["query_s"] > 0 and len(query["query_times_s"]) == 1
        assert query["query_cpu_s"] > 0 and build["cpu_s"] > 0
        assert check["queries_verified"] == queries and check["k"] == 10
        assert check["same_ids"] + check["tie_swaps"] == queries * 10
        assert check["max_score_error"] <= 1e-6
        assert check["planted_found_at_rank_1"] == queries // 2
        assert check["metadata_checked"] == queries * 10
        assert check["stored_rows"]["rows_checked"] > 0
    summary = data["summary"]
    assert summary["entries"] == list(sizes)
    assert summary["query_growth_mb"] == [row["query"]["memory"]["growth_mb"] for row in data["rows"]]
    # The temporary index folders are gone; only the (caller's) workdir is left.
    assert work.is_dir() and list(work.iterdir()) == []


def test_summary_compares_the_two_largest_sizes(bench):
    def row(entries, build_growth, query_growth):
        return {"entries": entries, "build": {"total_s": 1.0, "memory": {"growth_mb": build_growth}},
                "query": {"query_s": 0.5, "query_cpu_s": 0.9, "memory": {"growth_mb": query_growth}}}

    summary = bench.summarise([row(100_000, 90.0, 150.0), row(300_000, 100.0, 240.0), row(1_000_000, 107.0, 250.5)])
    assert summary["entries"] == [100_000, 300_000, 1_000_000]
    assert summary["query_growth_mb"] == [150.0, 240.0, 250.5]
    assert summary["per_added_entry_between"] == [300_000, 1_000_000]
    # 10.5 MiB over 700,000 more entries; 7 MiB for the build.
    assert summary["query_growth_bytes_per_added_entry"] == round(10.5 * 2**20 / 700_000, 1) == 15.7
    assert summary["build_growth_bytes_per_added_entry"] == round(7 * 2**20 / 700_000, 1) == 10.5
    assert "per_added_entry_between" not in bench.summarise([row(5000, 1.0, 2.0)])


def test_verify_exact_on_a_hand_made_ranking(bench):
    reference = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.3],
                              [0.2, 0.2, 0.8, 0.1, 0.7]])
    # Top 3 by hand: row 0 -> 1, 2, 3 (2 and 3 tie, lower index first); row 1 -> 2, 4, 0
    # (0 and 1 tie at 0.2, lower index wins).
    right = [[1, 2, 3], [2, 4, 0]]
    scores = [[0.9, 0.5, 0.5], [0.8, 0.7, 0.2]]
    summary = bench.verify_exact(right, scores, reference)
    assert summary["same_ids"] == 6 and summary["tie_swaps"] == 0

    # Tied entries in the other order are still exact.
    tied = bench.verify_exact([[1, 3, 2], [2, 4, 1]], scores, reference)
    assert tied["same_ids"] == 3 and tied["tie_swaps"] == 3

    with pytest.raises(bench.NotExactError, match="query 0 rank 3: entry 4"):  # a wrong id with its true score
        bench.verify_exact([[1, 2, 4], [2, 4, 0]], [[0.9, 0.5, 0.3], [0.8, 0.7, 0.2]], reference)
    with pytest.raises(bench.NotExactError, match="reported score"):  # a wrong id passed off with the right score
        bench.verify_exact([[1, 2, 4], [2, 4, 0]], scores, reference)
    with pytest.raises(bench.NotExactError, match="query 1 rank 1"):  # right ids, out of order
        bench.verify_exact([[1, 2, 3], [4, 2, 0]], [[0.9, 0.5, 0.5], [0.7, 0.8, 0.2]], reference)
    with pytest.raises(bench.NotExactError, match="appears twice"):
        bench.verify_exact([[1, 2, 2], [2, 4, 0]], scores, reference)
    with pytest.raises(bench.NotExactError, match="outside"):
        bench.verify_exact([[1, 2, 5], [2, 4, 0]], scores, reference)
    with pytest.raises(bench.NotExactError, match="2 hits per query, expected 3"):  # too few hits for k=3
        bench.verify_exact([[1, 2], [2, 4]], [[0.9, 0.5], [0.8, 0.7]], reference, k=3)
    # k above the entry count: every entry, in order.
    everything = bench.verify_exact([[1, 2, 3, 4, 0]], [[0.9, 0.5, 0.5, 0.3, 0.1]], reference[:1], k=10)
    assert everything["k"] == 5 and everything["same_ids"] == 5


def test_verify_answer_catches_a_corrupted_answer_from_a_real_index(bench, tmp_path):
    spec = {"folder": str(tmp_path / "index"), "entries": 3000, "dim": 16, "dtype": "float16", "chunk_size": 500,
            "batch_size": 256, "queries": 4, "k": 10, "repeats": 1, "seed": 3, "progress": False}
    built = bench.build_phase(spec)  # in this process: the memory figures are not the point here
    assert built["chunks"] == 6
    answer = bench.query_phase(spec)
    assert bench.verify_answer(spec, answer, bench.DEFAULT_TOLERANCE, 0)["same_ids"] == 40

    # Drop the 10th hit of a random (odd) query for the 11th entry of the brute-force ranking.
    queries, _ = bench.make_queries(spec["seed"], spec["entries"], spec["batch_size"], spec["queries"], spec["dim"])
    reference = bench.brute_force_scores(spec["folder"], queries)
    eleventh = torch.sort(reference[1], descending=True, stable=True).indices[10]
    wrong = json.loads(json.dumps(answer))
    wrong["indices"][1][9] = int(eleventh)
    wrong["scores"][1][9] = float(reference[1, eleventh])
    wrong["ids"][1][9], wrong["kinds"][1][9] = bench.entry_id(int(eleventh)), bench.entry_kind(int(eleventh))
    with pytest.raises(bench.NotExactError, match="query 1 rank 10"):
        bench.verify_answer(spec, wrong, bench.DEFAULT_TOLERANCE, 0)

    # A hit whose metadata is not the entry written at its index.
    mislabelled = json.loads(json.dumps(answer))
    mislabelled["ids"][2][0] = "report-9999999"
    with pytest.raises(bench.NotExactError, match="came back as"):
        bench.verify_answer(spec, mislabelled, bench.DEFAULT_TOLERANCE, 0)
