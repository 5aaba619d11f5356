"""The pretraining objective against brute-force references, and its 2-process (gloo)
behaviour against one process on the global batch. All inputs are random tensors
(synthetic, not clinical data). The DDP equivalence of the whole module is in
test_ddp.py."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from volumevlm.train.losses import (
    PretrainObjective,
    clip_loss,
    gather_no_grad,
    gather_with_grad,
    overlap_supervised_contrastive,
    supervised_contrastive,
)


def brute_force_clip(img, txt, scale):
    """Symmetric InfoNCE written as explicit python loops over pairs (float math)."""
    n = len(img)
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]  # image i against every text
        col = [scale * float(img[j] @ txt[i]) for j in range(n)]  # text i against every image
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def brute_force_bce(logits, targets, keep, pos_weight=None):
    """Mean over kept rows and all codes of -[p*y*log s(x) + (1-y)*log(1-s(x))]."""
    terms = []
    for i in range(logits.shape[0]):
        if not keep[i]:
            continue
        for j in range(logits.shape[1]):
            x, y = float(logits[i, j]), float(targets[i, j])
            p = 1.0 if pos_weight is None else float(pos_weight[j])
            s = 1.0 / (1.0 + math.exp(-x))
            terms.append(-(p * y * math.log(s) + (1.0 - y) * math.log(1.0 - s)))
    return sum(terms) / len(terms)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------------------- contrastive


def test_clip_loss_matches_brute_force_and_is_symmetric():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    scale = torch.tensor(7.5, dtype=torch.float64)
    ours = clip_loss(img, txt, scale)
    assert abs(float(ours) - brute_force_clip(img, txt, 7.5)) < 1e-10
    # swapping the modalities swaps the two cross entropies: same mean
    assert abs(float(clip_loss(txt, img, scale)) - float(ours)) < 1e-12
    # a float32 run agrees with the float64 reference
    assert abs(float(clip_loss(img.float(), txt.float(), scale.float())) - float(ours)) < 1e-5


def test_temperature_effect():
    img = unit(5, 8, seed=9)
    # scale 0: every logit equal, each softmax uniform over n -> log(n) exactly
    assert abs(float(clip_loss(img, unit(5, 8, seed=10), torch.tensor(0.0, dtype=torch.float64))) - math.log(5)) < 1e-12
    # matched pairs (text == image): a sharper softmax lowers the loss monotonically towards 0
    losses = [float(clip_loss(img, img, torch.tensor(s, dtype=torch.float64))) for s in (1.0, 5.0, 20.0, 100.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-6 and 0.5 < losses[0] < math.log(5)  # better than uniform, far from 0
    assert abs(losses[1] - brute_force_clip(img, img, 5.0)) < 1e-10


def test_masked_rows_are_the_same_as_removed_rows():
    img, txt = unit(5, 4, seed=3), unit(5, 4, seed=4)
    mask = torch.tensor([True, False, True, True, False])
    scale = torch.tensor(3.0, dtype=torch.float64)
    assert abs(float(clip_loss(img, txt, scale, mask)) - brute_force_clip(img[mask], txt[mask], 3.0)) < 1e-10
    # garbage in the masked rows changes nothing
    junk_img, junk_txt = img.clone(), txt.clone()
    junk_img[~mask] = 100.0
    junk_txt[~mask] = -7.0
    assert float(clip_loss(junk_img, junk_txt, scale, mask)) == pytest.approx(float(clip_loss(img, txt, scale, mask)), abs=1e-12)
    # one pair: the softmax is over one entry, loss 0
    one = torch.tensor([False, False, True, False, False])
    assert abs(float(clip_loss(img, txt, scale, one))) < 1e-12


def test_no_pairs_give_an_exact_zero_connected_to_the_inputs():
    img = unit(5, 4, seed=3).requires_grad_()
    txt = unit(5, 4, seed=4).requires_grad_()
    none = clip_loss(img, txt, torch.tensor(3.0), torch.zeros(5, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad
    none.backward()
    assert img.grad is not None and txt.grad is not None
    assert float(img.grad.abs().sum()) == 0.0 and float(txt.grad.abs().sum()) == 0.0


def test_clip_loss_gradients_numerically():
    img = unit(4, 3, seed=5).requires_grad_()
    txt = unit(4, 3, seed=6).requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True])
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s, mask), (img, txt, scale))


# ---------------------------------------------------------------------------- phenotype


def _phenotype_case(seed=0, rows=5, codes=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, codes, generator=g, dtype=torch.float64) * 2
    targets = (torch.rand(rows, codes, generator=g) > 0.5).double()
    return logits, targets


def test_phenotype_term_is_bce_over_cases_with_codes():
    logits, targets = _phenotype_case()
    has = torch.tensor([True, False, True, True, False])
    objective = PretrainObjective(clip_weight=0.0, phenotype_weight=1.0)
    ours = objective.phenotype(logits, targets, has)
    assert abs(float(ours) - brute_force_bce(logits, targets, has)) < 1e-10
    assert torch.allclose(ours, F.binary_cross_entropy_with_logits(logits[has], targets[has]), atol=1e-12)
    # rows without codes may hold anything
    junk = targets.clone()
    junk[~has] = 1.0 - junk[~has]
    assert float(objective.phenotype(logits, junk, has)) == pytest.approx(float(ours), abs=1e-12)


def test_pos_weight_scales_the_positive_terms():
    logits, targets = _phenotype_case(seed=1)
    has = torch.tensor([True, True, False, True, True])
    pos_weight = torch.tensor([4.0, 1.0, 0.5])
    weighted = PretrainObjective(pos_weight=pos_weight).phenotype(logits, targets, has)
    assert abs(float(weighted) - brute_force_bce(logits, targets, has, pos_weight)) < 1e-10
    plain = PretrainObjective().phenotype(logits, targets, has)
    assert abs(float(weighted) - float(plain)) > 1e-3
    # all-4 weights raise the loss whenever there is a positive target
    assert float(PretrainObjective(pos_weight=torch.full((3,), 4.0)).phenotype(logits, targets, has)) > float(plain)


def test_phenotype_without_codes_is_a_connected_zero():
    logits, targets = _phenotype_case()
    logits.requires_grad_()
    objective = PretrainObjective()
    for value in (objective.phenotype(logits, targets, torch.zeros(5, dtype=torch.bool)),
                  objective.phenotype(logits[:, :0], targets[:, :0], torch.ones(5, dtype=torch.bool))):
        assert float(value.detach()) == 0.0 and value.requires_grad


def test_phenotype_gradients_numerically():
    logits, targets = _phenotype_case(seed=2, rows=4, codes=2)
    has = torch.tensor([True, False, True, True])
    objective = PretrainObjective(pos_weight=torch.tensor([2.0, 0.5]))
    assert torch.autograd.gradcheck(lambda x: objective.phenotype(x, targets, has), (logits.requires_grad_(),))


# ---------------------------------------------------------------------------- combination


def test_weights_combine_and_zero_weight_terms_still_keep_the_graph():
    img = unit(4, 8, seed=7).float().requires_grad_()
    txt = unit(4, 8, seed=8).float()
    logits = torch.randn(4, 2, requires_grad=True)
    targets = torch.ones(4, 2)
    ones = torch.ones(4, dtype=torch.bool)
    scale = torch.tensor(5.0)
    both = PretrainObjective(2.0, 0.5)(img, txt, scale, logits, targets, ones, ones)
    assert set(both) == {"loss", "clip", "phenotype"} and all(v.shape == () for v in both.values())
    assert abs(float(both["clip"].detach()) - brute_force_clip(img.detach().double(), txt.double(), 5.0)) < 1e-5
    assert torch.allclose(both["loss"], 2.0 * both["clip"] + 0.5 * both["phenotype"])
    # weights are plain attributes, changed per step by staged schedules
    objective = PretrainObjective(2.0, 0.5)
    objective.clip_weight = 0.0
    only_phen = objective(img, txt, scale, logits, targets, ones, ones)
    only_phen["loss"].backward()
    assert img.grad is not None and float(img.grad.abs().sum()) == 0.0  # connected, zero gradient
    assert float(only_phen["clip"]) == 0.0
    assert torch.allclose(only_phen["loss"], 0.5 * both["phenotype"])
    assert not isinstance(objective, torch.nn.Module)


def test_gathers_are_identities_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x, 1) is x and gather_with_grad(x, 4) is x
    mask = torch.tensor([True, False])
    assert gather_no_grad(mask, 2) is mask


# ---------------------------------------------------------------------------- 2 processes (gloo)

WORLD = 2
DIM, EMBED, CODES = 5, 4, 3
# Global batch of 8 cases, 4 per rank. Rank 0 has 3 cases with codes, rank 1 has 1
# (unequal counts); each rank has one case without a report. The second scenario has
# no codes on rank 1 at all.
PAIR_MASK = [True, True, False, True, True, False, True, True]
CODES_SCENARIOS = {
    "unequal": [True, True, False, True, False, False, True, False],
    "one_rank_empty": [True, False, True, True, False, False, False, False],
}


def _data():
    g = torch.Generator().manual_seed(42)
    n = WORLD * 4
    return {
        "x_img": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "x_txt": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "targets": (torch.rand(n, CODES, generator=g) > 0.5).double(),
        "pair_mask": torch.tensor(PAIR_MASK),
    }


class _Tiny(torch.nn.Module):
    """A shared projection (both towers, so gradients arrive from both gathers), a
    phenotype head and a learnable temperature; float64 for tight comparisons."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.proj = torch.nn.Linear(DIM, EMBED).double()
        self.head = torch.nn.Linear(DIM, CODES).double()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(4.0), dtype=torch.float64))

    def forward(self, objective, x_img, x_txt, targets, pair_mask, codes_mask):
        return objective(
            image_emb=F.normalize(self.proj(x_img), dim=-1),
            text_emb=F.normalize(self.proj(x_txt), dim=-1),
            logit_scale=self.log_scale.exp(),
            phenotype_logits=self.head(x_img),
            phenotype_targets=targets,
            pair_mask=pair_mask,
            codes_mask=codes_mask,
        )


