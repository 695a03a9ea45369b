"""Guidance math (spec A.6, A.7) against hand-computed values and exact Bayes identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from anomalydiff.diffusion import (
    NoiseSchedule,
    ScheduleConfig,
    cfg_eps,
    classifier_guided_eps,
    classifier_guided_mean,
    classifier_log_prob_grad,
    ddpm_posterior,
    guidance_scale_from_w,
    guidance_w_from_scale,
    implicit_classifier_grad,
    make_schedule,
    predict_x0,
)
from anomalydiff.labels import HEALTHY, NULL_LABEL, UNHEALTHY

T = 50
F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}
SHAPE = (2, 1, 4, 4)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return make_schedule(ScheduleConfig(num_timesteps=T))


def hand_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] of the linear schedule at T = 50, computed with numpy, shaped [B, 1, 1, 1]."""
    table = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    return torch.from_numpy(table[t.numpy()]).reshape(-1, 1, 1, 1)


def rand(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------- CFG (A.6)


def test_cfg_eps_w0_is_the_conditional_eps_and_matches_hand_values() -> None:
    eps_cond, eps_null = rand(0), rand(1)
    assert torch.equal(cfg_eps(eps_cond, eps_null, 0.0), eps_cond)
    torch.testing.assert_close(cfg_eps(eps_cond, eps_null, 2.0), 3 * eps_cond - 2 * eps_null, **EXACT)
    # a per-sample w [B]
    per_sample = cfg_eps(eps_cond, eps_null, torch.tensor([0.0, 1.5], dtype=F64))
    assert torch.equal(per_sample[0], eps_cond[0])
    torch.testing.assert_close(per_sample[1], 2.5 * eps_cond[1] - 1.5 * eps_null[1], **EXACT)


def test_guidance_scale_conversion_matches_ho_salimans_form() -> None:
    assert guidance_scale_from_w(2.0) == 3.0  # P2's w = 2 is Sanchez's s = 3 (spec E.17)
    assert guidance_w_from_scale(3.0) == 2.0
    assert guidance_w_from_scale(guidance_scale_from_w(0.7)) == pytest.approx(0.7, abs=1e-15)
    eps_cond, eps_null = rand(2), rand(3)
    scale = guidance_scale_from_w(1.3)
    # Ho & Salimans: eps_null + s (eps_cond - eps_null)
    torch.testing.assert_close(cfg_eps(eps_cond, eps_null, 1.3), eps_null + scale * (eps_cond - eps_null), **EXACT)


def test_implicit_classifier_grad_hand_value_and_cfg_identity(schedule: NoiseSchedule) -> None:
    eps_cond, eps_null, t = rand(4), rand(5), torch.tensor([0, 37])
    grad = implicit_classifier_grad(schedule, eps_cond, eps_null, t)
    torch.testing.assert_close(grad, -(eps_cond - eps_null) / (1 - hand_alpha_bar(t)).sqrt(), **EXACT)
    # spec A.6: eps~ = eps_null - (1 + w) sqrt(1 - alpha_bar) grad log p^i(y | x_t)
    for w in (0.0, 2.0, 30.0):
        guided = classifier_guided_eps(schedule, eps_null, t, grad, classifier_scale=1 + w)
        torch.testing.assert_close(guided, cfg_eps(eps_cond, eps_null, w), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- classifier (A.7)


class LinearSoftmaxClassifier(nn.Module):
    """logits = W flatten(x) + b + c t: a noise-aware classifier whose gradient is known in closed form."""

    def __init__(self, num_features: int, num_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_classes, num_features, generator=generator, dtype=F64))
        self.bias = nn.Parameter(torch.randn(num_classes, generator=generator, dtype=F64))
        self.time_weight = nn.Parameter(torch.randn(num_classes, generator=generator, dtype=F64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias + t[:, None].to(x.dtype) * 0.01 * self.time_weight


def hand_log_prob_grad(
    classifier: LinearSoftmaxClassifier, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """d/dx log softmax(W x + b + c t)[y] = W_y - sum_k p_k W_k, with p = softmax(logits), written out by hand."""
    weight = classifier.weight.detach().numpy()
    bias = classifier.bias.detach().numpy()
    time_weight = classifier.time_weight.detach().numpy()
    x = xt.reshape(xt.shape[0], -1).numpy()
    logits = x @ weight.T + bias + t.numpy()[:, None] * 0.01 * time_weight
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = weight[y.numpy()] - p @ weight
    return torch.from_numpy(grad).reshape(xt.shape)


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_classifier_log_prob_grad_matches_hand_differentiated_linear_softmax(context: str) -> None:
    classifier = LinearSoftmaxClassifier(num_features=16)
    xt, t, y = rand(6), torch.tensor([3, 41]), torch.tensor([HEALTHY, UNHEALTHY])
    if context == "no_grad":
        with torch.no_grad():
            grad = classifier_log_prob_grad(classifier, xt, t, y)
    elif context == "inference_mode":
        with torch.inference_mode():
            grad = classifier_log_prob_grad(classifier, rand(6), t, y)
    else:
        grad = classifier_log_prob_grad(classifier, xt, t, y)
    torch.testing.assert_close(grad, hand_log_prob_grad(classifier, xt, t, y), **EXACT)
    assert not grad.requires_grad and grad.dtype == F64 and grad.shape == xt.shape
    assert all(p.grad is None for p in classifier.parameters())  # nothing accumulated on the classifier


def test_classifier_log_prob_grad_batch_equals_single_samples_and_does_not_touch_input() -> None:
    classifier = LinearSoftmaxClassifier(num_features=16, seed=1)
    xt, t, y = rand(7), torch.tensor([0, 49]), torch.tensor([HEALTHY, HEALTHY])
    before = xt.clone()
    batched = classifier_log_prob_grad(classifier, xt, t, y)
    for i in range(2):
        single = classifier_log_prob_grad(classifier, xt[i : i + 1], t[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, **EXACT)
    assert torch.equal(xt, before) and not xt.requires_grad
    # the class probabilities sum to 1, so sum_k p_k grad log p_k = grad sum_k p_k = 0
    other = classifier_log_prob_grad(classifier, xt, t, torch.tensor([UNHEALTHY, UNHEALTHY]))
    p = torch.softmax(classifier(xt, t).detach(), dim=1).reshape(2, 2, 1, 1, 1)
    torch.testing.assert_close(p[:, 0] * batched + p[:, 1] * other, torch.zeros_like(xt), **EXACT)
    assert not torch.allclose(other, torch.zeros_like(other))


def test_classifier_log_prob_grad_rejects_null_label_and_bad_logits() -> None:
    classifier = LinearSoftmaxClassifier(num_features=16)
    xt, t = rand(8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="NULL_LABEL"):
        classifier_log_prob_grad(classifier, xt, t, torch.tensor([HEALTHY, NULL_LABEL]))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        classifier_log_prob_grad(lambda x, t: x.flatten(), xt, t, torch.tensor([0, 0]))


def test_bayes_classifier_gradient_equals_implicit_classifier_gradient(schedule: NoiseSchedule) -> None:
    # data: x0 = mu_y exactly, prior pi_y. Then eps_y = (x_t - sqrt(ab) mu_y) / sqrt(1 - ab) is exact, the
    # unconditional eps is the posterior mixture sum_y p(y | x_t) eps_y, and p(y | x_t) is the Bayes classifier.
    mu = torch.stack([0.5 * torch.tanh(rand(9, SHAPE[1:])), -0.3 * torch.ones(SHAPE[1:], dtype=F64)])
    log_prior = torch.log(torch.tensor([0.7, 0.3], dtype=F64))
    t = torch.tensor([4, 30])
    ab = hand_alpha_bar(t)

    def bayes_logits(x: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        a = hand_alpha_bar(t_)
        sq_dist = torch.stack([((x - a.sqrt() * mu[k]) ** 2).flatten(1).sum(1) for k in range(2)], dim=1)
        return log_prior - sq_dist / (2 * (1 - a.flatten()[:, None]))

    xt = rand(10)
    eps_by_class = [(xt - ab.sqrt() * mu[k]) / (1 - ab).sqrt() for k in range(2)]
    posterior = torch.softmax(bayes_logits(xt, t), dim=1)
    eps_null = sum(posterior[:, k].reshape(-1, 1, 1, 1) * eps_by_class[k] for k in range(2))
    for y in (HEALTHY, UNHEALTHY):
        labels = torch.full((2,), y)
        autograd_grad = classifier_log_prob_grad(bayes_logits, xt, t, labels)
        implicit = implicit_classifier_grad(schedule, eps_by_class[y], eps_null, t)
        torch.testing.assert_close(autograd_grad, implicit, rtol=1e-10, atol=1e-10)
        # classifier guidance with s = 1 turns the unconditional eps into the conditional one
        guided = classifier_guided_eps(schedule, eps_null, t, autograd_grad, classifier_scale=1.0)
        torch.testing.assert_close(guided, eps_by_class[y], rtol=1e-10, atol=1e-10)


def test_classifier_guided_eps_hand_value_and_unclipped_x0_shift(schedule: NoiseSchedule) -> None:
    eps, grad, t = rand(11), rand(12), torch.tensor([10, 45])
    ab = hand_alpha_bar(t)
    guided = classifier_guided_eps(schedule, eps, t, grad, classifier_scale=100.0)
    torch.testing.assert_close(guided, eps - 100.0 * (1 - ab).sqrt() * grad, **EXACT)
    assert torch.equal(classifier_guided_eps(schedule, eps, t, grad, classifier_scale=0.0), eps)
    # spec A.7 / C.3: x0 from the guided eps (not clipped again) moves by s * B_t * grad, B_t = (1 - ab) / sqrt(ab)
    xt = rand(13)
    x0_plain, _ = predict_x0(schedule, xt, t, eps, clip=False)
    x0_guided, eps_out = predict_x0(schedule, xt, t, guided, clip=False)
    assert eps_out is guided
    torch.testing.assert_close(x0_guided - x0_plain, 100.0 * (1 - ab) / ab.sqrt() * grad, rtol=1e-10, atol=1e-10)
    # per-sample scale [B]
    per_sample = classifier_guided_eps(schedule, eps, t, grad, classifier_scale=torch.tensor([0.0, 2.0]))
    assert torch.equal(per_sample[0], eps[0])
    torch.testing.assert_close(per_sample[1:], eps[1:] - 2.0 * (1 - ab[1:]).sqrt() * grad[1:], **EXACT)


def test_classifier_guided_mean_hand_value_with_ddpm_variance(schedule: NoiseSchedule) -> None:
    xt, x0_hat, grad, t = rand(14), 0.5 * torch.tanh(rand(15)), rand(16), torch.tensor([0, 25])
    mean, variance = ddpm_posterior(schedule, xt, t, x0_hat)
    guided = classifier_guided_mean(mean, variance, grad, classifier_scale=1000.0)
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    hand_variance = torch.tensor([betas[1] * (1 - ab[0]) / (1 - ab[1]), betas[25]], dtype=F64).reshape(2, 1, 1, 1)
    torch.testing.assert_close(guided, mean + 1000.0 * hand_variance * grad, **EXACT)
    assert torch.equal(classifier_guided_mean(mean, variance, grad, classifier_scale=0.0), mean)
