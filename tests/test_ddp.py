"""2-process DDP on the CPU (gloo) computes the same loss and gradients as one process
on the same global batch. Synthetic data, not clinical data.

Each rank builds the same module (same config, same seed), takes its half of a
4-case global batch, computes the module's objective with ClipLoss told its rank and
the world size (features gathered across ranks with gradients) and averages the
gradients as DDP does. The global batch has a case without report and, on each rank,
one case without codes, so the masks travel through the gather too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain_helpers import make_cohort, shrunk_config

WORLD = 2
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module_and_batch(cohort: Path, out: Path):
    """The module (eval mode: no dropout, so ranks and the reference agree) and the global batch."""
    from volumevlm.data.datasets import collate_cases
    from volumevlm.train.train import build

    torch.manual_seed(0)
    datamodule, module = build(shrunk_config(cohort, out, "data.cache=false"))
    dataset = datamodule._dataset(datamodule.train_rows[:GLOBAL_BATCH])
    batch = collate_cases([dataset[i] for i in range(GLOBAL_BATCH)])
    batch["report"][2] = None  # a case without its report
    batch["has_report"][2] = False
    for i in (1, 3):  # one case without codes on each rank
        batch["phecodes"][i] = []
        batch["has_codes"][i] = False
    return module.eval(), batch


def _half(batch: dict, rank: int) -> dict:
    size = GLOBAL_BATCH // WORLD
    part = slice(rank * size, (rank + 1) * size)
    return {key: value[part] for key, value in batch.items()}


def _flat_grad(module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def _worker(rank: int, cohort: str, out: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        module, batch = _module_and_batch(Path(cohort), Path(out) / "run")
        module.configure_objective(rank=rank, world_size=WORLD)
        losses = module.compute_losses(_half(batch, rank))
        losses["loss"].backward()
        grad = _flat_grad(module)
        dist.all_reduce(grad)
        grad /= WORLD  # DDP averages gradients over ranks
        loss = losses["loss"].detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({"grad": grad, "loss": loss / WORLD, "clip": losses["clip"].detach().reshape(1)},
                      str(Path(out) / "ddp.safetensors"))
            (Path(out) / "ddp.json").write_text(json.dumps({"ok": True}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_on_the_global_batch(tmp_path):
    from safetensors.torch import load_file

    cohort = make_cohort(tmp_path / "cohort")
    # The reference run writes the vocabularies into run/vocab; the ranks read them there.
    module, batch = _module_and_batch(cohort, tmp_path / "run")
    reference = module.compute_losses(batch)
    reference["loss"].backward()
    ref_grad = _flat_grad(module)
    assert torch.isfinite(reference["loss"]) and float(reference["clip"].detach()) > 0

    mp.start_processes(_worker, args=(str(cohort), str(tmp_path), _free_port()), nprocs=WORLD,
                       join=True, start_method="spawn")
    assert json.loads((tmp_path / "ddp.json").read_text())["ok"]
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    assert abs(float(ddp["loss"]) - float(reference["loss"].detach())) < 1e-5
    assert abs(float(ddp["clip"]) - float(reference["clip"].detach())) < 1e-5  # every rank sees the full contrastive loss
    assert ddp["grad"].shape == ref_grad.shape
    assert torch.allclose(ddp["grad"], ref_grad, rtol=1e-4, atol=1e-5), (ddp["grad"] - ref_grad).abs().max()  # fp32 reduction order
