"""The Celestial Enhanced PGAT: a probabilistic graph-attention forecaster.

Legend: B batch, S look-back, P horizon, F feature columns, N bodies, C columns per body
(padded with zeros to the largest body), T targets, K mixture components, D d_model.

Choices where MODEL.md is silent (written here, as it asks):
- Bodies may have different column counts: columns are gathered into (N, C) with zero padding
  (index F points at an appended zero column), so every per-body operation is one batched op.
- Target history enters the target node and target patches relative to the window's last value
  and in units of the 1-step change scale, so the network never sees absolute price levels.
- Body dropout (training only) blanks whole bodies per sample with probability `body_dropout`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import (
    CelestialToTargetAttention,
    FusionCrossAttention,
    HierarchicalFusionProjection,
)
from model.config import InputSpec, ModelConfig
from model.decoder import MixtureDensityDecoder, mixture_nll
from model.graph import CelestialNodeEncoder, GatedGraphCombiner, StochasticGraphLearner
from model.patching import MultiScalePatchEmbedding

COMPONENT_NAMES = (
    "wave_patching_composer", "target_patching_composer", "celestial_node_encoder",
    "stochastic_learner", "graph_combiner", "fusion_cross_attention",
    "hierarchical_fusion_proj", "celestial_to_target_attention", "decoder",
)


@dataclass
class ForecastOutput:
    """Mixture parameters, each (B, P, T, K), the auxiliary loss and, on request, attention."""

    log_pi: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    aux_loss: torch.Tensor
    attention: dict[str, torch.Tensor] | None = None

    def loss(self, future_target_BPT: torch.Tensor) -> torch.Tensor:
        return mixture_nll(self.log_pi, self.mu, self.sigma, future_target_BPT) + self.aux_loss


def body_column_index(body_columns: list[list[int]], num_features: int) -> torch.Tensor:
    """(N, C) indices into the zero-padded feature axis; padding points at index F (zeros)."""
    max_columns = max(len(cols) for cols in body_columns)
    return torch.tensor([cols + [num_features] * (max_columns - len(cols))
                         for cols in body_columns])


class CelestialPGAT(nn.Module):
    def __init__(self, config: ModelConfig, spec: InputSpec) -> None:
        super().__init__()
        self.config, self.spec = config, spec
        N, T, D = len(spec.bodies), len(spec.targets), config.d_model
        index_NC = body_column_index(spec.body_columns, spec.num_features)
        C = index_NC.shape[1]
        change_scale_PT = torch.tensor(spec.change_scale, dtype=torch.float32)
        self.register_buffer("body_index_NC", index_NC, persistent=False)
        self.register_buffer("step_scale_T", change_scale_PT[0].clone(), persistent=False)

        self.wave_patching_composer = MultiScalePatchEmbedding(
            spec.num_features, D, config.seq_len, config.patch_scales, config.dropout)
        self.target_patching_composer = MultiScalePatchEmbedding(
            T, D, config.seq_len, config.patch_scales, config.dropout)
        self.celestial_node_encoder = CelestialNodeEncoder(
            N, C, T, config.seq_len, D, config.num_time_summaries, config.dropout)
        self.stochastic_learner = StochasticGraphLearner(
            D, config.edge_prior, config.gumbel_temperature)
        self.graph_combiner = GatedGraphCombiner(
            N, D, config.num_heads, config.graph_rounds, config.ffn_multiplier, config.dropout)
        self.fusion_cross_attention = FusionCrossAttention(D, config.fusion_heads)
        self.hierarchical_fusion_proj = HierarchicalFusionProjection(D, config.dropout)
        self.celestial_to_target_attention = CelestialToTargetAttention(
            D, config.num_heads, N, C, config.pred_len, config.use_future_celestial)
        self.decoder = MixtureDensityDecoder(
            D, config.pred_len, config.num_mixtures, config.ffn_multiplier, config.sigma_min,
            config.dropout, change_scale_PT)

    def gather_bodies(self, x_BXF: torch.Tensor) -> torch.Tensor:
        """(B, X, F) -> (B, X, N, C): each body's own columns, zero-padded."""
        padded = torch.nn.functional.pad(x_BXF, (0, 1))
        return padded[..., self.body_index_NC]

    def forward(self, wave_BSF, target_BST, future_wave_BPF, return_attention: bool = False):
        wave_BSNC = self.gather_bodies(wave_BSF)
        future_BPNC = self.gather_bodies(future_wave_BPF)
        if self.training and self.config.body_dropout > 0:
            keep_BN = (torch.rand(wave_BSNC.shape[0], wave_BSNC.shape[2],
                                  device=wave_BSF.device) >= self.config.body_dropout)
            wave_BSNC = wave_BSNC * keep_BN[:, None, :, None]
            future_BPNC = future_BPNC * keep_BN[:, None, :, None]
            wave_BSF = wave_BSF * self._columns_kept(keep_BN)
        last_BT = target_BST[:, -1]
        relative_BST = (target_BST - last_BT[:, None]) / self.step_scale_T

        wave_tokens = self.wave_patching_composer(wave_BSF)
        target_tokens = self.target_patching_composer(relative_BST)
        own_BND, target_BTD = self.celestial_node_encoder(wave_BSNC, relative_BST)
        stochastic_BNN, kl = self.stochastic_learner(own_BND)
        message_BND, adjacency_BNN, gates_BG = self.graph_combiner(own_BND, stochastic_BNN)
        tokens_BLD = torch.cat([wave_tokens, target_tokens], dim=1)
        context_BD, attended_BD, fusion_BHL = self.fusion_cross_attention(message_BND, tokens_BLD)
        fused_BD = self.hierarchical_fusion_proj(context_BD, message_BND, attended_BD)
        c2t_BPTD, c2t_BPTHN = self.celestial_to_target_attention(
            target_BTD, fused_BD, message_BND, own_BND, future_BPNC, adjacency_BNN)
        log_pi, mu, sigma = self.decoder(target_BTD, c2t_BPTD, last_BT)

        attention = None
        if return_attention:
            attention = {"fusion": fusion_BHL.detach(), "c2t": c2t_BPTHN.detach(),
                         "graph_gates": gates_BG.detach(), "adjacency": adjacency_BNN.detach()}
        return ForecastOutput(log_pi, mu, sigma, self.config.kl_weight * kl, attention)

    def _columns_kept(self, keep_BN: torch.Tensor) -> torch.Tensor:
        """Per-sample (B, 1, F) mask of the flat feature columns of the bodies that were kept."""
        B, C = keep_BN.shape[0], self.body_index_NC.shape[1]
        # F + 1 columns: body_index_NC points a body's padding at the appended zero column,
        # index F (gather_bodies); it is dropped from the mask.
        kept_columns = torch.ones(B, self.spec.num_features + 1, device=keep_BN.device)
        kept_columns.scatter_(1, self.body_index_NC.flatten().expand(B, -1),
                              keep_BN.to(torch.float32).repeat_interleave(C, dim=1))
        return kept_columns[:, None, :-1]

    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters grouped by component; anything outside the nine goes to `other`."""
        groups: dict[str, list] = {name: [] for name in COMPONENT_NAMES}
        groups["other"] = []
        for name, param in self.named_parameters():
            top = name.split(".", 1)[0]
            groups[top if top in groups else "other"].append((name, param))
        return {name: params for name, params in groups.items() if params}
