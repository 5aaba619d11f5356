"""The pretraining objective: symmetric InfoNCE (image <-> report) + phenotype BCE.

Correct under DDP. The contrastive term needs every rank's negatives: features are
gathered from all ranks WITH gradients (:class:`_GatherWithGrad`, whose backward sums
every rank's gradient into the owner's slice), and every rank
computes the full global loss. Lightning/DDP then averages parameter gradients over
W ranks: (1/W) * sum_r (W * dL/df_r) df_r/dtheta = dL/dtheta, the single-process
gradient on the global batch (open_clip's ClipLoss with gather_with_grad does the same).

The phenotype term is a mean over the code-carrying cases of the GLOBAL batch: each
rank divides its local sum by the global count (an all-reduced integer, no gradient)
and multiplies by W, so the average over ranks - which DDP takes - is the global mean
even when ranks hold different numbers of cases with codes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the ranks' gradients of the gathered tensor and
    hands each rank its own slice. The sum is an all_reduce, which every backend has
    (gloo has no reduce_scatter); the tensors are [batch, dim] embeddings, so the W-fold
    traffic over a reduce_scatter does not matter. Ours rather than
    torch.distributed.nn.functional.all_gather: that one is deprecated, and its gloo
    backward goes through all_to_all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[b, ...] from every rank concatenated in rank order -> [W*b, ...]; gradients flow
    back to each rank's own slice (summed over the ranks' losses). Identity when not
    distributed. Every rank must hold the same b (the distributed sampler pads)."""
    if not _distributed(world_size):
        return x
    return _GatherWithGrad.apply(x.contiguous())


def gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Like :func:`gather_with_grad` without gradients; bool tensors travel as uint8
    (gloo gathers no bool)."""
    if not _distributed(world_size):
        return x
    as_bool = x.dtype == torch.bool
    send = x.to(torch.uint8) if as_bool else x
    parts = [torch.empty_like(send) for _ in range(world_size)]
    dist.all_gather(parts, send.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if as_bool else out


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 that stays connected to the inputs (DDP needs every used parameter in
    the graph, even in a step where a term has nothing to say)."""
    return sum(t.sum() for t in tensors) * 0.0


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the paired rows.

    image_emb, text_emb: [B, E] (unit length as the model gives them); logit_scale: the
    scalar multiplier exp(t); pair_mask: bool [B], rows without a report excluded
    (default: all rows). Mean of the image->text and text->image cross entropies with
    the diagonal as targets; 0 (graph-connected) without pairs.
    """
    if pair_mask is not None:
        if not bool(pair_mask.any()):
            return _zero_like_graph(image_emb, text_emb, logit_scale)
        image_emb, text_emb = image_emb[pair_mask], text_emb[pair_mask]
    # at least float32: bf16 logits lose the ranking among close negatives
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    logits = logit_scale.to(dtype) * image_emb.to(dtype) @ text_emb.to(dtype).T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class PretrainObjective:
    """clip_weight * clip_loss + phenotype_weight * phenotype BCE, DDP-aware.

    A plain object (not an nn.Module): it holds no parameters and stays out of state
    dicts. ``clip_weight`` / ``phenotype_weight`` may be changed between steps
    (staged schedules). pos_weight: float [V] for BCE-with-logits, or None.
    """

    def __init__(self, clip_weight: float = 1.0, phenotype_weight: float = 1.0,
                 pos_weight: torch.Tensor | None = None, rank: int = 0, world_size: int = 1):
        self.clip_weight = float(clip_weight)
        self.phenotype_weight = float(phenotype_weight)
        self.pos_weight = pos_weight
        self.rank = int(rank)
        self.world_size = int(world_size)

    def contrastive(self, image_emb, text_emb, logit_scale, pair_mask) -> torch.Tensor:
        image_all = gather_with_grad(image_emb, self.world_size)
        text_all = gather_with_grad(text_emb, self.world_size)
        mask_all = gather_no_grad(pair_mask, self.world_size)
        return clip_loss(image_all, text_all, logit_scale, mask_all)

    def phenotype(self, logits: torch.Tensor, targets: torch.Tensor, codes_mask: torch.Tensor) -> torch.Tensor:
        """Mean BCE per (case with codes, code) of the global batch, as this rank's share."""
        # a float count: all_reduce of integer tensors is not supported on every backend
        count = codes_mask.sum().to(torch.float64)
        if _distributed(self.world_size):
            count = count.clone()
            dist.all_reduce(count)
        num_codes = logits.shape[1]
        if num_codes == 0 or float(count) == 0.0:
            return _zero_like_graph(logits)
        # at least float32 (bf16 logits under autocast), float64 stays float64
        dtype = torch.promote_types(logits.dtype, torch.float32)
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device, dtype)
        per_item = F.binary_cross_entropy_with_logits(
            logits.to(dtype), targets.to(dtype), pos_weight=pos_weight, reduction="none"
        )
        local_sum = (per_item * codes_mask[:, None].to(dtype)).sum()
        scale = self.world_size if _distributed(self.world_size) else 1
        return local_sum * scale / (count.to(dtype) * num_codes)

    def __call__(self, image_emb, text_emb, logit_scale, phenotype_logits, phenotype_targets,
                 pair_mask, codes_mask) -> dict[str, torch.Tensor]:
        """All [B, ...] local tensors; returns scalar {"loss", "clip", "phenotype"}.
        A term whose weight is 0 is not computed (returned as a detached 0)."""
        zero = image_emb.new_zeros((), dtype=torch.float32)
        clip = (self.contrastive(image_emb, text_emb, logit_scale, pair_mask)
                if self.clip_weight else zero)
        phen = (self.phenotype(phenotype_logits, phenotype_targets, codes_mask)
                if self.phenotype_weight else zero)
        loss = self.clip_weight * clip + self.phenotype_weight * phen
        if not (self.clip_weight and self.phenotype_weight):
            # keep every parameter in the graph (DDP's unused-parameter check)
            loss = loss + _zero_like_graph(image_emb, text_emb, phenotype_logits, logit_scale)
        return {"loss": loss, "clip": clip, "phenotype": phen}


