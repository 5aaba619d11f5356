"""Pure-torch block-sparse attention (any device; the CPU path).

Query blocks are grouped by the length of their key-block list (corner, edge,
face and interior tiles of a window pattern have different counts; global query
blocks attend every block). Inside a group every query block gathers the same
number of key blocks, so a chunk of query blocks is one batched matmul with no
wasted slots. Memory is O(chunk x window), never N x N. The backward recomputes
the probabilities from the saved log-sum-exp, like a flash-attention backward.

Layouts of density 1 (every valid pair attended) are routed by the op
(``volumevlm.ops.attention``) to one fused ``scaled_dot_product_attention`` call instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from volumevlm.ops.layout import AttentionLayout, cache_builder

# Scores held per chunk (elements of the [BH, X, R, S] score tensor, at least one query
# block's worth); bounds the working set to MiB-scale temporaries.
_CHUNK_ELEMENTS = 1 << 20

# Outputs are allocated uninitialised: every valid position is written by exactly one
# group and padding is overwritten at the end. (Tests swap this for a NaN filler.)
_alloc = torch.empty


@dataclass(frozen=True)
class _Group:
    """Query blocks that all attend ``L`` key blocks.

    q_blocks: int64 [Qg]; k_blocks: int64 [Qg, L] (None when L == num_blocks: the
    keys are the whole sequence, no gather needed); key_bias: float [Qg, L*T]
    (0 for valid, -inf for padding keys) or None when no key is padding.
    """

    q_blocks: torch.Tensor
    k_blocks: torch.Tensor | None
    key_bias: torch.Tensor | None
    length: int


def _groups(layout: AttentionLayout, device: torch.device, dtype: torch.dtype) -> list[_Group]:
    """The layout's query blocks grouped by key-list length, on ``device`` (cached)."""
    key = f"torch_path_groups@{device}/{dtype}"
    cached = layout._derived.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    with cache_builder():
        groups = _build_groups(layout, device, dtype)
    layout._derived[key] = groups
    layout.device_builds += 1
    return groups


