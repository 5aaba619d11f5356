"""Small heads on pooled features: the contrastive projection and the phenotype head."""

from __future__ import annotations

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
    """Multi-label phecode logits [B, V] from pooled image features [B, C] (V may be 0)."""

    def __init__(self, in_dim: int, num_codes: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_codes)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))