def supervised_contrastive(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over one set of embeddings.

    emb [N, E] unit rows; labels [N, ...]: rows with equal labels are positives of each
    other, every other row a negative. For each anchor i with at least one positive,
    -mean over its positives p of log softmax_j!=i(emb_i . emb_j / temperature)[p]; the
    mean over those anchors (0 with a gradient path when no anchor has a positive).
    """
    n = emb.shape[0]
    flat = labels.reshape(n, -1)
    same = (flat[:, None, :] == flat[None, :, :]).all(dim=-1)
    self_mask = torch.eye(n, dtype=torch.bool, device=emb.device)
    positives = same & ~self_mask
    anchors = positives.any(dim=1)
    if not bool(anchors.any()):
        return emb.sum() * 0.0
    logits = (emb @ emb.T / float(temperature)).masked_fill(self_mask, float("-inf"))
    log_prob = torch.log_softmax(logits.float(), dim=1).masked_fill(~positives, 0.0)
    per_anchor = log_prob.sum(dim=1)[anchors] / positives.sum(dim=1)[anchors]
    return -per_anchor.mean()


def overlap_supervised_contrastive(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """:func:`supervised_contrastive` with graded positives for multi-label rows.

    emb [N, E] unit rows; labels [N, F] in {0, 1}. Row j is a positive of anchor i with
    weight |i & j| / |i | j| (the Jaccard overlap of their label sets; two rows without
    any label overlap fully), so "enlarged liver, fatty infiltration" is pulled towards
    both "enlarged liver" and "fatty liver" instead of only towards sections stating
    exactly the same pair. For each anchor with some positive weight, -sum_j w_ij log
    softmax_j!=i(emb_i . emb_j / temperature) / sum_j w_ij; the mean over those anchors.
    With at most one label per row the weights are 0 or 1 and this equals
    :func:`supervised_contrastive`.
    """
    n = emb.shape[0]
    flat = labels.reshape(n, -1).float()
    inter = flat @ flat.T
    union = flat.sum(dim=1)[:, None] + flat.sum(dim=1)[None, :] - inter
    weight = torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(inter))
    self_mask = torch.eye(n, dtype=torch.bool, device=emb.device)
    weight = weight.masked_fill(self_mask, 0.0)
    anchors = weight.sum(dim=1) > 0
    if not bool(anchors.any()):
        return emb.sum() * 0.0
    logits = (emb @ emb.T / float(temperature)).masked_fill(self_mask, float("-inf"))
    log_prob = torch.log_softmax(logits.float(), dim=1).masked_fill(self_mask, 0.0)
    per_anchor = (weight * log_prob).sum(dim=1)[anchors] / weight.sum(dim=1)[anchors]
    return -per_anchor.mean()
