"""Multi-scale patch embedding (components 1 and 2: wave and target patching composers).

Legend: B batch, S look-back steps, F input columns, L tokens, D d_model.
Each scale (patch_len, stride) cuts the window into overlapping patches along time; a patch of
all columns is projected to D. For S=96 and the default scales: 47 + 23 + 15 = 85 tokens.
Every token gets a learned position embedding and its scale's embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from model.dropout import Dropout


class MultiScalePatchEmbedding(nn.Module):
    def __init__(self, num_inputs: int, d_model: int, seq_len: int,
                 scales: list[list[int]], dropout: float) -> None:
        super().__init__()
        self.scales = [tuple(s) for s in scales]
        self.projections = nn.ModuleList(nn.Linear(patch_len * num_inputs, d_model)
                                         for patch_len, _ in self.scales)
        tokens_per_scale = [(seq_len - p) // s + 1 for p, s in self.scales]
        self.num_tokens = sum(tokens_per_scale)
        self.position = nn.Parameter(torch.randn(self.num_tokens, d_model) * 0.02)
        self.scale_embedding = nn.Parameter(torch.randn(len(self.scales), d_model) * 0.02)
        scale_index = torch.repeat_interleave(torch.arange(len(self.scales)),
                                              torch.tensor(tokens_per_scale),
                                              output_size=self.num_tokens)
        self.register_buffer("token_scale_index", scale_index, persistent=False)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x_BSF: torch.Tensor) -> torch.Tensor:
        tokens = [proj(x_BSF.unfold(1, patch_len, stride).flatten(2))   # (B, L_scale, F*patch)
                  for proj, (patch_len, stride) in zip(self.projections, self.scales)]
        x_BLD = torch.cat(tokens, dim=1)
        x_BLD = x_BLD + self.position + self.scale_embedding[self.token_scale_index]
        return self.dropout(self.norm(x_BLD))
