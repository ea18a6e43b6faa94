"""Fusion cross-attention, hierarchical fusion projection and C->T attention (components 6-8).

Legend: B batch, L temporal tokens (~170), N bodies, C columns per body (padded), T targets,
P horizon steps, D d_model, H heads, E head width (D / H).

Precision: under bf16 autocast the matrix products run in bf16, but every softmax here takes its
scores in fp32 (`.float()`, free in fp32 training). On CUDA autocast does that by itself; on CPU
it does not, and these weights are what the diagnostics report and the C->T attribution ranks:
rounded to bf16's 8 bits they would differ from a GPU run's by up to 0.4%.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.dropout import Dropout


class FusionCrossAttention(nn.Module):
    """An attention-pooled node context queries the temporal tokens.

    Returns the pooled context (B, D), the attended tokens (B, D) and the fusion weights
    (B, H, L), which are the "fusion attention" the diagnostics log.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pool_query = nn.Parameter(torch.randn(d_model) * 0.02)
        self.pool_key = nn.Linear(d_model, d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, nodes_BND: torch.Tensor, tokens_BLD: torch.Tensor):
        B, L, D = tokens_BLD.shape
        H, E = self.num_heads, D // self.num_heads
        pool_scores_BN = (self.pool_key(nodes_BND) @ self.pool_query).float() / math.sqrt(D)
        pool_BN = torch.softmax(pool_scores_BN, dim=-1)
        context_BD = torch.einsum("bn,bnd->bd", pool_BN, nodes_BND)
        q_BHE = self.query(context_BD).view(B, H, E)
        k_BLHE, v_BLHE = self.key_value(tokens_BLD).view(B, L, 2, H, E).unbind(2)
        scores_BHL = torch.einsum("bhe,blhe->bhl", q_BHE, k_BLHE).float() / math.sqrt(E)
        weights_BHL = torch.softmax(scores_BHL, -1)
        attended_BD = self.out(torch.einsum("bhl,blhe->bhe", weights_BHL, v_BLHE).reshape(B, D))
        return context_BD, attended_BD, weights_BHL


class HierarchicalFusionProjection(nn.Module):
    """Linear(4D -> D) over [context, node mean, node std, attended tokens]."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(4 * d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, context_BD, nodes_BND, attended_BD) -> torch.Tensor:
        stacked = torch.cat([context_BD, nodes_BND.mean(1), nodes_BND.std(1), attended_BD], dim=-1)
        return self.dropout(self.norm(nn.functional.gelu(self.proj(stacked))))


class CelestialToTargetAttention(nn.Module):
    """For every (horizon step, target): a query attends over the N bodies.

    Query: target node + fused context + horizon position. Keys: message-passed node states plus
    each body's own horizon features. Values: each body's OWN encoding (before message passing)
    plus its own horizon features, so the weights say which body's information is used. An
    additive bias from the combined adjacency (log of how much the other bodies point at a body,
    scaled per head) enters the scores. Weights: (B, P, T, H, N).
    """

    def __init__(self, d_model: int, num_heads: int, num_bodies: int, max_columns: int,
                 pred_len: int, use_future: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.horizon_position = nn.Parameter(torch.randn(pred_len, d_model) * 0.02)
        self.query_norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.edge_bias_scale = nn.Parameter(torch.zeros(num_heads))
        self.use_future = use_future
        if use_future:
            init = 1.0 / math.sqrt(max_columns)
            self.future_key = nn.Parameter(torch.randn(num_bodies, max_columns, d_model) * init)
            self.future_value = nn.Parameter(torch.randn(num_bodies, max_columns, d_model) * init)

    def forward(self, target_BTD, fused_BD, message_BND, own_BND, future_BPNC, adjacency_BNN):
        B, T, D = target_BTD.shape
        P, N, H = self.horizon_position.shape[0], own_BND.shape[1], self.num_heads
        E = D // H
        query_in = (target_BTD[:, None] + fused_BD[:, None, None]
                    + self.horizon_position[None, :, None])
        q_BPTHE = self.query(self.query_norm(query_in)).view(B, P, T, H, E)
        k_BPND = self.key(message_BND)[:, None].expand(B, P, N, D)
        v_BPND = self.value(own_BND)[:, None].expand(B, P, N, D)
        if self.use_future:
            k_BPND = k_BPND + torch.einsum("bpnc,ncd->bpnd", future_BPNC, self.future_key)
            v_BPND = v_BPND + torch.einsum("bpnc,ncd->bpnd", future_BPNC, self.future_value)
        scores_BPTHN = torch.einsum("bpthe,bpnhe->bpthn", q_BPTHE,
                                    k_BPND.reshape(B, P, N, H, E)).float() / math.sqrt(E)
        in_degree_BN = torch.log(adjacency_BNN.mean(1) * N + 1e-6)
        scores_BPTHN = scores_BPTHN + (self.edge_bias_scale[:, None]
                                       * in_degree_BN[:, None, None, None])
        weights_BPTHN = torch.softmax(scores_BPTHN, dim=-1)
        v_BPNHE = v_BPND.reshape(B, P, N, H, E)
        mixed_BPTHE = torch.einsum("bpthn,bpnhe->bpthe", weights_BPTHN, v_BPNHE)
        return self.out(mixed_BPTHE.reshape(B, P, T, D)), weights_BPTHN
