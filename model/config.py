"""Configuration of the network and the description of its inputs.

`ModelConfig` is the `model:` section of a run's config. `InputSpec` is derived from the data
(which columns belong to which body, the target names, the scale of h-step changes) and is
saved beside the weights, so a checkpoint is self-describing.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    seq_len: int = 96                 # S, look-back window
    pred_len: int = 24                # P, horizon
    d_model: int = 416                # D
    num_heads: int = 8                # H of graph attention and C->T attention
    fusion_heads: int = 4             # heads of the fusion cross-attention
    num_mixtures: int = 5             # K
    patch_scales: list[list[int]] = field(default_factory=lambda: [[4, 2], [8, 4], [12, 6]])
    num_time_summaries: int = 16      # learned pools over time in the node encoder
    graph_rounds: int = 2             # message-passing rounds in the graph combiner
    ffn_multiplier: int = 2
    dropout: float = 0.1
    body_dropout: float = 0.0         # probability of blanking a whole body per sample (train only)
    kl_weight: float = 1e-3           # weight of the stochastic learner's KL term
    edge_prior: float = 0.3           # Bernoulli prior of an edge
    gumbel_temperature: float = 0.5
    sigma_min: float = 1e-3           # floor of the mixture scales, in units of the change scale
    use_future_celestial: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "pred_len", "d_model", "num_heads", "fusion_heads",
                     "num_mixtures", "num_time_summaries", "graph_rounds", "ffn_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_heads", "fusion_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                                 f"model.{name} ({getattr(self, name)})")
        if not self.patch_scales:
            raise ValueError("model.patch_scales must list at least one [patch_len, stride]")
        for scale in self.patch_scales:
            if len(scale) != 2 or min(scale) < 1:
                raise ValueError(f"model.patch_scales entries are [patch_len, stride] >= 1, "
                                 f"got {scale}")
        largest_patch = max(patch_len for patch_len, _ in self.patch_scales)
        if self.seq_len < largest_patch:
            raise ValueError(f"model.seq_len ({self.seq_len}) is shorter than the largest patch "
                             f"in model.patch_scales ({largest_patch})")
        for name in ("dropout", "body_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.edge_prior < 1.0:
            raise ValueError(f"model.edge_prior must lie in (0, 1), got {self.edge_prior}")
        for name in ("gumbel_temperature", "sigma_min"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"model.kl_weight must be >= 0, got {self.kl_weight}")

    def num_tokens_per_scale(self) -> list[int]:
        return [(self.seq_len - patch_len) // stride + 1 for patch_len, stride in self.patch_scales]


@dataclass
class InputSpec:
    """What the data looks like to the model (derived from the dataset schema, never hard-coded).

    body_columns[n] lists the indices (into the feature axis F) of body n's columns.
    change_scale[p][t] is the standard deviation of the (p+1)-step change of scaled target t on
    the training split: the model predicts changes in these units.
    """

    bodies: list[str]
    targets: list[str]
    feature_names: list[str]
    body_columns: list[list[int]]
    change_scale: list[list[float]]

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def to_dict(self) -> dict:
        return {"bodies": self.bodies, "targets": self.targets,
                "feature_names": self.feature_names, "body_columns": self.body_columns,
                "change_scale": self.change_scale}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(**d)
