"""The training objectives of the paper's Table 1 (docs/algorithm.md), one shape for all.

An objective is one method's part of a training step: it samples or encodes, forms the losses
and backpropagates them, each inside its profiling phase ("sample", "reward",
"teacher_forced", "weights", "losses"), and returns its metrics as 0-d tensors (``loss``
first; never read back to the host). :class:`dvae.train_step.TrainStep` owns what every
method shares: the optimisers, the non-finite skip, adaptive clipping, the learning-rate
schedule ("optimizer" phase).

======================  =====================================================================
method                  objective
======================  =====================================================================
daps, daps_na           :class:`DAPSObjective` (:func:`dvae.daps.daps_losses`), on the
                        autoregressive or the factorised encoder
gumbel, gumbel_na,      :class:`RelaxedObjective`: ``−mean(log p(x|z) − β·KL(q‖uniform))``
grmck, grmck_na         through a straight-through (Gumbel) or Gumbel-Rao (GR-MCK) sample
vq, fsq                 :class:`QuantisedObjective`: ``−mean(log p(x|z)/#pixels)`` (+ VQ's
                        codebook and commitment terms)
======================  =====================================================================
"""

from __future__ import annotations

import math

import torch

import dvae_kernels

from . import daps
from .config import CATEGORICAL


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 (a float64 model's values stay float64)."""
    return t if t.dtype == torch.float64 else t.float()


def anneal(step: int, total: int, start: float, end: float) -> float:
    """The reference's ``auto_exp_decay`` from ``start`` to ``end`` over ``total`` steps
    (β and the Gumbel temperature)."""
    return daps.beta_at(step, total, start, end)


class Objective:
    """Base: ``objective(x, step) -> metrics`` after backpropagating the loss.

    Args:
        step: the :class:`dvae.train_step.TrainStep` that runs it (its model, config,
            phases, precision contexts and random stream).
    """

    #: the method has a categorical q, hence a KL to the uniform prior and a β-ELBO
    has_elbo = True

    def __init__(self, step):
        self.step = step
        self.cfg = step.cfg
        self.raw = step.raw

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_update(self, found_inf: torch.Tensor) -> None:
        """Called after the optimisers stepped (or skipped: ``found_inf`` is 1)."""

    def beta(self, step: int) -> float:
        return anneal(step, self.cfg.steps, self.cfg.beta_start, self.cfg.beta_end)

    def _phase_kw(self) -> dict:
        # a compiled forward gets no phases: NVTX calls inside it would break the graph
        return {"phases": None if self.step.compiled else self.step.phases}


class DAPSObjective(Objective):
    """DAPS and DAPS-NA (docs/algorithm.md): K samples per image without gradient, their rewards
    and teacher-forced log q, the trust-region weights, weighted maximum likelihood."""

    def __init__(self, step):
        super().__init__(step)
        self._eta: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.cfg.encoder_samples is not None:
            return self._resampled(x, step)
        st, cfg, raw, ph = self.step, self.cfg, self.raw, self.step.phases
        K = cfg.num_samples
        beta = self.beta(step)
        with ph("sample"):
            tokens, _ = st.sample(x)
        # the decoder's loss on K' of the K samples (Config.decoder_samples): which ones,
        # drawn for the whole batch (batch statistics are per sample index)
        kt = cfg.decoder_samples
        order = (torch.randperm(K, generator=st.generator, device=x.device)
                 if kt is not None and kt < K else None)
        # reward and teacher_forced are timed inside the model's forward (one DDP forward)
        with st.autocast():
            out = st.model(x, tokens, order=order, decoder_samples=kt, **self._phase_kw())
        # The trust region is the global batch's (docs/algorithm.md, step 6): under torchrun every
        # rank sees all [N, K] rewards and log q (a few KB), solves the same η and keeps the
        # weights of its own rows. log q and the head in float32 with fp32_outputs.
        terms = daps.daps_losses(
            out["logpx"], out["hidden"], raw.encoder.head, tokens, out["log_eta"], beta,
            ess_target=cfg.ess_target, eta_mode=cfg.eta_mode, use_logits=not st.fused,
            backend=cfg.kernel_backend, fp32=cfg.fp32_outputs, precision=st.fp32,
            gather=st.gather_rows if st.distributed else None, phases=ph, backward=True,
            decoder_logpx=out["decoder_logpx"],
            solve_eta_init=cfg.eta_init == "solve" and step == 0)
        self._eta = terms.eta
        with torch.no_grad():
            elbo = daps.beta_elbo(terms.rewards, terms.entropy, raw.vocab_size, cfg.beta_end)
            return {
                "loss": terms.loss.detach(),
                "encoder_loss": terms.encoder_loss.detach(),
                "decoder_loss": terms.decoder_loss.detach(),
                "eta_loss": terms.eta_loss.detach(),
                "beta_elbo": elbo.mean(),
                "log_px": terms.rewards.mean(),
                "logq": terms.logq.mean(),
                "entropy": terms.entropy.sum(-1).mean(),
                "ess_frac": terms.ess.mean() / K,
                "eta": terms.eta.float(),
                "beta": torch.tensor(beta),
            }

    def _resampled(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """The DAPS step with the encoder's gradient on K″ sequences per image drawn from the
        weights (``Config.encoder_samples``). The weights take log q from the sampler (the
        same q the teacher-forced pass computes, up to float rounding), so the teacher-forced
        pass, with its backward, runs on the N·K″ drawn sequences only; the rewards of all K
        come from a decoder call without a graph (:meth:`score`), the decoder's loss from a
        second call on K′ of them (all K when ``decoder_samples`` is null). The expectation of
        the update over the draws is the paper's (tests/test_time_to_quality.py)."""
        st, cfg, raw, ph = self.step, self.cfg, self.raw, self.step.phases
        K, kt = cfg.num_samples, cfg.decoder_samples
        beta = self.beta(step)
        with ph("sample"):
            tokens, logq_tok = st.sample(x)
        with ph("reward"), st.autocast():
            rewards = raw.score(x, tokens)
        logq = logq_tok.sum(-1)
        with ph("weights"):
            eta, weights, ess = daps.trust_region(
                rewards, logq, raw.log_eta, beta, ess_target=cfg.ess_target,
                eta_mode=cfg.eta_mode, backend=cfg.kernel_backend,
                gather=st.gather_rows if st.distributed else None,
                solve_eta_init=cfg.eta_init == "solve" and step == 0)
            rows = daps.draw_from_weights(weights.detach(), cfg.encoder_samples, st.generator)
            order = (torch.randperm(K, generator=st.generator, device=x.device)
                     if kt is not None and kt < K else None)
        with ph("teacher_forced"), st.autocast():
            out = st.model(x, tokens, order=order, decoder_samples=kt, encoder_rows=rows,
                           phases=None)
        with ph("losses"):
            drawn = tokens.gather(1, rows[..., None].expand(-1, -1, tokens.shape[-1]))
            hidden = out["hidden"].float() if cfg.fp32_outputs else out["hidden"]
            with st.fp32():
                if st.fused:
                    logp_tok = dvae_kernels.linear_token_logprobs(
                        hidden, raw.encoder.head.weight, drawn, raw.encoder.head.bias,
                        ignore_index=None, backend=cfg.kernel_backend)
                else:
                    logp_tok = dvae_kernels.token_logprobs(
                        raw.encoder.head(hidden), drawn, ignore_index=None,
                        backend=cfg.kernel_backend)
                l_enc = daps.resampled_encoder_loss(logp_tok, x.shape[0])
            l_dec = daps.decoder_loss(out["decoder_logpx"])
            l_eta = (daps.eta_loss(ess, cfg.ess_target, K) if cfg.eta_mode == "learned"
                     else l_dec.new_zeros(()))
            loss = l_enc + l_dec + l_eta
            loss.backward()
        self._eta = eta.detach()
        with torch.no_grad():
            # −log q of a sample is an unbiased estimate of q's entropy: the KL to the
            # uniform prior per sample is L·log V + log q
            kl = tokens.shape[-1] * math.log(raw.vocab_size) + logq
            return {
                "loss": loss.detach(),
                "encoder_loss": l_enc.detach(),
                "decoder_loss": l_dec.detach(),
                "eta_loss": l_eta.detach(),
                "beta_elbo": (rewards - cfg.beta_end * kl).mean(),
                "log_px": rewards.mean(),
                "logq": logq.mean(),
                "entropy": -logq.mean(),
                "ess_frac": ess.mean() / K,
                "eta": eta.detach().float(),
                "beta": torch.tensor(beta),
            }

    def after_update(self, found_inf: torch.Tensor) -> None:
        if self.cfg.eta_mode == "learned" or self._eta is None:
            return
        with torch.no_grad():  # the solved η is recorded; a skipped step keeps the previous
            log_eta = self.raw.log_eta
            new = self._eta.log().to(log_eta.dtype)
            log_eta.copy_(torch.where(found_inf > 0, log_eta, new))


class RelaxedObjective(Objective):
    """Gumbel-softmax and GR-MCK, AR or factorised: one relaxed sample per image,
    ``L = −mean_i(log p(x_i|z_i) − β·KL(q(·|x_i)‖uniform))``, τ and β annealed."""

    def temperature(self, step: int) -> float:
        return anneal(step, self.cfg.steps, self.cfg.temp_start, self.cfg.temp_end)

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        st, cfg, ph = self.step, self.cfg, self.step.phases
        beta, tau = self.beta(step), self.temperature(step)
        with st.autocast():
            out = st.model(x, tau=tau, generator=st.generator, **self._phase_kw())
        with ph("losses"):
            logpx, kl = _float(out["logpx"]), out["kl"]
            loss = -(logpx - beta * kl).mean()
            loss.backward()
        with torch.no_grad():
            return {
                "loss": loss.detach(),
                "beta_elbo": (logpx - cfg.beta_end * kl).mean(),
                "log_px": logpx.mean(),
                "kl": kl.mean(),
                "temperature": torch.tensor(tau),
                "beta": torch.tensor(beta),
            }


class QuantisedObjective(Objective):
    """VQ-VAE and FSQ: ``−mean(log p(x|z)/#pixels)`` plus, for VQ-VAE, the codebook loss and
    ``commitment`` times the commitment loss (the reference's scaling)."""

    has_elbo = False

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        st, cfg, ph = self.step, self.cfg, self.step.phases
        with st.autocast():
            out = st.model(x, **self._phase_kw())
        with ph("losses"):
            logpx = _float(out["logpx"])
            recon = -(logpx / x[0].numel()).mean()
            loss = recon + out["codebook_loss"] + cfg.commitment * out["commitment_loss"]
            loss.backward()
        with torch.no_grad():
            return {
                "loss": loss.detach(),
                "recon_loss": recon.detach(),
                "codebook_loss": out["codebook_loss"].detach(),
                "commitment_loss": out["commitment_loss"].detach(),
                "log_px": logpx.mean(),
            }


def make_objective(step) -> Objective:
    """The objective of ``step.cfg.method``."""
    method = step.cfg.method
    if method in ("daps", "daps_na"):
        return DAPSObjective(step)
    if method in ("vq", "fsq"):
        return QuantisedObjective(step)
    if method in CATEGORICAL:
        return RelaxedObjective(step)
    raise ValueError(f"unknown method {method!r}")
