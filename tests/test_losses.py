"""The pretraining objective against brute-force references (the DDP equivalence of
the whole module is in test_ddp.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from volumevlm.train.losses import PretrainObjective, clip_loss


def brute_force_clip(img, txt, scale):
    """Symmetric InfoNCE written as explicit loops over pairs."""
    n = len(img)
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(img[j] @ txt[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_clip_loss_matches_brute_force_and_is_symmetric():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    scale = torch.tensor(7.5, dtype=torch.float64)
    ours = clip_loss(img, txt, scale)
    assert abs(float(ours) - brute_force_clip(img, txt, 7.5)) < 1e-5
    assert abs(float(clip_loss(txt, img, scale)) - float(ours)) < 1e-6
    # matched pairs (txt == img) at high temperature multiplier: loss near 0
    assert float(clip_loss(img, img, torch.tensor(100.0))) < float(ours)


def test_masked_rows_are_the_same_as_removed_rows():
    img, txt = unit(5, 4, seed=3), unit(5, 4, seed=4)
    mask = torch.tensor([True, False, True, True, False])
    scale = torch.tensor(3.0)
    assert torch.allclose(clip_loss(img, txt, scale, mask), clip_loss(img[mask], txt[mask], scale))
    none = clip_loss(img.requires_grad_(), txt, scale, torch.zeros(5, dtype=torch.bool))
    assert float(none) == 0.0 and none.requires_grad


def test_clip_loss_gradients_numerically():
    img = unit(4, 3, seed=5).requires_grad_()
    txt = unit(4, 3, seed=6).requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    # float64 end to end for gradcheck: clip_loss promotes to at least float32
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s).double(), (img, txt, scale), atol=1e-4, rtol=1e-3)


def test_phenotype_term_is_bce_over_cases_with_codes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g)
    targets = (torch.rand(4, 3, generator=g) > 0.5).float()
    has = torch.tensor([True, False, True, True])
    objective = PretrainObjective(clip_weight=0.0, phenotype_weight=1.0)
    ours = objective.phenotype(logits, targets, has)
    reference = F.binary_cross_entropy_with_logits(logits[has], targets[has])
    assert torch.allclose(ours, reference, atol=1e-6)
    weighted = PretrainObjective(pos_weight=torch.full((3,), 4.0)).phenotype(logits, targets, has)
    ref_w = F.binary_cross_entropy_with_logits(logits[has], targets[has], pos_weight=torch.full((3,), 4.0))
    assert torch.allclose(weighted, ref_w, atol=1e-6) and float(weighted) > float(ours)
    assert float(objective.phenotype(logits, targets, torch.zeros(4, dtype=torch.bool))) == 0.0
    assert float(objective.phenotype(logits[:, :0], targets[:, :0], has)) == 0.0


def test_weights_combine_and_zero_weight_terms_still_keep_the_graph():
    img = unit(4, 8, seed=7).float().requires_grad_()
    txt = unit(4, 8, seed=8).float()
    logits = torch.randn(4, 2, requires_grad=True)
    targets = torch.ones(4, 2)
    ones = torch.ones(4, dtype=torch.bool)
    scale = torch.tensor(5.0)
    both = PretrainObjective(2.0, 0.5)(img, txt, scale, logits, targets, ones, ones)
    assert torch.allclose(both["loss"], 2.0 * both["clip"] + 0.5 * both["phenotype"])
    only_phen = PretrainObjective(0.0, 1.0)(img, txt, scale, logits, targets, ones, ones)
    only_phen["loss"].backward()
    assert img.grad is not None and float(img.grad.abs().sum()) == 0.0  # connected, zero gradient
    assert float(only_phen["clip"]) == 0.0
