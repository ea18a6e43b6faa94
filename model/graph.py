"""Node encoder, stochastic graph learner and gated graph combiner (components 3, 4, 5).

Legend: B batch, S look-back, N bodies, C columns per body (padded), T targets, M time
summaries, D d_model, H heads.

Precision: under bf16 autocast the edge logits, the adjacency proposals, their gates and the
KL term are computed in fp32 (`.float()`, free in fp32 training): they are log-space and
probability arithmetic (log-sigmoids, logistic noise, log(adjacency)), where bf16's 8 bits lose
the small edge weights and the KL's cancellations. The node states and message passing run in
bf16 like any other activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.dropout import Dropout


class CelestialNodeEncoder(nn.Module):
    """Each body's own columns over the window -> one node state; each target's history -> one.

    Time is summarised by M learned linear pools over the S steps, shared by all bodies and
    columns (the temporal encoder); the C*M summary of a body is then projected with that body's
    own weights, all bodies at once (one einsum, no loop). Columns padded to C are zero.
    """

    def __init__(self, num_bodies: int, max_columns: int, num_targets: int, seq_len: int,
                 d_model: int, num_summaries: int, dropout: float) -> None:
        super().__init__()
        self.body_time_pool = nn.Linear(seq_len, num_summaries)
        self.target_time_pool = nn.Linear(seq_len, num_summaries)
        fan_in = max_columns * num_summaries
        self.body_weight = nn.Parameter(
            torch.randn(num_bodies, fan_in, d_model) / math.sqrt(fan_in))
        self.body_bias = nn.Parameter(torch.zeros(num_bodies, d_model))
        self.target_weight = nn.Parameter(
            torch.randn(num_targets, num_summaries, d_model) / math.sqrt(num_summaries))
        self.target_bias = nn.Parameter(torch.zeros(num_targets, d_model))
        self.body_norm = nn.LayerNorm(d_model)
        self.target_norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, wave_BSNC: torch.Tensor, target_BST: torch.Tensor):
        summary_BNCM = F.gelu(self.body_time_pool(wave_BSNC.permute(0, 2, 3, 1)))
        body_BND = torch.einsum("bnk,nkd->bnd", summary_BNCM.flatten(2), self.body_weight)
        body_BND = self.body_norm(body_BND + self.body_bias)
        summary_BTM = F.gelu(self.target_time_pool(target_BST.transpose(1, 2)))
        target_BTD = torch.einsum("btm,tmd->btd", summary_BTM, self.target_weight)
        target_BTD = self.target_norm(target_BTD + self.target_bias)
        return self.dropout(body_BND), self.dropout(target_BTD)


class StochasticGraphLearner(nn.Module):
    """Edge logits between bodies; relaxed-Bernoulli adjacency when training, its mean otherwise.

    Returns the adjacency (B, N, N) and the KL divergence of the edge posteriors from a
    Bernoulli(edge_prior) prior, averaged over edges and batch.
    """

    def __init__(self, d_model: int, edge_prior: float, temperature: float) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.temperature = temperature
        self.log_prior = math.log(edge_prior)
        self.log_not_prior = math.log1p(-edge_prior)

    def forward(self, nodes_BND: torch.Tensor):
        scale = 1.0 / math.sqrt(nodes_BND.shape[-1])
        logits_BNN = (self.query(nodes_BND) @ self.key(nodes_BND).transpose(1, 2)).float() * scale
        if self.training:
            uniform = torch.rand_like(logits_BNN).clamp(1e-6, 1 - 1e-6)
            logistic_noise = torch.log(uniform) - torch.log1p(-uniform)
            adjacency_BNN = torch.sigmoid((logits_BNN + logistic_noise) / self.temperature)
        else:
            adjacency_BNN = torch.sigmoid(logits_BNN)
        log_p, log_not_p = F.logsigmoid(logits_BNN), F.logsigmoid(-logits_BNN)
        p = log_p.exp()
        kl = p * (log_p - self.log_prior) + (1 - p) * (log_not_p - self.log_not_prior)
        return adjacency_BNN, kl.mean()


class GraphAttentionLayer(nn.Module):
    """Pre-norm multi-head attention among nodes with an additive adjacency bias, then an FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_multiplier: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_multiplier * d_model), nn.GELU(),
                                 nn.Linear(ffn_multiplier * d_model, d_model))
        self.dropout = Dropout(dropout)

    def forward(self, nodes_BND: torch.Tensor, bias_B1NN: torch.Tensor) -> torch.Tensor:
        B, N, D = nodes_BND.shape
        qkv = self.qkv(self.attn_norm(nodes_BND)).view(B, N, 3, self.num_heads, D // self.num_heads)
        q_BHNE, k_BHNE, v_BHNE = qkv.permute(2, 0, 3, 1, 4)
        mixed_BHNE = F.scaled_dot_product_attention(q_BHNE, k_BHNE, v_BHNE, attn_mask=bias_B1NN)
        nodes_BND = nodes_BND + self.dropout(self.out(mixed_BHNE.transpose(1, 2).reshape(B, N, D)))
        return nodes_BND + self.dropout(self.ffn(self.ffn_norm(nodes_BND)))


class GatedGraphCombiner(nn.Module):
    """Mixes three adjacency proposals with per-sample softmax gates, then message passing.

    Proposals: dynamic (softmax similarity of node states), adaptive (a learned N x N matrix),
    stochastic (the learner's sample, row-normalised). The combined adjacency enters graph
    attention as log-weights. Returns updated nodes, the combined adjacency and the gates (B, 3).
    """

    proposal_names = ("dynamic", "adaptive", "stochastic")

    def __init__(self, num_bodies: int, d_model: int, num_heads: int, num_rounds: int,
                 ffn_multiplier: int, dropout: float, adaptive_rank: int = 16) -> None:
        super().__init__()
        self.similarity_query = nn.Linear(d_model, d_model)
        self.similarity_key = nn.Linear(d_model, d_model)
        self.adaptive_source = nn.Parameter(torch.randn(num_bodies, adaptive_rank) * 0.1)
        self.adaptive_target = nn.Parameter(torch.randn(num_bodies, adaptive_rank) * 0.1)
        self.gate = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(),
                                  nn.Linear(d_model, len(self.proposal_names)))
        self.layers = nn.ModuleList(GraphAttentionLayer(d_model, num_heads, ffn_multiplier, dropout)
                                    for _ in range(num_rounds))

    def forward(self, nodes_BND: torch.Tensor, stochastic_BNN: torch.Tensor):
        scale = 1.0 / math.sqrt(nodes_BND.shape[-1])
        keys_BDN = self.similarity_key(nodes_BND).transpose(1, 2)
        similarity_BNN = self.similarity_query(nodes_BND) @ keys_BDN
        dynamic_BNN = torch.softmax(similarity_BNN.float() * scale, dim=-1)
        adaptive_scores_NN = F.relu(self.adaptive_source @ self.adaptive_target.T)
        adaptive_NN = torch.softmax(adaptive_scores_NN.float(), dim=-1)
        stochastic_BNN = stochastic_BNN / stochastic_BNN.sum(-1, keepdim=True).clamp_min(1e-6)
        proposals_BPNN = torch.stack(
            [dynamic_BNN, adaptive_NN.expand_as(dynamic_BNN), stochastic_BNN], 1)
        gates_BP = torch.softmax(self.gate(nodes_BND.mean(1)).float(), dim=-1)
        adjacency_BNN = (gates_BP[:, :, None, None] * proposals_BPNN).sum(1)   # fp32: no matmul
        bias_B1NN = torch.log(adjacency_BNN + 1e-6).unsqueeze(1).to(nodes_BND.dtype)
        for layer in self.layers:
            nodes_BND = layer(nodes_BND, bias_B1NN)
        return nodes_BND, adjacency_BNN, gates_BP
