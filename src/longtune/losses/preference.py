"""Preference (DPO family), KTO and reward-model losses as pure functions of per-sequence tensors.

Every function takes already-reduced sequence quantities (log-prob sums and token counts) and returns a
per-pair / per-example loss vector; the stage decides how to reduce it, so these are testable in float64 alone.

How a stage combines these with sequence parallelism (DESIGN, "Sequence parallelism, precisely"): each SP rank
holds a *partial* log-prob sum and token count of every sequence. Reduce both with an autograd-aware all-reduce
SUM over the SP group first, then call these functions on the full values; length normalisation (IPO, SimPO,
ORPO, `sft_term`) happens in here, after the reduction, which is the only correct order. Because every SP rank
then computes the same loss, the backward of the all-reduce delivers the gradient sp times: the stage scales it
once (e.g. multiplies the loss by 1/sp on each rank), and the SP parity test checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")


@dataclass
class SequenceLogps:
    """Per-sequence log-likelihood of a response: `sum` of its token log-probs and `count` of its tokens.

    Both are [N]; `count` may be an integer tensor. A sequence with count 0 has an undefined mean.
    """

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        """Length-averaged log-prob, sum / count, in the dtype of `sum`."""
        return self.sum / self.count.to(self.sum.dtype)


@dataclass
class PreferenceLossOutput:
    """Result of `dpo_loss`: per-pair loss plus detached implicit rewards and the policy log-prob sums."""

    loss: Tensor  # [N], one value per (chosen, rejected) pair; the caller sums or averages
    chosen_rewards: Tensor  # [N], detached
    rejected_rewards: Tensor  # [N], detached
    chosen_logps: Tensor  # [N], detached policy log-prob sums of the chosen responses
    rejected_logps: Tensor  # [N], detached policy log-prob sums of the rejected responses

    def metric_sums(self, mask: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """(sum, count) of each metrics.jsonl metric over the pairs where `mask` is 1 (all by default): the form
        that merges exactly over micro-batches and ranks. The training stage and `metrics` both use it."""
        m = torch.ones_like(self.loss) if mask is None else mask
        n = m.sum()
        return {
            "rewards/chosen": ((self.chosen_rewards * m).sum(), n),
            "rewards/rejected": ((self.rejected_rewards * m).sum(), n),
            "rewards/margins": (((self.chosen_rewards - self.rejected_rewards) * m).sum(), n),
            "rewards/accuracies": (((self.chosen_rewards > self.rejected_rewards).to(m.dtype) * m).sum(), n),
            "logps/chosen": ((self.chosen_logps * m).sum(), n),
            "logps/rejected": ((self.rejected_logps * m).sum(), n),
        }

    def metrics(self) -> dict[str, float]:
        """The DPO-family metrics of metrics.jsonl, each a mean over the N pairs of this call."""
        return {name: float(total / count) for name, (total, count) in self.metric_sums().items()}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Mächler 2012, "Accurately computing log(1 - exp(-|a|))").

    Near 0, 1 - exp(x) cancels catastrophically, so use log(-expm1(x)); far below, exp(x) is tiny and
    log1p(-exp(x)) keeps its digits. The switch at -ln 2 is where both are accurate. x = 0 gives -inf.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_pairs(*logps: SequenceLogps) -> None:
    shape = logps[0].sum.shape
    for lp in logps:
        if lp.sum.shape != shape or lp.count.shape != shape:
            raise ValueError(
                f"all SequenceLogps must have sum and count of the same shape [N]; got sums "
                f"{[tuple(x.sum.shape) for x in logps]} and counts {[tuple(x.count.shape) for x in logps]}"
            )


def dpo_loss(
    policy_chosen: SequenceLogps,
    policy_rejected: SequenceLogps,
    ref_chosen: SequenceLogps | None,
    ref_rejected: SequenceLogps | None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceLossOutput:
    """Per-pair DPO-family loss (`pref_loss`), with `beta` = `pref_beta`.

    Conventions (π = policy, r = reference; "sum" = token log-prob sum, "avg" = sum / count):
      sigmoid, hinge: h = (π_c − r_c) − (π_r − r_r) on sums; rewards β·(π − r) on sums.
      ipo:            h on avgs (as LLaMA-Factory and TRL); rewards β·(π − r) on avgs.
      simpo:          reference-free, on avgs; rewards β·avg_π.
      orpo:           reference-free, on avgs; rewards β·avg_π (as TRL); `beta` is the paper's λ.
    `label_smoothing` (cDPO's ε, in [0, 0.5)) applies to `sigmoid` only; a non-zero value with another type is
    an error rather than silently ignored. `simpo_gamma` is the SimPO paper's γ (the target margin itself).
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; expected one of {PREFERENCE_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 for loss_type {loss_type!r}; got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} is only defined for loss_type 'sigmoid' (cDPO); "
            f"set it to 0 for {loss_type!r}"
        )

    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        _check_pairs(policy_chosen, policy_rejected)
        avg_c, avg_r = policy_chosen.mean, policy_rejected.mean
        if loss_type == "simpo":
            # SimPO (Meng et al. 2024, eq. 6): L = −log σ(β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ).
            # LLaMA-Factory and TRL write β·(Δavg − γ/β), which is the same; their `simpo_gamma` is also γ.
            loss = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        else:
            # ORPO (Hong et al. 2024, eqs. 4–7): odds(y|x) = P/(1 − P) with log P = avg log-prob;
            # L_OR = −log σ(log odds(y_w|x) − log odds(y_l|x)); L = L_SFT + λ·L_OR, with λ = beta and
            # L_SFT = −avg_c per pair (the chosen response's token-mean NLL, LLaMA-Factory's convention;
            # TRL instead takes one token-mean over the whole batch of chosen tokens).
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss = -avg_c - beta * F.logsigmoid(log_odds)
        return PreferenceLossOutput(
            loss=loss,
            chosen_rewards=(beta * avg_c).detach(),
            rejected_rewards=(beta * avg_r).detach(),
            chosen_logps=policy_chosen.sum.detach(),
            rejected_logps=policy_rejected.sum.detach(),
        )

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss_type {loss_type!r} needs reference log-probs (ref_chosen and ref_rejected); "
            f"only {REFERENCE_FREE_LOSS_TYPES} are reference-free"
        )
    _check_pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "ipo":
        chosen_ratio = policy_chosen.mean - ref_chosen.mean
        rejected_ratio = policy_rejected.mean - ref_rejected.mean
    else:
        chosen_ratio = policy_chosen.sum - ref_chosen.sum
        rejected_ratio = policy_rejected.sum - ref_rejected.sum
    h = chosen_ratio - rejected_ratio

    if loss_type == "sigmoid":
        # DPO (Rafailov et al. 2023, eq. 7): L = −log σ(β·h). cDPO (Mitchell 2023) assumes labels flipped with
        # probability ε: L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h).
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, eq. 17): L = (h − 1/(2β))², a squared regression to a fixed margin.
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        # SLiC-HF hinge (Zhao et al. 2023), as used in TRL/LLaMA-Factory: L = max(0, 1 − β·h).
        loss = torch.relu(1.0 - beta * h)
    return PreferenceLossOutput(
        loss=loss,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
        chosen_logps=policy_chosen.sum.detach(),
        rejected_logps=policy_rejected.sum.detach(),
    )


