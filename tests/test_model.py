"""The network: shapes, gradients to every parameter, the mixture NLL, numerical safety."""
from __future__ import annotations

import pytest
import torch
from torch import distributions as D

from model import COMPONENT_NAMES, CelestialPGAT, InputSpec, ModelConfig
from model.decoder import mixture_cdf, mixture_nll

B, S, P, T = 3, 48, 12, 4


def make_spec(num_bodies: int = 13, uneven: bool = True) -> InputSpec:
    columns, start = [], 0
    for n in range(num_bodies):
        width = 3 + (n % 3 if uneven else 0)      # bodies with different column counts
        columns.append(list(range(start, start + width)))
        start += width
    return InputSpec(bodies=[f"Body{n}" for n in range(num_bodies)],
                     targets=[f"T{t}" for t in range(T)],
                     feature_names=[f"f{i}" for i in range(start)], body_columns=columns,
                     change_scale=[[0.05 * (p + 1) ** 0.5] * T for p in range(P)])


def make_model(**overrides) -> CelestialPGAT:
    config = ModelConfig(seq_len=S, pred_len=P, d_model=32, num_heads=4, fusion_heads=2,
                         num_mixtures=3, num_time_summaries=4,
                         patch_scales=[[4, 2], [8, 4], [12, 6]],
                         **overrides)
    return CelestialPGAT(config, make_spec())


def inputs(model: CelestialPGAT, batch: int = B):
    F = model.spec.num_features
    return (torch.randn(batch, S, F), torch.randn(batch, S, T) * 0.1, torch.randn(batch, P, F),
            torch.randn(batch, P, T) * 0.1)


def test_output_shapes_dtypes_and_constraints():
    model = make_model()
    wave, target, future, _ = inputs(model)
    out = model(wave, target, future)
    for name in ("log_pi", "mu", "sigma"):
        tensor = getattr(out, name)
        assert tensor.shape == (B, P, T, 3) and tensor.dtype == torch.float32
    assert torch.allclose(out.log_pi.exp().sum(-1), torch.ones(B, P, T), atol=1e-5)
    floor = model.decoder.change_scale_PT[None, :, :, None] * model.config.sigma_min
    assert (out.sigma >= floor * (1 - 1e-6)).all()
    assert out.attention is None and out.aux_loss.ndim == 0


def test_attention_only_on_request_and_shapes():
    model = make_model()
    wave, target, future, _ = inputs(model)
    att = model(wave, target, future, return_attention=True).attention
    tokens = sum(model.config.num_tokens_per_scale())
    assert att["fusion"].shape == (B, 2, 2 * tokens)
    assert att["c2t"].shape == (B, P, T, 4, 13)
    assert att["graph_gates"].shape == (B, 3)
    assert all(not t.requires_grad for t in att.values())
    assert torch.allclose(att["c2t"].sum(-1), torch.ones(B, P, T, 4), atol=1e-5)


def test_default_production_tokens():
    assert sum(ModelConfig().num_tokens_per_scale()) == 85   # 47 + 23 + 15, x2 = ~170 tokens


@pytest.mark.parametrize("train_mode", [True, False])
def test_every_parameter_gets_a_gradient(train_mode):
    model = make_model(body_dropout=0.2)
    model.train(train_mode)
    wave, target, future, y = inputs(model)
    model(wave, target, future).loss(y).backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_components_are_the_nine_of_the_design():
    groups = make_model().component_parameters()
    assert list(groups) == list(COMPONENT_NAMES)   # nothing left over in "other"


def test_mixture_nll_matches_torch_distributions():
    torch.manual_seed(1)
    logits = torch.randn(5, 7, 4, 3)
    mu, sigma = torch.randn(5, 7, 4, 3), torch.rand(5, 7, 4, 3) + 0.05
    y = torch.randn(5, 7, 4)
    reference = D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(mu, sigma))
    expected = -reference.log_prob(y).mean()
    ours = mixture_nll(torch.log_softmax(logits, -1), mu, sigma, y)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(mixture_cdf(torch.log_softmax(logits, -1), mu, sigma, y),
                          reference.cdf(y), atol=1e-5)


def test_no_nan_for_extreme_finite_inputs():
    model = make_model()
    wave, target, future, y = inputs(model)
    out = model(wave * 1e4, target * 1e4, future * 1e4)
    loss = out.loss(y * 1e4)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_predictions_are_relative_to_the_last_value():
    """Shifting the whole target history shifts the forecast means by the same amount."""
    model = make_model().eval()
    wave, target, future, _ = inputs(model)
    a = model(wave, target, future)
    b = model(wave, target + 3.0, future)
    assert torch.allclose(b.mu - a.mu, torch.full_like(a.mu, 3.0), atol=1e-4)
    assert torch.allclose(a.sigma, b.sigma, atol=1e-5)


def test_future_celestial_flag_removes_its_parameters():
    with_future = sum(p.numel() for p in make_model().parameters())
    without = make_model(use_future_celestial=False)
    wave, target, future, y = inputs(without)
    without(wave, target, future).loss(y).backward()
    assert sum(p.numel() for p in without.parameters()) < with_future
    assert all(p.grad is not None for p in without.parameters())


def test_eval_mode_is_deterministic():
    model = make_model().eval()
    wave, target, future, _ = inputs(model)
    assert torch.equal(model(wave, target, future).mu, model(wave, target, future).mu)