def _run(rank: int, world: int, codes: list[bool]) -> dict[str, torch.Tensor]:
    """Losses and parameter gradients of one rank's share (the whole batch when world=1)."""
    data = _data()
    data["codes_mask"] = torch.tensor(codes)
    size = len(codes) // world
    part = {key: value[rank * size:(rank + 1) * size] for key, value in data.items()}
    model = _Tiny()
    objective = PretrainObjective(clip_weight=1.0, phenotype_weight=0.7,
                                  pos_weight=torch.tensor([2.0, 1.0, 0.5]), rank=rank, world_size=world)
    losses = model(objective, **part)
    losses["loss"].backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {**{k: v.detach().clone() for k, v in losses.items()}, **{f"grad.{k}": v for k, v in grads.items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        # the gathers themselves: rank order, gradients back to the owner's slice
        x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        gathered = gather_with_grad(x, WORLD)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)
        (gathered * weights * (rank + 1)).sum().backward()
        results["gather.value"] = gathered.detach()
        results["gather.grad"] = x.grad.detach()
        results["gather.mask"] = gather_no_grad(torch.tensor([rank == 0, True, False]), WORLD)
        for name, codes in CODES_SCENARIOS.items():
            run = _run(rank, WORLD, codes)
            for key, value in run.items():
                if key.startswith("grad."):
                    dist.all_reduce(value)
                    value /= WORLD  # DDP averages gradients over ranks
                results[f"{name}.{key}"] = value
        torch.save(results, str(Path(out) / f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(str(tmp_path / f"rank{r}.pt")) for r in range(WORLD)]

    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]).double()
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    for r, res in enumerate(ranks):
        assert torch.equal(res["gather.value"], expected)
        # d/dx_r of sum_q (q+1) * <gathered, weights>: the owner's slice of weights, times 1 + 2
        assert torch.equal(res["gather.grad"], 3.0 * weights[2 * r:2 * r + 2])
        assert res["gather.mask"].dtype == torch.bool
        assert res["gather.mask"].tolist() == [True, True, False, False, True, False]

    for name, codes in CODES_SCENARIOS.items():
        single = _run(0, 1, codes)
        assert float(single["clip"]) > 0 and float(single["phenotype"]) > 0
        for res in ranks:  # every rank computes the full contrastive loss
            assert abs(float(res[f"{name}.clip"]) - float(single["clip"])) < 1e-12
        # DDP averages: the mean over ranks of the local terms is the global value
        for key in ("phenotype", "loss"):
            mean = sum(float(res[f"{name}.{key}"]) for res in ranks) / WORLD
            assert abs(mean - float(single[key])) < 1e-12, (name, key, mean, float(single[key]))
        # the ranks' local phenotype terms differ (unequal shares), so this is no accident
        assert abs(float(ranks[0][f"{name}.phenotype"]) - float(ranks[1][f"{name}.phenotype"])) > 1e-3
        for key in single:
            if key.startswith("grad."):
                assert float(single[key].abs().sum()) > 0, key
                for res in ranks:
                    assert torch.allclose(res[f"{name}.{key}"], single[key], rtol=1e-10, atol=1e-12), (name, key)


