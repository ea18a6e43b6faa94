"""The `diagnostics:` section; the reference card's flags set the same keys."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiagnosticsConfig:
    enable_gradient_diagnostics: bool = False
    enable_attention_logging: bool = False
    enable_component_profiling: bool = False
    gradient_log_interval: int = 50
    attention_log_interval: int = 100
    profile_interval: int = 0           # 0: every checkpoint.interval steps, as the card says
    vanishing_threshold: float = 1e-5
    exploding_threshold: float = 100.0
    top_k: int = 5
    noise_scale_smoothing: float = 0.9  # EMA factor of the noise-scale estimates
    attribution_at_validation: bool = True  # occlusion at each validation (with attention logging)
    attribution_max_samples: int = 1024
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("gradient_log_interval", "attention_log_interval", "top_k",
                     "attribution_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"diagnostics.{name} must be >= 1, got {getattr(self, name)}")
        if self.profile_interval < 0:
            raise ValueError("diagnostics.profile_interval must be >= 0, "
                             f"got {self.profile_interval}")
        if not 0 < self.vanishing_threshold < self.exploding_threshold:
            raise ValueError("diagnostics.vanishing_threshold must be > 0 and below "
                             "diagnostics.exploding_threshold")
        if not 0 <= self.noise_scale_smoothing < 1:
            raise ValueError("diagnostics.noise_scale_smoothing must lie in [0, 1)")
