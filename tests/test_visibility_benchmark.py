"""benchmarks/visibility.py, the oracle that knows where to look: its organ statistics
against hand computations, and an end-to-end run on a hand-made cohort of NIfTI files
whose answer is known (a bright stone inside a kidney reads at AUROC 1 at both grids; a
"finding" the images do not show reads at exactly 0.5).

All data is hand-made here (synthetic), NOT clinical data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "visibility.py"
SHAPE = (24, 24, 12)
SPACING = (4.0, 4.0, 6.0)
PREPROCESS = {"target_spacing": list(SPACING), "hu_window": [-1000.0, 1000.0], "spatial_size": list(SHAPE), "axcodes": "RAS"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("volumevlm_visibility_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_organ_statistics_by_hand(bench):
    hu = np.full((9, 9, 9), 40.0)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[1:8, 1:8, 1:8] = True  # a 7x7x7 cube of 2 mm voxels
    hu[2, 3, 4] = 900.0  # one bright voxel on the cube's second layer
    hu[4, 4, 1] = -60.0  # one dark voxel on its bottom face
    stats = dict(zip(bench.STATISTICS, bench.organ_statistics(hu, mask, (2.0, 2.0, 2.0))))
    assert stats["volume_ml"] == pytest.approx(343 * 8 / 1000)
    assert stats["max_axial_area_mm2"] == pytest.approx(49 * 4)
    assert stats["max"] == 900.0 and stats["min"] == -60.0 and stats["p50"] == 40.0
    assert stats["mean"] == pytest.approx((341 * 40 + 900 - 60) / 343)
    assert stats["bright_fraction"] == pytest.approx(1 / 343)  # above median + 150
    assert stats["dark_fraction"] == pytest.approx(1 / 343)  # below median - 20
    # Interior: more than 6 mm (3 voxels) from the outside along every axis -> the centre
    # voxel alone; at each scale its smoothed value is the normalized convolution there.
    assert stats["interior_volume_ml"] == pytest.approx(8 / 1000)
    for scale in bench.SMOOTH_MM:
        centre = bench.smoothed_inside(hu[0:9, 0:9, 0:9], mask, (2.0, 2.0, 2.0), scale)[4, 4, 4]
        for name in ("min", "p1", "p50", "p99", "max"):
            assert stats[f"interior_s{scale:g}_{name}"] == pytest.approx(centre)
        assert 40.0 < centre < 900.0  # the bright voxel spills in, the dark one less
        assert not stats[f"interior_s{scale:g}_dark_fraction"]
    # The wall: the cube's outer layer and the layer outside it (the array's edge). The
    # 900 HU voxel is on the second layer, inside; one at 700 HU on the outer layer is the
    # wall's only voxel more than 100 HU over the interior's median.
    bright = hu.copy()
    bright[1, 4, 4] = 700.0
    wall = dict(zip(bench.STATISTICS, bench.organ_statistics(bright, mask, (2.0, 2.0, 2.0))))
    reference = wall["interior_s2_p50"]
    assert 40.0 < reference < 60.0
    assert wall["wall_max_over_median"] == pytest.approx(700.0 - reference)
    assert wall["wall_voxels_above"] == 1.0
    assert wall["wall_excess_hu"] == pytest.approx(700.0 - reference - bench.SHELL_HU)
    # What belongs elsewhere (here: the bright voxel's surroundings, as bone's are) is left out.
    elsewhere = np.zeros(hu.shape, dtype=bool)
    elsewhere[0:2, 3:6, 3:6] = True
    masked = dict(zip(bench.STATISTICS, bench.organ_statistics(bright, mask, (2.0, 2.0, 2.0), elsewhere)))
    assert masked["wall_voxels_above"] == 0.0 and masked["wall_max_over_median"] == pytest.approx(40.0 - reference)
    # A thin organ has no interior: those statistics are zero, the rest are not.
    thin = np.zeros(hu.shape, dtype=bool)
    thin[:, :, 4] = True
    flat = dict(zip(bench.STATISTICS, bench.organ_statistics(hu, thin, (2.0, 2.0, 2.0))))
    assert flat["volume_ml"] == pytest.approx(81 * 8 / 1000)
    assert all(flat[name] == 0.0 for name in bench.INTERIOR_STATISTICS)
    assert flat["wall_voxels_above"] == 1.0  # read against the whole mask's median then
    assert not bench.organ_statistics(hu, np.zeros_like(mask), (2.0, 2.0, 2.0)).any()


def test_smoothing_inside_the_organ_only(bench):
    # A uniform organ in air stays uniform when smoothed inside it: nothing leaks in.
    hu = np.full((12, 12, 8), -1000.0)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[2:10, 3:9, 2:6] = True
    hu[mask] = 60.0
    for scale in (2.0, 5.0):
        smooth = bench.smoothed_inside(hu, mask, (2.0, 2.0, 3.0), scale)
        np.testing.assert_allclose(smooth[mask], 60.0, rtol=1e-5)
        assert (smooth[~mask] <= 60.0 + 1e-3).all()
    # A dark blob inside: the larger scale dilutes its depth.
    hu[5:7, 5:7, 3:5] = 0.0
    shallow = bench.smoothed_inside(hu, mask, (2.0, 2.0, 3.0), 5.0)
    deep = bench.smoothed_inside(hu, mask, (2.0, 2.0, 3.0), 2.0)
    assert 0.0 < deep[5, 5, 3] < shallow[5, 5, 3] < 60.0


def test_paired_organs_read_either_side(bench):
    left = np.arange(len(bench.STATISTICS), dtype=float)
    right = left[::-1].copy()
    one = bench.finding_features({"kidney_left": left, "kidney_right": right}, "kidney_stone")
    swapped = bench.finding_features({"kidney_left": right, "kidney_right": left}, "kidney_stone")
    np.testing.assert_array_equal(one, swapped)
    np.testing.assert_array_equal(one, np.concatenate([np.maximum(left, right), np.minimum(left, right)]))
    np.testing.assert_array_equal(bench.finding_features({"spleen": left}, "splenomegaly"), left)


def test_grid_parsing(bench):
    import argparse

    assert bench.parse_grid("checkpoint") is None
    assert bench.parse_grid("2x2x3") == (2.0, 2.0, 3.0)
    for bad in ("2x2", "ax2x3", "0x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_grid(bad)
    finer = bench.grid_preprocess(PREPROCESS, (2.0, 2.0, 3.0))
    assert finer["target_spacing"] == [2.0, 2.0, 3.0] and finer["spatial_size"] is None
    assert finer["hu_window"] == PREPROCESS["hu_window"] and PREPROCESS["spatial_size"] == list(SHAPE)


# Held-out design: the cyst column is balanced inside the stone and no-stone groups, and
# no image shows a cyst, so any score the oracle gives reads it at exactly 0.5.
STONE = [1, 1, 0, 0] * 4 + [1, 1, 0, 0, 1, 1, 0, 0]
CYST = [1, 0] * 8 + [1, 0, 1, 0, 1, 0, 1, 0]
SPLITS = ["train"] * 16 + ["val"] * 4 + ["test"] * 4


def write_cohort(root: Path) -> Path:
    from volumevlm.io.writers import write_nifti

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    affine = np.diag([*SPACING, 1.0])
    rows = []
    for i, (stone, cyst, split) in enumerate(zip(STONE, CYST, SPLITS)):
        hu = np.full(SHAPE, -1000.0, dtype=np.float32)  # air around a block of fat
        hu[1:-1, 4:-4, 1:-1] = -100.0
        label = np.zeros(SHAPE, dtype=np.uint8)
        for index, x0 in ((3, 2), (4, 15)):  # kidney_left, kidney_right: 7x7x5 voxels
            hu[x0:x0 + 7, 8:15, 3:8] = 150.0
            label[x0:x0 + 7, 8:15, 3:8] = index
        if stone:
            x = 5 if i % 8 < 4 else 18  # left or right kidney
            hu[x, 11, 5] = 900.0
        write_nifti(root / f"images/case_{i:02d}.nii.gz", hu, affine)
        write_nifti(root / f"labels/case_{i:02d}.nii.gz", label, affine)
        rows.append({"id": f"case_{i:02d}", "image": f"images/case_{i:02d}.nii.gz", "label": f"labels/case_{i:02d}.nii.gz",
                     "split": split, "synthetic": True, "shape": list(SHAPE), "spacing": list(SPACING),
                     "findings": {"kidney_stone": stone, "renal_cyst": cyst},
                     "finding_facts": {"kidney_stone": {"size_mm": 3.0 + i, "hu": 900.0}} if stone else {}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"preprocess": PREPROCESS, "encoder": {}}))
    return root


def test_oracle_end_to_end_known_answer(bench, tmp_path, capsys):
    cohort = write_cohort(tmp_path / "cohort")
    out = tmp_path / "results"
    argv = ["--data", str(cohort), "--checkpoint", str(cohort / "model"), "--grid", "checkpoint", "--grid", "2x2x3",
            "--findings", "kidney_stone,renal_cyst", "--train-fractions", "0.5", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--tag", "test", "--no-progress"]
    results = bench.main(argv)
    written = json.loads(next(out.glob("visibility-*-test.json")).read_text())
    assert written == results
    assert written["data"]["train_cases"] == 16 and written["data"]["eval_cases"] == 8
    assert "NOT clinical" in written["data"]["note"] and written["command"].startswith("python benchmarks/visibility.py")
    assert [g["name"] for g in written["grids"]] == ["4x4x6 mm, 24x24x12", "2x2x3 mm"]
    for grid in written["grids"]:
        stone, cyst = grid["oracle"]["kidney_stone"], grid["oracle"]["renal_cyst"]
        assert stone["auroc"] == 1.0 and stone["ci95"] == [1.0, 1.0]
        assert (stone["train_positives"], stone["eval_positives"], stone["eval_negatives"]) == (8, 4, 4)
        assert cyst["auroc"] == 0.5
    half = written["grids"][-1]["by_train_fraction"]["0.5"]["kidney_stone"]
    assert half["train_cases"] == 8 and half["train_positives"] == 4 and half["auroc"] == 1.0
    sizes = written["facts"]["kidney_stone"]["size_mm"]
    stone_sizes = [3.0 + i for i, s in enumerate(STONE) if s]
    assert (sizes["min"], sizes["max"]) == (min(stone_sizes), max(stone_sizes))
    assert "kidney_stone" in capsys.readouterr().out
    # The organ statistics were cached per grid and case list: a second run reads them
    # (poisoned to zeros here, so a run that read the cache sees no stone anywhere).
    cached = sorted((tmp_path / "cache").glob("organ-statistics-*.npz"))
    assert len(cached) == 4
    for path in cached:
        with np.load(path) as stored:
            zeros = np.zeros_like(stored["statistics"])
        np.savez(path, statistics=zeros)
    again = bench.main(["--data", str(cohort), "--checkpoint", str(cohort / "model"), "--grid", "checkpoint",
                        "--findings", "kidney_stone,renal_cyst", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                        "--tag", "again", "--no-progress"])
    assert again["grids"][0]["oracle"]["kidney_stone"]["auroc"] == 0.5
    assert len(list((tmp_path / "cache").glob("organ-statistics-*.npz"))) == 4
