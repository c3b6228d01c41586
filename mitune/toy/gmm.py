"""Gaussian-mixture "denoiser" whose conditional and unconditional eps are exact.

Class ``k`` (uniform prior) plays the prompt and ``z0 | k ~ N(mu_k, s^2 I)`` the latent, so
``I(Z0; K)`` is known (up to plain Monte Carlo) and any MI estimator built on eps can be
checked against it without a trained network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ClassEpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps_fn(z_t, t, class_ids)``: ``mitune.mi.estimators``'s EpsFn with class ids as the embedding."""

NULL_CLASS = -1
"""Embedding value that means "no prompt": eps_fn then returns the unconditional eps."""


@dataclass
class GaussianMixture:
    """Uniform mixture of isotropic Gaussians ``N(means[k], std^2 I)`` in ``d`` dimensions."""

    means: torch.Tensor  # [K, d]
    std: float

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of (z0 [n, d] float32, class labels [n] long)."""
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means.float()[labels] + self.std * noise, labels

    def _class_logits(self, z: torch.Tensor, alphabar: torch.Tensor) -> torch.Tensor:
        """log N(z; sqrt(abar) mu_k, (abar s^2 + 1 - abar) I) per class, up to a class-free constant.

        ``z`` is [B, d] float32 and ``alphabar`` [B, 1] (``1`` for clean data); the dropped
        ``-||z||^2 / 2var`` and normaliser cancel in posteriors and log-likelihood ratios.
        """
        means = self.means.to(z.device, torch.float32)
        var = alphabar * self.std**2 + 1.0 - alphabar
        cross = alphabar.sqrt() * (z @ means.T)
        return (cross - 0.5 * alphabar * means.pow(2).sum(1)) / var

    def eps_fn(self, alphas_cumprod: torch.Tensor) -> ClassEpsFn:
        """Exact ``E[eps | z_t, k]`` (or ``E[eps | z_t]`` where the class is ``NULL_CLASS``).

        Works on any latent shape ``[B, ...]`` and any float dtype: the maths runs in float32
        (bf16 posteriors would be too coarse to be ground truth) and the result is cast back.
        """
        alphas_cumprod = alphas_cumprod.float()

        def eps(z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            z = z_t.flatten(1).float()
            alphabar = alphas_cumprod.to(z.device)[t].unsqueeze(1)  # [B, 1]
            means = self.means.to(z.device, torch.float32)
            # Same as softmax(dim=1), but torch's CPU softmax over a tiny last dim is ~4x slower.
            posterior = self._class_logits(z, alphabar).T.softmax(dim=0).T
            uncond_mean = posterior @ means
            cond_mean = means[emb.clamp(min=0)]
            mean = torch.where((emb == NULL_CLASS).unsqueeze(1), uncond_mean, cond_mean)
            var = alphabar * self.std**2 + 1.0 - alphabar
            out = (1.0 - alphabar).sqrt() * (z - alphabar.sqrt() * mean) / var
            return out.view_as(z_t).to(z_t.dtype)

        return eps

    def _clean_logits(self, z0: torch.Tensor) -> torch.Tensor:
        return self._class_logits(z0.flatten(1).float(), torch.ones(z0.shape[0], 1, device=z0.device))

    def classify(self, z0: torch.Tensor) -> torch.Tensor:
        """Most probable class of clean latents: tells whether a sampler hit the right mode."""
        return self._clean_logits(z0).argmax(dim=1)

    def log_density_ratio(self, z0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Point-wise ``log p(z0 | k) - log p(z0)``; its mean over ``z0 ~ p(z0 | k)`` is I(Z0; K).

        The eps-gap estimators match it only on that average, not sample by sample.
        """
        log_lik = self._clean_logits(z0)
        log_marginal = log_lik.logsumexp(dim=1) - math.log(self.num_classes)
        return log_lik.gather(1, labels.view(-1, 1)).squeeze(1) - log_marginal

    def true_mi(self, n_samples: int, generator: torch.Generator | None = None) -> float:
        """Monte-Carlo ``I(Z0; K)`` in nats (at most log K, reached for well-separated means)."""
        z0, labels = self.sample(n_samples, generator)
        return self.log_density_ratio(z0, labels).mean().item()


@dataclass
class TwoFactorMixture:
    """Two independent uniform factors, ``z0 | a, b ~ N(mu_a[a] + mu_b[b], std^2 I)``: a prompt
    of two phrases whose conditional information ``I(Z0; B | A)`` is known.

    The embedding is ``[B, 2]`` (a, b), ``NULL_CLASS`` for a factor the "prompt" leaves out:
    ``(a, b)`` is the full prompt, ``(a, NULL)`` the prompt without phrase b, ``(NULL, NULL)``
    the null prompt.
    """

    mu_a: torch.Tensor  # [Ka, d]
    mu_b: torch.Tensor  # [Kb, d]
    std: float

    @property
    def joint(self) -> GaussianMixture:
        """The Ka * Kb pair classes, pair (a, b) at index a * Kb + b."""
        return GaussianMixture(means=(self.mu_a[:, None] + self.mu_b[None]).flatten(0, 1), std=self.std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of (z0 [n, d], factors [n, 2] long)."""
        z0, pair = self.joint.sample(n, generator)
        kb = self.mu_b.shape[0]
        return z0, torch.stack([pair // kb, pair % kb], dim=1)

    def _allowed(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, Ka * Kb] mask of the pairs consistent with the factors the embedding names."""
        ka, kb = self.mu_a.shape[0], self.mu_b.shape[0]
        a = torch.arange(ka, device=emb.device).repeat_interleave(kb)
        b = torch.arange(kb, device=emb.device).repeat(ka)
        ok_a = (emb[:, :1] == NULL_CLASS) | (emb[:, :1] == a)
        ok_b = (emb[:, 1:] == NULL_CLASS) | (emb[:, 1:] == b)
        return ok_a & ok_b

    def eps_fn(self, alphas_cumprod: torch.Tensor) -> ClassEpsFn:
        """Exact ``E[eps | z_t, named factors]``: the joint mixture's posterior restricted to the
        pairs the embedding allows."""
        joint, alphas_cumprod = self.joint, alphas_cumprod.float()

        def eps(z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            z = z_t.flatten(1).float()
            alphabar = alphas_cumprod.to(z.device)[t].unsqueeze(1)
            logits = joint._class_logits(z, alphabar).masked_fill(~self._allowed(emb), -math.inf)
            mean = logits.softmax(dim=1) @ joint.means.to(z.device, torch.float32)
            var = alphabar * self.std**2 + 1.0 - alphabar
            return ((1.0 - alphabar).sqrt() * (z - alphabar.sqrt() * mean) / var).view_as(z_t).to(z_t.dtype)

        return eps

    def true_conditional_mi(self, n_samples: int, generator: torch.Generator | None = None) -> float:
        """Monte-Carlo ``I(Z0; B | A) = E[log p(z0 | a, b) - log p(z0 | a)]`` in nats."""
        z0, factors = self.sample(n_samples, generator)
        log_lik = self.joint._clean_logits(z0).view(n_samples, *self.mu_a.shape[:1], self.mu_b.shape[0])
        own = log_lik[torch.arange(n_samples), factors[:, 0]]  # [n, Kb]: log p(z0 | a, b') for the true a
        log_given_a = own.logsumexp(dim=1) - math.log(self.mu_b.shape[0])
        return (own.gather(1, factors[:, 1:]).squeeze(1) - log_given_a).mean().item()
