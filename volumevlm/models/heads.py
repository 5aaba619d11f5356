"""Small heads on pooled features: the contrastive projection and the phenotype head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear map [B, C] -> [B, E] into the shared image-text space (CLIP-style, no bias)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=in_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PhenotypeHead(nn.Module):
    """Multi-label phecode logits [B, V] from pooled image features [B, C] (V may be 0).

    prevalence: each code's share of the training cases; the output biases start at
    its log-odds. Why: from zero biases every code starts at p = 0.5 while most are
    rare, and for hundreds of steps the BCE gradient mostly says "lower every logit";
    that pull reaches the shared encoder and drowns the per-case signal (the classic
    prior initialisation of detection heads). None: zero biases.
    """

    def __init__(self, in_dim: int, num_codes: int, prevalence: Sequence[float] | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_codes)
        nn.init.zeros_(self.fc.bias)
        if prevalence is not None:
            self.start_at_prevalence(prevalence)

    def start_at_prevalence(self, prevalence: Sequence[float]) -> None:
        """Set the output biases to the log-odds of each label's share (all in (0, 1))."""
        num_codes = self.fc.out_features
        share = torch.as_tensor(list(prevalence), dtype=torch.float32)
        if share.shape != (num_codes,) or not bool(((share > 0) & (share < 1)).all()):
            raise ValueError(f"PhenotypeHead: prevalence needs {num_codes} shares in (0, 1)")
        with torch.no_grad():
            self.fc.bias.copy_(torch.logit(share).to(self.fc.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))
