"""Mixture density decoder (component 9) and the Gaussian-mixture math.

Legend: B batch, P horizon, T targets, K mixture components, D d_model.
The decoder sees only the target node, the horizon position and the C->T output: the C->T
attention is the only path by which body information reaches it. It predicts the horizon as
changes from the window's last observed value, in units of the training split's h-step change
scale (a buffer), so its raw outputs stay O(1) whatever the target's level.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.dropout import Dropout

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class MixtureDensityDecoder(nn.Module):
    def __init__(self, d_model: int, pred_len: int, num_mixtures: int, ffn_multiplier: int,
                 sigma_min: float, dropout: float, change_scale_PT: torch.Tensor) -> None:
        super().__init__()
        self.num_mixtures = num_mixtures
        self.sigma_min = sigma_min
        self.horizon_position = nn.Parameter(torch.randn(pred_len, d_model) * 0.02)
        self.head = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, ffn_multiplier * d_model), nn.GELU(),
            Dropout(dropout), nn.Linear(ffn_multiplier * d_model, 3 * num_mixtures))
        self.register_buffer("change_scale_PT", change_scale_PT.clone())
        # Spread the initial means so the K components do not start identical.
        with torch.no_grad():
            self.head[-1].bias[num_mixtures:2 * num_mixtures] = torch.linspace(-1, 1, num_mixtures)

    def forward(self, target_BTD, c2t_BPTD, last_value_BT):
        hidden_BPTD = c2t_BPTD + target_BTD[:, None] + self.horizon_position[None, :, None]
        logits, mu_raw, sigma_raw = self.head(hidden_BPTD).float().split(self.num_mixtures, dim=-1)
        scale_1PT1 = self.change_scale_PT[None, :, :, None]
        log_pi_BPTK = torch.log_softmax(logits, dim=-1)
        mu_BPTK = last_value_BT.float()[:, None, :, None] + scale_1PT1 * mu_raw
        sigma_BPTK = scale_1PT1 * (F.softplus(sigma_raw) + self.sigma_min)
        return log_pi_BPTK, mu_BPTK, sigma_BPTK


def mixture_log_likelihood(log_pi, mu, sigma, y_BPT) -> torch.Tensor:
    """log p(y) under the mixture, per (B, P, T), by log-sum-exp over K."""
    z = (y_BPT.unsqueeze(-1) - mu) / sigma
    log_component = -0.5 * z * z - torch.log(sigma) - _LOG_SQRT_2PI
    return torch.logsumexp(log_pi + log_component, dim=-1)


def mixture_nll(log_pi, mu, sigma, y_BPT) -> torch.Tensor:
    """Mean negative log-likelihood over every (sample, horizon step, target)."""
    return -mixture_log_likelihood(log_pi, mu, sigma, y_BPT).mean()


def mixture_mean(log_pi, mu) -> torch.Tensor:
    """The point forecast: sum over K of pi * mu."""
    return (log_pi.exp() * mu).sum(-1)


def mixture_cdf(log_pi, mu, sigma, y_BPT) -> torch.Tensor:
    """P(Y <= y): y lies in the central q-interval exactly when |cdf - 0.5| <= q / 2."""
    component_cdf = 0.5 * torch.erfc(-(y_BPT.unsqueeze(-1) - mu) / (sigma * math.sqrt(2)))
    return (log_pi.exp() * component_cdf).sum(-1)


def _expected_abs_normal(m, s):
    """E|Z| for Z ~ N(m, s^2): m (2 Phi(m/s) - 1) + 2 s phi(m/s)."""
    u = m / s
    cdf = 0.5 * torch.erfc(-u / math.sqrt(2))
    pdf = torch.exp(-0.5 * u * u - _LOG_SQRT_2PI)
    return m * (2 * cdf - 1) + 2 * s * pdf


def mixture_crps(log_pi, mu, sigma, y_BPT) -> torch.Tensor:
    """Continuous ranked probability score of the mixture at y, per (B, P, T), in closed form:
    E|X - y| - E|X - X'| / 2 with X, X' independent draws (Grimit et al. 2006)."""
    pi = log_pi.exp()
    to_y = _expected_abs_normal(y_BPT.unsqueeze(-1) - mu, sigma)
    spread = _expected_abs_normal(mu.unsqueeze(-1) - mu.unsqueeze(-2),
                                  torch.sqrt(sigma.unsqueeze(-1) ** 2 + sigma.unsqueeze(-2) ** 2))
    pair_weight = pi.unsqueeze(-1) * pi.unsqueeze(-2)
    return (pi * to_y).sum(-1) - 0.5 * (pair_weight * spread).sum((-2, -1))


def mixture_quantiles(log_pi, mu, sigma, probs, iterations: int = 50) -> torch.Tensor:
    """Exact quantiles of the mixture (bisection on its CDF), shape (..., Q) for Q probs.

    The mixture CDF is monotone, so bisection between min(mu - 12 sigma) and max(mu + 12 sigma)
    (where the CDF is 0 and 1 to double precision) halves the error each iteration: 50 of them
    leave 24 sigma / 2^50, far below float32 resolution."""
    probs = torch.as_tensor(probs, dtype=torch.float64, device=mu.device)
    log_pi, mu, sigma = (x.double().unsqueeze(-2) for x in (log_pi, mu, sigma))   # (..., 1, K)
    shape = mu.shape[:-2] + probs.shape
    low = (mu - 12 * sigma).amin(-1).expand(shape).clone()
    high = (mu + 12 * sigma).amax(-1).expand(shape).clone()
    pi = log_pi.exp()
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        cdf = (pi * 0.5 * torch.erfc(-(mid.unsqueeze(-1) - mu) / (sigma * math.sqrt(2)))).sum(-1)
        below = cdf < probs
        low = torch.where(below, mid, low)
        high = torch.where(below, high, mid)
    return (0.5 * (low + high)).float()