def sft_term(policy_chosen: SequenceLogps) -> Tensor:
    """Per-sequence token-mean NLL of the chosen response, −sum / count, shape [N].

    For `pref_ftx` the stage adds `pref_ftx * sft_term(policy_chosen)` to the per-pair preference loss (as
    LLaMA-Factory does, also for ORPO, whose loss already contains this term once). As everywhere here, the
    sum and count must already be all-reduced over the SP group.
    """
    return -policy_chosen.mean


@dataclass
class KTOLossOutput:
    """Result of `kto_loss`: per-example loss, detached implicit rewards, and what metrics need."""

    loss: Tensor  # [N]
    rewards: Tensor  # [N], β·(π − ref) on sums, detached
    desirable: Tensor  # [N] bool
    logps: Tensor  # [N], detached policy log-prob sums
    kl: Tensor  # scalar, the z0 actually used

    def metric_sums(self, valid: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """(sum, count) of each KTO metric over the examples where `valid` is 1 (all by default), split by the
        desirable flag; `kl` is the z0 used, counted once. The training stage and `metrics` both use it."""
        v = torch.ones_like(self.loss) if valid is None else valid
        good = v * self.desirable.to(v.dtype)
        bad = v * (~self.desirable).to(v.dtype)
        one = torch.ones((), dtype=torch.float64, device=self.loss.device)
        return {
            "kl": (self.kl * one, one),
            "rewards/chosen": ((self.rewards * good).sum(), good.sum()),
            "rewards/rejected": ((self.rewards * bad).sum(), bad.sum()),
            "logps/chosen": ((self.logps * good).sum(), good.sum()),
            "logps/rejected": ((self.logps * bad).sum(), bad.sum()),
        }

    def metrics(self) -> dict[str, float]:
        """KTO metrics; a chosen/rejected mean is present only when this call has such examples.

        `count/chosen` and `count/rejected` give the weights to merge several calls exactly.
        """
        sums = self.metric_sums()
        out: dict[str, float] = {"kl": float(self.kl)}
        for name in ("chosen", "rejected"):
            total, n = sums[f"rewards/{name}"]
            out[f"count/{name}"] = float(n)
            if n > 0:
                out[f"rewards/{name}"] = float(total / n)
                out[f"logps/{name}"] = float(sums[f"logps/{name}"][0] / n)
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def kto_kl_sums(policy_kl_sum: Tensor, ref_kl_sum: Tensor, valid: Tensor) -> Tensor:
    """[sum over valid KL documents of (π − ref), their number] in float64, detached: the form that is summed
    over data-parallel ranks before `kto_kl_from_sums` divides."""
    with torch.no_grad():
        return torch.stack([((policy_kl_sum - ref_kl_sum) * valid).sum(), valid.sum()]).double()


def kto_kl_from_sums(sums: Tensor) -> Tensor:
    """z0 = max(0, mean) from `kto_kl_sums` (possibly summed over ranks); 0 when there is no KL document."""
    return (sums[0] / sums[1].clamp_min(1)).clamp_min(0)


def kto_kl_estimate(policy_kl: SequenceLogps, ref_kl: SequenceLogps) -> Tensor:
    """KTO's reference point z0 = max(0, mean_j (π − ref)(y_j | x_i)), a detached scalar.

    The inputs are the log-prob sums of *mismatched* pairs (prompt x_i with completion y_j, j ≠ i; Ethayarajh
    et al. 2024, sec. 4, and TRL), a biased but cheap estimate of KL(π‖ref). With data parallelism the paper
    and TRL average over the global batch: the stage all-reduces `kto_kl_sums` before `kto_kl_from_sums`.
    """
    _check_pairs(policy_kl, ref_kl)
    valid = torch.ones_like(policy_kl.sum)
    return kto_kl_from_sums(kto_kl_sums(policy_kl.sum, ref_kl.sum, valid)).to(policy_kl.sum.dtype)


def kto_loss(
    policy: SequenceLogps,
    ref: SequenceLogps,
    desirable: Tensor,
    kl_estimate: Tensor,
    *,
    beta: float,
    chosen_weight: float,
    undesirable_weight: float,
) -> KTOLossOutput:
    """Per-example KTO loss (Ethayarajh et al. 2024, eq. 8), shape [N].

    r = π − ref on log-prob sums, z0 = max(0, kl_estimate) (detached), and
      desirable:   λ_D·(1 − σ(β·(r − z0)))     (λ_D = chosen_weight = `kto_chosen_weight`)
      undesirable: λ_U·(1 − σ(β·(z0 − r)))     (λ_U = undesirable_weight = `kto_undesirable_weight`).
    The paper's constant λ_y offset is dropped (it has no gradient), as in TRL. Rewards are β·r.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 for KTO; got {beta}")
    _check_pairs(policy, ref)
    if desirable.dtype != torch.bool or desirable.shape != policy.sum.shape:
        raise ValueError(
            f"desirable must be a bool tensor of shape {tuple(policy.sum.shape)}; "
            f"got {desirable.dtype} of shape {tuple(desirable.shape)}"
        )
    z0 = kl_estimate.detach().to(policy.sum.dtype).clamp(min=0.0)
    ratio = policy.sum - ref.sum
    loss = torch.where(
        desirable,
        chosen_weight * (1.0 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return KTOLossOutput(
        loss=loss, rewards=(beta * ratio).detach(), desirable=desirable, logps=policy.sum.detach(), kl=z0
    )


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Reward-model loss per pair, −log σ(r_c − r_r) (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), [N]."""
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(
            f"reward_chosen and reward_rejected must have the same shape; got "
            f"{tuple(reward_chosen.shape)} and {tuple(reward_rejected.shape)}"
        )
    return -F.logsigmoid(reward_chosen - reward_rejected)


def bradley_terry_correct(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Per pair 1 where the chosen reward is strictly greater, else 0 (ties count as wrong); detached."""
    dtype = torch.promote_types(reward_chosen.dtype, torch.float32)
    return (reward_chosen > reward_rejected).to(dtype).detach()


def bradley_terry_accuracy(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Fraction of pairs whose chosen reward is strictly greater, a detached scalar (ties count as wrong)."""
    return bradley_terry_correct(reward_chosen, reward_rejected).mean()
