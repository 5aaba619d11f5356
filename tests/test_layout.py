"""Block-sparse 3D attention layouts: the mask is exactly the promised neighbourhood.

Every expected mask here is recomputed independently from ``layout.coords`` (the
grid coordinate of each sequence position) with plain broadcasting, never from
the layout's own block lists.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from volumevlm.errors import InputError
from volumevlm.ops import attention_layout
from volumevlm.ops.layout import BlockLists

# (grid, tile, window, dilation, num_global)
PATTERNS = {
    "dense": ((8, 8, 8), (4, 4, 4), None, 1, 0),
    "dense-padded-globals": ((6, 5, 3), (4, 4, 2), None, 1, 3),
    "window1": ((12, 12, 8), (4, 4, 4), (1, 1, 1), 1, 0),
    "aniso": ((16, 12, 8), (4, 4, 4), (2, 1, 0), 1, 0),
    "aniso-tile": ((12, 8, 10), (4, 2, 2), (0, 2, 1), 1, 0),
    "dilation2": ((20, 16, 12), (4, 4, 4), (1, 1, 1), 2, 0),
    "dilation3-aniso": ((8, 24, 8), (2, 4, 2), (1, 2, 0), 3, 0),
    "global1": ((12, 12, 8), (4, 4, 4), (1, 1, 1), 1, 1),
    "global5": ((12, 8, 12), (4, 4, 4), (1, 0, 1), 1, 5),
    "global70": ((12, 12, 8), (4, 4, 4), (1, 1, 1), 1, 70),
    "not-divisible": ((6, 5, 3), (4, 4, 2), (1, 1, 1), 1, 0),
    "not-divisible-window0": ((10, 9, 7), (4, 4, 4), (0, 0, 0), 1, 2),
    "single-tile": ((4, 4, 4), (4, 4, 4), (1, 1, 1), 1, 0),
    "single-tile-padded": ((3, 2, 1), (4, 4, 4), (1, 1, 1), 1, 1),
    "window-larger-than-grid": ((8, 8, 4), (4, 4, 4), (5, 7, 9), 1, 0),
}


def _layout(name):
    grid, tile, window, dilation, num_global = PATTERNS[name]
    return attention_layout(grid, tile=tile, window=window, dilation=dilation, num_global=num_global)


def _expected_mask(layout, tile, window, dilation, num_global):
    """[N, N] bool from coords alone: the neighbourhood the pattern promises."""
    coords = layout.coords
    N = coords.shape[0]
    spatial = (coords >= 0).all(dim=1)
    glob = torch.zeros(N, dtype=torch.bool)
    glob[:num_global] = True
    valid = spatial | glob
    if window is None:
        attend = torch.ones(N, N, dtype=torch.bool)
    else:
        tc = torch.div(coords, torch.tensor(tile), rounding_mode="floor")  # tile coordinates
        diff = tc[:, None, :] - tc[None, :, :]  # [N, N, 3]
        w = torch.tensor(window) * dilation
        attend = ((diff.abs() <= w) & (diff % dilation == 0)).all(dim=-1)
        attend = (attend & spatial[:, None] & spatial[None, :]) | glob[:, None] | glob[None, :]
    return attend & valid[:, None] & valid[None, :]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_mask_is_exactly_the_promised_neighbourhood(name):
    grid, tile, window, dilation, num_global = PATTERNS[name]
    layout = _layout(name)
    T = math.prod(tile)
    tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    G = math.ceil(num_global / T) if num_global else 0
    assert layout.block_size == T
    assert layout.num_blocks == G + math.prod(tiles)
    assert layout.seq_len == layout.num_blocks * T
    assert layout.num_valid == math.prod(grid) + num_global
    # coords: every grid point exactly once, globals first, -1 elsewhere
    spatial = (layout.coords >= 0).all(dim=1)
    assert int(spatial.sum()) == math.prod(grid)
    assert torch.equal(layout.is_global, torch.arange(layout.seq_len) < num_global)
    assert torch.equal(layout.is_padding, ~(spatial | layout.is_global))
    assert torch.equal(layout.key_valid, ~layout.is_padding)
    assert torch.equal(layout.query_valid, layout.key_valid)
    assert bool((layout.coords[~spatial] == -1).all())
    assert len({tuple(c) for c in layout.coords[spatial].tolist()}) == math.prod(grid)

    expected = _expected_mask(layout, tile, window, dilation, num_global)
    mask = layout.dense_mask()
    assert mask.dtype == torch.bool and mask.shape == (layout.seq_len, layout.seq_len)
    assert torch.equal(mask, expected), f"{name}: {(mask != expected).sum().item()} entries differ"
    assert not mask[layout.is_padding].any() and not mask[:, layout.is_padding].any()
    assert layout.density == pytest.approx(expected.sum().item() / layout.num_valid**2, rel=1e-12)


def test_tile_order_and_token_order_inside_a_tile():
    layout = attention_layout((8, 12, 4), tile=(4, 4, 2), window=(1, 1, 1), num_global=0)
    tiles = (2, 3, 2)
    T = 32
    for pos in [0, 1, 2, 5, 31, 32, 100, 191, 383]:
        block, off = divmod(pos, T)
        i, rest = divmod(block, tiles[1] * tiles[2])
        j, k = divmod(rest, tiles[2])
        a, rest = divmod(off, 4 * 2)
        b, c = divmod(rest, 2)
        assert layout.coords[pos].tolist() == [i * 4 + a, j * 4 + b, k * 2 + c]


def _csr_pairs(indptr, idx):
    pairs = set()
    assert indptr.dtype == torch.int32 and idx.dtype == torch.int32
    assert indptr[0] == 0 and indptr[-1] == idx.numel()
    for row in range(indptr.numel() - 1):
        cols = idx[indptr[row] : indptr[row + 1]].tolist()
        assert cols == sorted(cols) and len(set(cols)) == len(cols), "lists must be sorted, unique"
        pairs.update((row, c) for c in cols)
    return pairs


@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_lists_match_the_dense_mask(name):
    layout = _layout(name)
    nb, T = layout.num_blocks, layout.block_size
    # A block pair is attended iff any (query, key) token pair in it is.
    blocks = layout.dense_mask().reshape(nb, T, nb, T).any(dim=3).any(dim=1)
    key_has_padding = layout.is_padding.reshape(nb, T).any(dim=1)
    want_full = {(q, k) for q, k in blocks.nonzero().tolist() if not key_has_padding[k]}
    want_part = {(q, k) for q, k in blocks.nonzero().tolist() if key_has_padding[k]}
    assert _csr_pairs(layout.q2k_full_indptr, layout.q2k_full_idx) == want_full
    assert _csr_pairs(layout.q2k_part_indptr, layout.q2k_part_idx) == want_part
    assert _csr_pairs(layout.k2q_full_indptr, layout.k2q_full_idx) == {(k, q) for q, k in want_full}
    assert _csr_pairs(layout.k2q_part_indptr, layout.k2q_part_idx) == {(k, q) for q, k in want_part}
    # Inside every listed pair the mask is exactly validity (no token-level holes).
    mask = layout.dense_mask().reshape(nb, T, nb, T)
    valid = layout.key_valid.reshape(nb, T)
    for q, k in want_full | want_part:
        assert torch.equal(mask[q, :, k, :], valid[q][:, None] & valid[k][None, :])
    lists = layout.block_lists("cpu")
    assert isinstance(lists, BlockLists) and lists is layout.block_lists(torch.device("cpu"))
    assert torch.equal(lists.q2k_part_idx, layout.q2k_part_idx) and torch.equal(lists.key_valid, layout.key_valid)
    lengths = [sum(1 for p in want_full | want_part if p[0] == q) for q in range(nb)]
    assert lists.q2k_max == max(lengths) and lists.num_blocks == nb and lists.block_size == T


def test_globals_span_several_blocks_and_attend_everything():
    layout = _layout("global70")  # 70 globals with T = 64: two global blocks, the second half padding
    assert layout.num_global_blocks == 2
    assert layout.is_global[:70].all() and layout.is_padding[70:128].all()
    mask = layout.dense_mask()
    valid = layout.key_valid
    assert torch.equal(mask[:70], valid[None, :].expand(70, -1))
    assert torch.equal(mask[:, :70], valid[:, None].expand(-1, 70))
    assert torch.equal(layout.global_positions, torch.arange(70))
    # Global query blocks list every key block; global key blocks (with padding) are partial.
    full = layout.q2k_full_idx[layout.q2k_full_indptr[0] : layout.q2k_full_indptr[1]]
    part = layout.q2k_part_idx[layout.q2k_part_indptr[0] : layout.q2k_part_indptr[1]]
    assert sorted(full.tolist() + part.tolist()) == list(range(layout.num_blocks))
    assert part.tolist() == [1]


def test_window_reaches_exact_tile_offsets():
    # 5 x 1 x 1 tiles along x, dilation 2: tile 2 sees tiles 0, 2, 4 only.
    layout = attention_layout((20, 4, 4), tile=4, window=(1, 0, 0), dilation=2)
    idx = layout.q2k_full_idx[layout.q2k_full_indptr[2] : layout.q2k_full_indptr[3]].tolist()
    assert idx == [0, 2, 4]
    idx = layout.q2k_full_idx[layout.q2k_full_indptr[1] : layout.q2k_full_indptr[2]].tolist()
    assert idx == [1, 3]


@pytest.mark.parametrize("num_global", [0, 5])
def test_to_layout_from_layout_round_trip_and_grid_order(num_global):
    grid = (6, 5, 3)
    layout = attention_layout(grid, tile=(4, 4, 2), window=(1, 1, 1), num_global=num_global)
    gen = torch.Generator().manual_seed(11 + num_global)
    vol = torch.randn(2, 4, *grid, generator=gen)  # [B, C, X, Y, Z]
    x_grid = vol.flatten(2).transpose(1, 2)  # [B, X*Y*Z, C], x-major
    globs = torch.randn(2, num_global, 4, generator=gen) if num_global else None
    seq = layout.to_layout(x_grid, globs)
    assert seq.shape == (2, layout.seq_len, 4)
    assert bool((seq[:, layout.is_padding] == 0).all())
    # Grid order: the token at sequence position p is the voxel at coords[p].
    spatial = (layout.coords >= 0).all(dim=1)
    for p in spatial.nonzero().flatten()[::7].tolist():
        x, y, z = layout.coords[p].tolist()
        assert torch.equal(seq[:, p], vol[:, :, x, y, z])
    # grid_to_seq maps grid token g (x-major) onto the one spatial slot holding that voxel.
    assert torch.equal(layout.grid_to_seq.sort().values, spatial.nonzero().flatten())
    flat = torch.tensor(grid[1] * grid[2]) * layout.coords[:, 0] + grid[2] * layout.coords[:, 1] + layout.coords[:, 2]
    assert torch.equal(flat[layout.grid_to_seq], torch.arange(math.prod(grid)))
    back, back_globals = layout.from_layout(seq)
    assert torch.equal(back, x_grid)
    if num_global:
        assert torch.equal(back_globals, globs) and torch.equal(seq[:, layout.global_positions], globs)
    else:
        assert back_globals is None


def test_to_layout_rejects_bad_shapes():
    layout = attention_layout((4, 4, 4), num_global=2)
    with pytest.raises(InputError, match="x_grid must be"):
        layout.to_layout(torch.zeros(1, 63, 8), torch.zeros(1, 2, 8))
    with pytest.raises(InputError, match="globals must be"):
        layout.to_layout(torch.zeros(1, 64, 8))
    with pytest.raises(InputError, match="x must be"):
        layout.from_layout(torch.zeros(1, 10, 8))


def test_density_numbers():
    # 3 x 3 x 3 tiles of 2^3, window 1: a tile sees (neighbours per axis)^3 tiles.
    layout = attention_layout((6, 6, 6), tile=2, window=1)
    per_axis = [2, 3, 2]  # tiles seen by tile index 0, 1, 2 along an axis
    pairs = sum(a * b * c for a in per_axis for b in per_axis for c in per_axis) * 8 * 8
    assert layout.density == pytest.approx(pairs / 216**2)
    assert attention_layout((8, 8, 8), window=None).density == 1.0
    assert attention_layout((16, 16, 16), window=0).density == pytest.approx(1 / 64)


def test_caching_and_normalisation():
    a = attention_layout((12, 12, 8), tile=(4, 4, 4), window=(1, 1, 1))
    assert attention_layout([12, 12, 8], tile=4, window=1) is a
    assert attention_layout((12, 12, 8), window=(1, 1, 2)) is not a
    assert "12, 12, 8" in repr(a) and "density" in repr(a)


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        (dict(grid=(0, 4, 4)), "grid"),
        (dict(grid=(4, 4)), "grid"),
        (dict(grid=(4, 4, 4), tile=(4, 0, 4)), "tile"),
        (dict(grid=(4, 4, 4), window=(-1, 0, 0)), "window"),
        (dict(grid=(4, 4, 4), dilation=0), "dilation"),
        (dict(grid=(4, 4, 4), num_global=-1), "num_global"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, problem):
    with pytest.raises(InputError, match=problem):
        attention_layout(**kwargs)


def test_construction_is_fast_for_large_grids():
    start = time.perf_counter()
    layout = attention_layout((56, 56, 40), tile=(4, 4, 4), window=(1, 1, 1), num_global=8)
    elapsed = time.perf_counter() - start
    assert layout.seq_len == 64 + 14 * 14 * 10 * 64
    assert elapsed < 1.0, f"building a 56x56x40 layout took {elapsed:.2f} s (typically ~0.05 s)"
