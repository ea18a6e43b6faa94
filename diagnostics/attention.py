"""Attention statistics over the global batch of a step, reduced across ranks.

- fusion: the pooled node context attending over the L temporal tokens (wave tokens first,
  then target tokens): mean weight per token, and the entropy of each sample's distribution
  per head, averaged over samples (nats; normalised by log L: 1 = uniform, 0 = one token).
- c2t: the C->T weights averaged over samples, horizon steps and heads: a (targets x bodies)
  map, its top-K bodies per target and its normalised entropy over bodies.
- graph: the combiner's mean gate weight per adjacency proposal.
Every sum is all-reduced before dividing by the global sample count: never rank 0's shard alone.
"""
from __future__ import annotations

import math
import time

import torch

from diagnostics.records import step_file, write_json
from model.graph import GatedGraphCombiner
from trainer import distributed
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.observer import Observer, RunContext, StepContext


def _entropy(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(dim)


def attention_sums(attention: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """One flat tensor of sums over this rank's samples (and its layout), ready to all-reduce:
    [count, token weights (L), head entropies (Hf), c2t map (T*N), gates (G)]."""
    count = sum(a["fusion"].shape[0] for a in attention)
    fusion = torch.cat([a["fusion"].float() for a in attention])            # (B, Hf, L)
    c2t = torch.cat([a["c2t"].float() for a in attention])                   # (B, P, T, H, N)
    gates = torch.cat([a["graph_gates"].float() for a in attention])        # (B, G)
    parts = [torch.tensor([float(count)], device=fusion.device), fusion.mean(1).sum(0),
             _entropy(fusion).sum(0), c2t.mean((1, 3)).sum(0).flatten(), gates.sum(0)]
    return torch.cat(parts), [p.numel() for p in parts]


def summarize(sums: torch.Tensor, layout: list[int], targets: list[str], bodies: list[str],
              top_k: int) -> dict:
    count, tokens, head_entropy, c2t, gates = (t.tolist() for t in sums.split(layout))
    n = count[0]
    tokens = [w / n for w in tokens]
    head_entropy = [e / n for e in head_entropy]
    log_tokens = math.log(len(tokens))
    c2t_map = torch.tensor(c2t).view(len(targets), len(bodies)) / n
    weights = {t: dict(zip(bodies, row)) for t, row in zip(targets, c2t_map.tolist())}
    top = {t: [{"body": b, "weight": w} for b, w in
               sorted(weights[t].items(), key=lambda kv: -kv[1])[:top_k]] for t in targets}
    c2t_entropy = {t: float(_entropy(c2t_map[i]) / math.log(len(bodies)))
                   for i, t in enumerate(targets)}
    entropy = sum(head_entropy) / len(head_entropy)
    return {"num_samples": int(n),
            "fusion": {"num_tokens": len(tokens), "num_heads": len(head_entropy),
                       "token_mean_weight": tokens, "entropy": entropy,
                       "normalized_entropy": entropy / log_tokens, "head_entropy": head_entropy,
                       "head_normalized_entropy": [e / log_tokens for e in head_entropy]},
            "c2t": {"targets": targets, "bodies": bodies, "weights": weights, "top_k": top,
                    "normalized_entropy": c2t_entropy},
            "graph": {"gate_weights": dict(zip(GatedGraphCombiner.proposal_names,
                                               (g / n for g in gates)))}}


class AttentionObserver(Observer):
    needs_attention = True
    communicates = True      # all-reduces the attention sums

    def __init__(self, config: DiagnosticsConfig) -> None:
        self.config = config
        self.interval = config.attention_log_interval

    def on_start(self, run: RunContext) -> None:
        self.run = run
        self.folder = run.log_dir / "attention"
        tokens = run.model.wave_patching_composer.num_tokens
        self.token_groups = {"wave": [0, tokens], "target": [tokens, 2 * tokens]}

    def is_active(self, step: int) -> bool:
        return step % self.interval == 0

    def after_step(self, ctx: StepContext) -> None:
        sums, layout = attention_sums(ctx.attention)
        distributed.all_reduce_sum(sums)
        if not self.run.is_main:
            return
        spec = self.run.spec
        summary = summarize(sums.cpu(), layout, spec.targets, spec.bodies, self.config.top_k)
        summary["fusion"]["token_groups"] = self.token_groups
        record = {"step": ctx.step, "epoch": ctx.epoch, "timestamp": time.time(),
                  "world_size": self.run.world_size, "reduced_over_ranks": True, **summary}
        write_json(step_file(self.folder, "attention", ctx.step), record)
        self.run.run_log.scalars("attention", ctx.step, {
            "fusion_entropy": summary["fusion"]["entropy"],
            "fusion_normalized_entropy": summary["fusion"]["normalized_entropy"],
            **{f"c2t_normalized_entropy/{t}": e
               for t, e in summary["c2t"]["normalized_entropy"].items()},
            **{f"gate/{g}": w for g, w in summary["graph"]["gate_weights"].items()}})
