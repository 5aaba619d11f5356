"""Block-sparse 3D attention layouts: which token attends which, in tile order.

A layout fixes, once per (grid, pattern), the order of tokens in the attention
sequence and the block-sparse lists the kernels walk.

Sequence order (``N = seq_len = num_blocks * block_size`` positions):

* ``T = block_size = prod(tile)`` tokens per block.
* If ``num_global > 0`` the first ``G = ceil(num_global / T)`` blocks are global
  blocks: global tokens sit at positions ``[0, num_global)``, the rest of those
  blocks is padding.
* Then one block per spatial tile, tiles in x-major order (tile ``(i, j, k)`` has
  index ``(i * ty + j) * tz + k`` where ``ty, tz`` are tiles per axis), tokens
  inside a tile in x-major order of their local offset. Positions that fall
  outside the grid (grid not a multiple of the tile) are padding.

Grid order is the x-major flatten of an ``[X, Y, Z]`` volume (``vol.flatten()``).

Pattern: ``window=None`` is dense (every valid query attends every valid key).
Otherwise a query tile attends the key tiles whose tile coordinates differ by at
most ``window[a] * dilation`` on every axis ``a``, in steps of ``dilation``. Global
tokens attend every valid key and are attended by every valid query. Padding keys
are never attended; padding queries produce output 0.

Block lists (CSR, int32, sorted ascending) split each attended (query block, key
block) pair into *full* (the key block has no padding: no masking needed) and
*partial* (the kernel masks with ``key_valid``); the ``k2q_*`` lists are the
transposes, split the same way.

Everything a call needs on a device (lists, masks, program orders, index vectors)
is built once per device and cached on the layout, and everything a launcher sizes
its work by is a host number fixed at construction, so the call path of the op
never builds a mask, copies from the host or waits on the device.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from volumevlm.errors import InputError

__all__ = ["AttentionLayout", "BlockLists", "attention_layout"]

_CSR_FIELDS = (
    "q2k_full_indptr",
    "q2k_full_idx",
    "q2k_part_indptr",
    "q2k_part_idx",
    "k2q_full_indptr",
    "k2q_full_idx",
    "k2q_part_indptr",
    "k2q_part_idx",
)


@dataclass(frozen=True)
class BlockLists:
    """Block-sparse lists of one layout on one device.

    The eight CSR tensors are int32 (``*_indptr`` [num_blocks + 1], ``*_idx``
    [pairs]); ``key_valid`` / ``query_valid`` are bool [N]. ``q2k_max`` /
    ``k2q_max`` are the longest full + partial list of any block (host ints, so a
    launcher can size its loops without a device sync).

    Launch data, built with the lists so a call builds nothing: ``key_valid_i8`` /
    ``query_valid_i8`` are the masks as int8 (what the kernels load);
    ``fwd_order`` / ``bwd_order`` (int32 [num_blocks]) are the order in which programs
    take blocks: the ``fwd_long`` / ``bwd_long`` blocks with by far the longest lists
    (global blocks attend, and are attended by, every block) first, so they never form
    a tail, then the others in sequence order (neighbouring programs share key blocks
    in L2). The backward's length is a block's key list plus its query list (one
    program does both). ``valid_index`` (int64 [num_valid]) lists the valid positions.
    """

    q2k_full_indptr: torch.Tensor
    q2k_full_idx: torch.Tensor
    q2k_part_indptr: torch.Tensor
    q2k_part_idx: torch.Tensor
    k2q_full_indptr: torch.Tensor
    k2q_full_idx: torch.Tensor
    k2q_part_indptr: torch.Tensor
    k2q_part_idx: torch.Tensor
    key_valid: torch.Tensor
    query_valid: torch.Tensor
    num_blocks: int
    block_size: int
    q2k_max: int
    k2q_max: int
    key_valid_i8: torch.Tensor | None = None
    query_valid_i8: torch.Tensor | None = None
    fwd_order: torch.Tensor | None = None
    fwd_long: int = 0
    bwd_order: torch.Tensor | None = None
    bwd_long: int = 0
    valid_index: torch.Tensor | None = None


# A block is scheduled first when its list is longer than this many times the median
# list: only global blocks (lists of every block) reach it in a windowed layout.
_LONG_LIST_FACTOR = 3.0


def program_order(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """(order int32 [nb], n_long): blocks whose list is much longer than the median
    first (longest first), then the rest in their own order. ``n_long < nb`` always,
    so a launcher never divides by an empty remainder."""
    nb = len(lengths)
    nonzero = lengths[lengths > 0]
    median = float(np.median(nonzero)) if len(nonzero) else 0.0
    is_long = lengths > _LONG_LIST_FACTOR * max(median, 1.0)
    long_blocks = np.nonzero(is_long)[0]
    long_blocks = long_blocks[np.argsort(-lengths[long_blocks], kind="stable")][: max(nb - 1, 0)]
    rest = np.setdiff1d(np.arange(nb), long_blocks, assume_unique=True)
    return np.concatenate([long_blocks, rest]).astype(np.int32), int(len(long_blocks))


@contextlib.contextmanager
def cache_builder():
    """The context every cached device tensor is built in: normal tensors outside
    autograd even when the first call runs under ``torch.inference_mode`` (an inference
    tensor in a cache would break every later call that records gradients)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