def _build_groups(layout: AttentionLayout, device: torch.device, dtype: torch.dtype) -> list[_Group]:
    nb, T = layout.num_blocks, layout.block_size
    full_ptr, full_idx = layout.q2k_full_indptr.numpy(), layout.q2k_full_idx.numpy()
    part_ptr, part_idx = layout.q2k_part_indptr.numpy(), layout.q2k_part_idx.numpy()
    lengths = np.diff(full_ptr) + np.diff(part_ptr)
    key_valid = layout.key_valid.reshape(nb, T)
    groups = []
    for length in np.unique(lengths):
        if length == 0:
            continue  # query blocks made only of padding: output stays 0
        q_blocks = np.nonzero(lengths == length)[0]
        lists = np.stack(
            [
                np.sort(np.concatenate([full_idx[full_ptr[b] : full_ptr[b + 1]], part_idx[part_ptr[b] : part_ptr[b + 1]]]))
                for b in q_blocks
            ]
        )
        k_blocks = torch.from_numpy(lists.astype(np.int64))
        valid = key_valid[k_blocks].reshape(len(q_blocks), length * T)
        bias = None
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf")).to(device)
        whole = length == nb
        groups.append(
            _Group(
                q_blocks=torch.from_numpy(q_blocks.astype(np.int64)).to(device),
                k_blocks=None if whole else k_blocks.to(device),
                key_bias=bias,
                length=int(length),
            )
        )
    return groups


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(group: _Group, BH: int, T: int):
    per_block = BH * T * group.length * T
    step = max(1, _CHUNK_ELEMENTS // per_block)
    n = group.q_blocks.numel()
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# Inside a chunk every tensor is [BH, X, R, .]: for an ordinary group X = c query
# blocks of R = T rows, each with its own S = L*T gathered keys; for the
# whole-sequence group X = 1 and the c blocks are R = c*T rows against S = N keys.
# Sequence tensors are viewed as [BH, nb, T*D] so gathers, writes and gradient
# accumulation move whole contiguous blocks (index_select / index_copy_ / index_add_).


def _rows(x3: torch.Tensor, qi: torch.Tensor, group: _Group, T: int, cdt: torch.dtype) -> torch.Tensor:
    """x3 [BH, nb, T*W] -> the chunk's query rows [BH, X, R, W] in the compute dtype."""
    BH, _, TW = x3.shape
    g = torch.index_select(x3, 1, qi).to(cdt)
    if group.k_blocks is None:
        return g.view(BH, 1, qi.numel() * T, TW // T)
    return g.view(BH, qi.numel(), T, TW // T)


def _keys(x3: torch.Tensor, group: _Group, sl: slice, T: int, cdt: torch.dtype) -> torch.Tensor:
    """x3 [BH, nb, T*D] -> the chunk's keys [BH, X, S, D] in the compute dtype."""
    BH, nb, TD = x3.shape
    if group.k_blocks is None:
        return x3.view(BH, 1, nb * T, TD // T).to(cdt)
    kb = group.k_blocks[sl]
    g = torch.index_select(x3, 1, kb.reshape(-1)).to(cdt)
    return g.view(BH, kb.shape[0], group.length * T, TD // T)


def _masked_scores(qs: torch.Tensor, kg: torch.Tensor, group: _Group, sl: slice) -> torch.Tensor:
    """Scores [BH, X, R, S] = qs kg^T, with -inf at padding keys."""
    s = torch.matmul(qs, kg.transpose(-1, -2))
    if group.key_bias is not None:
        bias = group.key_bias[:1] if group.k_blocks is None else group.key_bias[sl]
        s.add_(bias[None, :, None, :].to(s.dtype))
    return s


def clean_inputs(layout: AttentionLayout, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Zero the padding positions of [B, H, N, D] tensors so NaN/garbage there cannot leak."""
    if not layout.has_padding:
        return list(xs)
    valid = layout.cached("key_valid", xs[0].device)[:, None]
    return [torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in xs]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float):
    """Block-sparse attention forward. q, k, v [B, H, N, D] (padding already zeroed).

    Returns (o [B, H, N, D] in q's dtype, lse [B, H, N] in the compute dtype (float32,
    float64 for float64 inputs), +inf at padding queries).
    """
    B, H, N, D = q.shape
    BH, nb, T = B * H, layout.num_blocks, layout.block_size
    cdt = _compute_dtype(q.dtype)
    q3, k3, v3 = (x.reshape(BH, nb, T * D) for x in (q, k, v))
    out = _alloc(BH, nb, T * D, dtype=q.dtype, device=q.device)
    lse = _alloc(BH, nb, T, dtype=cdt, device=q.device)
    for group in _groups(layout, q.device, cdt):
        for sl in _chunks(group, BH, T):
            qi = group.q_blocks[sl]
            c = qi.numel()
            qs = _rows(q3, qi, group, T, cdt).mul_(scale)  # scaling q is cheaper than scaling scores
            s = _masked_scores(qs, _keys(k3, group, sl, T, cdt), group, sl)
            m = s.amax(dim=-1, keepdim=True)
            s.sub_(m).exp_()
            denom = s.sum(dim=-1, keepdim=True)
            o = torch.matmul(s, _keys(v3, group, sl, T, cdt)).div_(denom)
            out.index_copy_(1, qi, o.reshape(BH, c, T * D).to(q.dtype))
            lse.index_copy_(1, qi, (m + denom.log()).reshape(BH, c, T))
    out, lse = out.view(B, H, N, D), lse.view(B, H, N)
    if not layout.has_padding:
        return out, lse
    # Padding queries (including blocks with empty lists, never written above): o = 0, lse = +inf.
    qvalid = layout.cached("query_valid", q.device)
    out = torch.where(qvalid[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    lse = torch.where(qvalid, lse, torch.full((), float("inf"), dtype=cdt, device=q.device))
    return out, lse


def backward(do, q, k, v, o, lse, layout: AttentionLayout, scale: float):
    """Gradients (dq, dk, dv) [B, H, N, D] in q's dtype; inputs padding-zeroed, lse from :func:`forward`."""
    B, H, N, D = q.shape
    BH, nb, T = B * H, layout.num_blocks, layout.block_size
    cdt = lse.dtype
    q3, k3, v3, do3 = (x.reshape(BH, nb, T * D) for x in (q, k, v, do))
    lse3 = lse.reshape(BH, nb, T)
    dq = _alloc(BH, nb, T * D, dtype=cdt, device=q.device)
    dk = torch.zeros(BH, nb, T * D, dtype=cdt, device=q.device)
    dv = torch.zeros(BH, nb, T * D, dtype=cdt, device=q.device)
    for group in _groups(layout, q.device, cdt):
        for sl in _chunks(group, BH, T):
            qi = group.q_blocks[sl]
            c = qi.numel()
            qs = _rows(q3, qi, group, T, cdt).mul_(scale)
            dog = _rows(do3, qi, group, T, cdt)
            kg = _keys(k3, group, sl, T, cdt)
            vg = _keys(v3, group, sl, T, cdt)
            p = _masked_scores(qs, kg, group, sl)
            p.sub_(_rows(lse3, qi, group, T, cdt)).exp_()  # probabilities; zero rows at padding queries
            dvg = torch.matmul(p.transpose(-1, -2), dog)  # [BH, X, S, D]
            dp = torch.matmul(dog, vg.transpose(-1, -2))
            # Each query row's whole support is in its gathered keys, so the softmax backward's
            # row sum of p * dp is exactly rowsum(do * o): one fused pass gives dS.
            ds = torch._softmax_backward_data(dp, p, -1, cdt)
            dq.index_copy_(1, qi, torch.matmul(ds, kg).mul_(scale).reshape(BH, c, T * D))
            dkg = torch.matmul(ds.transpose(-1, -2), qs)
            if group.k_blocks is None:  # whole-sequence keys (X = 1): add straight in
                dk.add_(dkg.view(BH, nb, T * D))
                dv.add_(dvg.view(BH, nb, T * D))
            else:
                idx = group.k_blocks[sl].reshape(-1)
                dk.index_add_(1, idx, dkg.reshape(BH, -1, T * D))
                dv.index_add_(1, idx, dvg.reshape(BH, -1, T * D))
    dq, dk, dv = (x.view(B, H, N, D).to(q.dtype) for x in (dq, dk, dv))
    if layout.has_padding:
        # Blocks with empty lists were never written; padding query rows get no gradient.
        qvalid = layout.cached("query_valid", q.device)[:, None]
        dq = torch.where(qvalid, dq, torch.zeros((), dtype=dq.dtype, device=dq.device))
    return dq, dk, dv