def test_supervised_contrastive_matches_a_hand_computation():
    # Rows 0 and 2 share a label and point the same way; row 1 is alone in its class.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    loss = supervised_contrastive(emb, labels, temperature=0.5)
    # Anchor 0: similarities / 0.5 to rows 1 and 2 are 0 and 2; its positive is row 2:
    # -log(e^2 / (e^0 + e^2)) = log(1 + e^-2). Anchor 2 likewise; row 1 has no positive.
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # Swapping which rows agree changes the loss: the labels, not the order, decide.
    swapped = supervised_contrastive(emb.detach(), torch.tensor([[1.0], [1.0], [0.0]]), temperature=0.5)
    # Anchor 0's positive is now row 1 (similarity 0 against row 2's 2), anchor 1's is row 0
    # (both similarities 0): the mean of log(1 + e^2) and log 2.
    assert swapped.item() == pytest.approx((math.log(1 + math.exp(2)) + math.log(2)) / 2, rel=1e-6)
    # No anchor with a positive: zero, with a gradient path.
    alone = supervised_contrastive(emb, torch.eye(3), temperature=0.5)
    assert alone.item() == 0.0 and alone.requires_grad


def test_overlap_supervised_contrastive_weighs_positives_by_shared_labels():
    # Row 0 states findings A and B, row 1 states A, row 2 states B, row 3 states nothing.
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.3]]), dim=1)
    emb.requires_grad_(True)
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    t = 0.5
    loss = overlap_supervised_contrastive(emb, labels, temperature=t)
    sim = (emb.detach() @ emb.detach().T / t).tolist()

    def log_p(i, j):
        return sim[i][j] - math.log(sum(math.exp(sim[i][k]) for k in range(4) if k != i))

    # Jaccard weights: 0-1 and 0-2 are 1/2; 1-2 share nothing; row 3 overlaps no row
    # (a row without labels overlaps fully only with another row without labels).
    anchor0 = -(0.5 * log_p(0, 1) + 0.5 * log_p(0, 2)) / 1.0
    anchor1 = -log_p(1, 0)
    anchor2 = -log_p(2, 0)
    assert loss.item() == pytest.approx((anchor0 + anchor1 + anchor2) / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    # With at most one label per row the weights are 0 or 1: the exact-match loss.
    single = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert overlap_supervised_contrastive(emb.detach(), single, t).item() == pytest.approx(
        supervised_contrastive(emb.detach(), single, t).item(), rel=1e-6)
    # Two rows without labels are positives of each other, as in the exact-match loss.
    empty = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert overlap_supervised_contrastive(emb.detach(), empty, t).item() == pytest.approx(
        supervised_contrastive(emb.detach(), empty, t).item(), rel=1e-6)
    alone = overlap_supervised_contrastive(emb, torch.eye(4)[:, :4], t)
    assert alone.item() == 0.0 and alone.requires_grad