_OP_KEYS = itertools.count(1)
_BY_KEY: "weakref.WeakValueDictionary[int, AttentionLayout]" = weakref.WeakValueDictionary()


def layout_by_key(key: int) -> "AttentionLayout":
    """The live layout whose ``op_key`` is ``key`` (for the registered torch ops)."""
    layout = _BY_KEY.get(int(key))
    if layout is None:
        raise InputError("sparse_attention", f"no live attention layout has key {key} (it was garbage-collected)")
    return layout


def _triple(value, name: str, allow_zero: bool) -> tuple[int, int, int]:
    """Normalise an int or a 3-sequence of ints to a tuple of three ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        values = (int(value),) * 3
    else:
        try:
            values = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise InputError("attention_layout", f"{name} must be an int or 3 ints, got {value!r}") from None
        if len(values) != 3:
            raise InputError("attention_layout", f"{name} must have 3 entries, got {value!r}")
    low = 0 if allow_zero else 1
    if min(values) < low:
        raise InputError("attention_layout", f"{name} entries must be >= {low}, got {value!r}")
    return values  # type: ignore[return-value]


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (indptr int32 [n_rows+1], idx int32) of (row, col) pairs; cols sorted within a row."""
    key = rows * (int(cols.max(initial=0)) + 1) + cols
    # Timsort finds the sorted runs the pair generators produce, so this stays fast for dense layouts.
    order = np.argsort(key, kind="stable")
    counts = np.bincount(rows, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return (
        torch.from_numpy(indptr.astype(np.int32)),
        torch.from_numpy(cols[order].astype(np.int32)),
    )


class AttentionLayout:
    """Token order and block-sparse attention pattern of one 3D grid.

    Build with :func:`attention_layout` (cached). All tensors live on the CPU;
    :meth:`block_lists` gives cached device copies.
    """

    def __init__(self, grid, tile, window, dilation: int, num_global: int):
        self.grid: tuple[int, int, int] = grid
        self.tile: tuple[int, int, int] = tile
        self.window: tuple[int, int, int] | None = window
        self.dilation: int = dilation
        self.num_global: int = num_global

        T = tile[0] * tile[1] * tile[2]
        tiles = tuple(math.ceil(g / t) for g, t in zip(grid, tile))
        n_tiles = tiles[0] * tiles[1] * tiles[2]
        G = math.ceil(num_global / T) if num_global > 0 else 0
        nb = G + n_tiles
        N = nb * T
        self.block_size: int = T
        self.tiles_per_axis: tuple[int, int, int] = tiles
        self.num_global_blocks: int = G
        self.num_blocks: int = nb
        self.seq_len: int = N
        self.num_valid: int = grid[0] * grid[1] * grid[2] + num_global

        # Grid coordinate of every sequence position (-1 for global and padding).
        tile_coords = np.stack(np.unravel_index(np.arange(n_tiles), tiles), axis=1)  # [n_tiles, 3]
        local = np.stack(np.unravel_index(np.arange(T), tile), axis=1)  # [T, 3]
        spatial = tile_coords[:, None, :] * np.asarray(tile) + local[None, :, :]  # [n_tiles, T, 3]
        spatial = spatial.reshape(-1, 3)
        inside = np.all(spatial < np.asarray(grid), axis=1)
        coords = np.full((N, 3), -1, dtype=np.int64)
        coords[G * T :][inside] = spatial[inside]
        is_global = np.zeros(N, dtype=bool)
        is_global[:num_global] = True
        valid = is_global.copy()
        valid[G * T :] = inside

        # Sequence position of every grid token (x-major grid order).
        seq_pos = np.arange(G * T, N)[inside]
        flat = np.ravel_multi_index(tuple(spatial[inside].T), grid)
        grid_to_seq = np.empty(len(flat), dtype=np.int64)
        grid_to_seq[flat] = seq_pos

        self.coords = torch.from_numpy(coords)
        self.is_global = torch.from_numpy(is_global)
        self.is_padding = torch.from_numpy(~valid)
        self.key_valid = torch.from_numpy(valid.copy())
        self.query_valid = torch.from_numpy(valid.copy())
        self.grid_to_seq = torch.from_numpy(grid_to_seq)
        self.global_positions = torch.arange(num_global, dtype=torch.int64)
        self.valid_index = torch.from_numpy(np.nonzero(valid)[0].astype(np.int64))
        # Host flag: callers branch on it instead of reducing a (device) mask per call.
        self.has_padding: bool = bool(self.num_valid < N)

        # Attended (query block, key block) pairs.
        block_valid_count = valid.reshape(nb, T).sum(axis=1)
        block_has_padding = block_valid_count < T
        rows, cols = self._block_pairs(tile_coords, tiles, G, nb)
        self.block_valid_count = torch.from_numpy(block_valid_count)
        self.density: float = float(
            (block_valid_count[rows].astype(np.float64) * block_valid_count[cols]).sum()
        ) / float(self.num_valid) ** 2
        self.num_block_pairs: int = int(len(rows))

        part = block_has_padding[cols]
        self.q2k_full_indptr, self.q2k_full_idx = _csr(rows[~part], cols[~part], nb)
        self.q2k_part_indptr, self.q2k_part_idx = _csr(rows[part], cols[part], nb)
        self.k2q_full_indptr, self.k2q_full_idx = _csr(cols[~part], rows[~part], nb)
        self.k2q_part_indptr, self.k2q_part_idx = _csr(cols[part], rows[part], nb)
        self._pairs = (rows, cols)
        # Work the block-sparse kernels execute (whole T x T tiles, padding included),
        # relative to dense attention over the valid tokens: what dispatch compares.
        self.executed_fraction: float = float(self.num_block_pairs) * T * T / float(self.num_valid) ** 2

        q2k_len = np.diff(self.q2k_full_indptr.numpy()) + np.diff(self.q2k_part_indptr.numpy())
        k2q_len = np.diff(self.k2q_full_indptr.numpy()) + np.diff(self.k2q_part_indptr.numpy())
        self.q2k_max: int = int(q2k_len.max(initial=0))
        self.k2q_max: int = int(k2q_len.max(initial=0))
        self._fwd_order, self.fwd_long = program_order(q2k_len)
        self._bwd_order, self.bwd_long = program_order(q2k_len + k2q_len)

        self._device_lists: dict[torch.device, BlockLists] = {}
        # Per-consumer derived data (e.g. the torch path's grouped lists), built lazily.
        self._derived: dict[str, object] = {}
        # How many device-side objects this layout has built (lists, masks, indices):
        # after a first call on a device, a call must not add any (tests count this).
        self.device_builds: int = 0
        # A plain int naming this layout to the registered torch ops (torch.library ops
        # take tensors and scalars, not Python objects); see :func:`layout_by_key`.
        self.op_key: int = next(_OP_KEYS)
        _BY_KEY[self.op_key] = self

    def _block_pairs(self, tile_coords: np.ndarray, tiles, G: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int64 arrays of attended (query block, key block) pairs, unsorted."""
        n_tiles = len(tile_coords)
        if self.window is None:
            q, k = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
            return q.ravel(), k.ravel()
        d = self.dilation
        # Offsets beyond the grid never land on a tile: clip them away up front.
        per_axis = [
            np.arange(-min(w, (n - 1) // d), min(w, (n - 1) // d) + 1) * d for w, n in zip(self.window, tiles)
        ]
        offsets = np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3)  # [O, 3]
        nbr = tile_coords[:, None, :] + offsets[None, :, :]  # [n_tiles, O, 3]
        ok = np.all((nbr >= 0) & (nbr < np.asarray(tiles)), axis=-1)
        q_tile = np.broadcast_to(np.arange(n_tiles)[:, None], ok.shape)[ok]
        k_tile = np.ravel_multi_index(tuple(nbr[ok].T), tiles)
        rows = [q_tile + G]
        cols = [k_tile + G]
        if G:
            glob = np.arange(G)
            # Global query blocks attend every block; every spatial query block attends the global blocks.
            rows.append(np.repeat(glob, nb))
            cols.append(np.tile(np.arange(nb), G))
            rows.append(np.repeat(np.arange(G, nb), G))
            cols.append(np.tile(glob, nb - G))
        return np.concatenate(rows), np.concatenate(cols)

    # ------------------------------------------------------------------ views
    def block_lists(self, device: torch.device | str | None = None) -> BlockLists:
        """The CSR lists (int32) and validity masks (bool) on ``device`` (cached per device)."""
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        lists = self._device_lists.get(device)
        if lists is None:
            with cache_builder():
                lists = self._build_lists(device)
            self._device_lists[device] = lists
            self.device_builds += 1
        return lists

    def _build_lists(self, device: torch.device) -> BlockLists:
        key_valid = self.key_valid.to(device)
        query_valid = self.query_valid.to(device)
        return BlockLists(
            **{name: getattr(self, name).to(device).contiguous() for name in _CSR_FIELDS},
            key_valid=key_valid,
            query_valid=query_valid,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            q2k_max=self.q2k_max,
            k2q_max=self.k2q_max,
            key_valid_i8=key_valid.to(torch.int8).contiguous(),
            query_valid_i8=query_valid.to(torch.int8).contiguous(),
            fwd_order=torch.from_numpy(self._fwd_order).to(device),
            fwd_long=self.fwd_long,
            bwd_order=torch.from_numpy(self._bwd_order).to(device),
            bwd_long=self.bwd_long,
            valid_index=self.valid_index.to(device),
        )

    def cached(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The CPU tensor attribute ``name`` on ``device`` (cast to ``dtype`` if given),
        built once per (name, device, dtype) and cached."""
        key = f"{name}@{device}/{dtype}"
        t = self._derived.get(key)
        if t is None:
            with cache_builder():
                t = getattr(self, name).to(device=device, dtype=dtype)
            self._derived[key] = t
            self.device_builds += 1
        return t  # type: ignore[return-value]

    def dense_bias(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [num_valid, num_valid] over the valid tokens (0 where attended,
        -inf elsewhere) in ``dtype`` on ``device``, cached: what dense SDPA takes for a
        sparse layout (built once in the query's dtype, so SDPA converts nothing per call;
        flash takes no mask, the memory-efficient kernel takes this one).
        num_valid^2 elements: small layouts only."""
        key = f"dense_bias@{device}/{dtype}"
        t = self._derived.get(key)
        if t is None:
            with cache_builder():
                idx = self.valid_index
                allowed = self.dense_mask()[idx][:, idx]
                n = allowed.shape[0]
                # Rows padded to a multiple of 16 elements: the memory-efficient kernel needs
                # an aligned bias and would otherwise pad a copy on every call.
                storage = torch.zeros(n, -(-n // 16) * 16, dtype=dtype)
                storage[:, :n].masked_fill_(~allowed, float("-inf"))
                t = storage.to(device)[:, :n]
            self._derived[key] = t
            self.device_builds += 1
        return t  # type: ignore[return-value]

    def block_mask(self) -> torch.Tensor:
        """bool [num_blocks, num_blocks]: True where the query block attends the key block."""
        rows, cols = self._pairs
        mask = torch.zeros(self.num_blocks, self.num_blocks, dtype=torch.bool)
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask

    def dense_mask(self) -> torch.Tensor:
        """bool [N, N]: True where query position attends key position (for tests / small N)."""
        nb, T, N = self.num_blocks, self.block_size, self.seq_len
        # One N x N pass: broadcast the block mask to tokens with both validities folded in.
        mask = (
            self.block_mask()[:, None, :, None]
            & self.query_valid.reshape(nb, T, 1, 1)
            & self.key_valid.reshape(1, 1, nb, T)
        )
        return mask.reshape(N, N)

    def to_layout(self, x_grid: torch.Tensor, globals: torch.Tensor | None = None) -> torch.Tensor:
        """[B, X*Y*Z, C] grid tokens (x-major) (+ [B, num_global, C] globals) -> [B, N, C], padding 0."""
        n_grid = self.grid_to_seq.numel()
        if x_grid.dim() != 3 or x_grid.shape[1] != n_grid:
            raise InputError("to_layout", f"x_grid must be [B, {n_grid}, C] for grid {self.grid}, got {tuple(x_grid.shape)}")
        B, _, C = x_grid.shape
        if self.num_global:
            if globals is None or tuple(globals.shape) != (B, self.num_global, C):
                got = None if globals is None else tuple(globals.shape)
                raise InputError("to_layout", f"globals must be [{B}, {self.num_global}, {C}], got {got}")
        elif globals is not None and globals.shape[1] != 0:
            raise InputError("to_layout", f"layout has no global tokens but globals {tuple(globals.shape)} were given")
        out = x_grid.new_zeros(B, self.seq_len, C)
        out[:, self._index("grid_to_seq", x_grid.device)] = x_grid
        if self.num_global:
            out[:, : self.num_global] = globals.to(x_grid.dtype)
        return out

    def from_layout(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, N, C] in layout order -> ([B, X*Y*Z, C] x-major grid tokens, [B, num_global, C] or None)."""
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise InputError("from_layout", f"x must be [B, {self.seq_len}, C], got {tuple(x.shape)}")
        x_grid = x[:, self._index("grid_to_seq", x.device)]
        return x_grid, (x[:, : self.num_global] if self.num_global else None)

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        return self.cached(name, device)

    def __repr__(self) -> str:
        pattern = "dense" if self.window is None else f"window={self.window}, dilation={self.dilation}"
        return (
            f"AttentionLayout(grid={self.grid}, tile={self.tile}, {pattern}, num_global={self.num_global}: "
            f"{self.num_blocks} blocks x {self.block_size} = {self.seq_len} positions, "
            f"{self.num_valid} valid, density={self.density:.4f})"
        )


@functools.lru_cache(maxsize=64)
def _build(grid, tile, window, dilation, num_global) -> AttentionLayout:
    with cache_builder():  # a layout first built under inference_mode must serve training too
        return AttentionLayout(grid, tile, window, dilation, num_global)


def attention_layout(grid, tile=(4, 4, 4), window=(1, 1, 1), dilation: int = 1, num_global: int = 0) -> AttentionLayout:
    """The (cached) block-sparse attention layout of a 3D token grid.

    grid: (X, Y, Z) tokens per axis; tile: tokens per tile per axis (an int means
    a cube); window: tiles of reach per axis (int or 3 ints; ``None`` = dense);
    dilation: tile stride of the window (>= 1); num_global: global tokens placed
    first. The same arguments (after normalisation) return the same object.
    """
    grid_t = _triple(grid, "grid", allow_zero=False)
    tile_t = _triple(tile, "tile", allow_zero=False)
    window_t = None if window is None else _triple(window, "window", allow_zero=True)
    if isinstance(dilation, bool) or not isinstance(dilation, (int, np.integer)) or dilation < 1:
        raise InputError("attention_layout", f"dilation must be an int >= 1, got {dilation!r}")
    if isinstance(num_global, bool) or not isinstance(num_global, (int, np.integer)) or num_global < 0:
        raise InputError("attention_layout", f"num_global must be an int >= 0, got {num_global!r}")
    return _build(grid_t, tile_t, window_t, int(dilation), int(num_global))
