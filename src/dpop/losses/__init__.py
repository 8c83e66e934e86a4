"""Preference losses: pure functions of per-pair log-probs, registered once by name in LOSSES.

The training loop calls one function and never branches on a loss name:

    losses, chosen_rewards, rejected_rewards = preference_loss(
        config.loss, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=config.beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        **loss_options(config.loss, config_dict))

Inputs are per-pair SUMS of response-token log-probs, shape (B,), in any float dtype (the math runs in
fp32, or fp64 for fp64 inputs); lengths are response token counts (B,). Each loss's docstring says which
log-probs it compares (sums or length-averaged). Outputs are per-pair losses (B,) — the caller takes the
mean, or for a per-token loss (sft) the sum over the step's chosen tokens: LossSpec.units — and the implicit
rewards (B,), detached. A loss's options are the keyword-only parameters of its
function, with their defaults; they are read from the signature here, so they are defined in one place.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dpop.errors import ConfigError
from dpop.losses._common import LossOutput, Tensor
from dpop.losses.options import OPTIONS, check_option
from dpop.losses.reference_based import (
    cdpo_loss,
    dpo_loss,
    dpop_loss,
    dpop_penalty,
    hinge_loss,
    ipo_loss,
    robust_loss,
    rpo_loss,
    sigmoid_norm_loss,
    tdpo1_loss,
    tdpo2_loss,
)
from dpop.losses.reference_free import cpo_loss, orpo_loss, sft_loss, simpo_loss
from dpop.losses.trl_pairwise import (
    aot_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from dpop.losses.unpaired import kto_loss, kto_reference_point

__all__ = ["LOSSES", "OPTIONS", "OPTION_HELP", "LossSpec", "check_option", "dpop_penalty", "get_loss",
           "kto_reference_point",
           "loss_option_defaults", "loss_options", "make_objective", "Objective", "objective_of", "preference_loss",
           "sequence_loss"]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss. `options` maps each option name (the paper's symbol) to its default."""

    name: str
    fn: Callable[..., LossOutput]  # the pure function
    options: Mapping[str, float]
    reference_free: bool  # ref log-probs not used (may be None)
    needs_lengths: bool  # needs response token counts
    citation: str
    uses_rejected: bool = True  # False: only prompt + chosen are scored (rejected log-probs are NaN)
    per_token: bool = False  # a step's loss is Σ losses / Σ |y_w| (chosen tokens) instead of the mean over pairs
    needs_kl: bool = False  # needs the sequential token KLs D_SeqKL(πref ‖ πθ) (a live reference's distributions)
    unpaired: bool = False  # trains on unpaired rows: labels, chosen = the completion, rejected = a mismatched y'

    def units(self, chosen_lengths: Tensor) -> Tensor:
        """What each pair counts for in a step's loss: 1, or its chosen tokens for a per-token loss. A step's
        loss is Σ per-pair losses / Σ units over the step's pairs (also across micro-batches and processes)."""
        if self.per_token:
            return chosen_lengths.float().clamp(min=1.0)
        return torch.ones(chosen_lengths.shape, dtype=torch.float32, device=chosen_lengths.device)


# What each option means, once (dpop.losses.options); `--help` and the config docs are generated from it.
OPTION_HELP: dict[str, str] = {name: option.help for name, option in OPTIONS.items()}

_NOT_OPTIONS = {"beta", "chosen_lengths", "rejected_lengths", "chosen_kl", "rejected_kl", "desirable",
                "reference_point"}


def _spec(name: str, fn: Callable[..., LossOutput], citation: str, **flags: bool) -> LossSpec:
    """Build a LossSpec from the function's signature: 2 positional tensors = reference-free, 4 = reference-
    based; `chosen_lengths` among its keywords = needs lengths; other keyword-only parameters = options."""
    parameters = inspect.signature(fn).parameters.values()
    positional = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    options = {key: float(default) for key, default in keywords.items() if key not in _NOT_OPTIONS}
    return LossSpec(name=name, fn=fn, options=options, reference_free=len(positional) == 2,
                    needs_lengths="chosen_lengths" in keywords, needs_kl="chosen_kl" in keywords,
                    unpaired="desirable" in keywords, citation=citation, **flags)


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in [
    _spec("dpo", dpo_loss, "Rafailov et al. 2023, eq. 7"),
    _spec("dpop", dpop_loss, "Pal et al. 2024 (Smaug), eq. 3 (v2)"),
    _spec("ipo", ipo_loss, "Azar et al. 2023, eq. 17, on length-averaged log-ratios"),
    _spec("hinge", hinge_loss, "Zhao et al. 2023 (SLiC-HF), reference-normalised as in Liu et al. 2024 (RSO)"),
    _spec("robust", robust_loss, "Chowdhury et al. 2024 (rDPO), the unbiased loss"),
    _spec("cdpo", cdpo_loss, "Mitchell 2023, A note on DPO with noisy preferences (cDPO)"),
    _spec("rpo", rpo_loss, "Pang et al. 2024 (Iterative RPO), the DPO+NLL loss"),
    _spec("simpo", simpo_loss, "Meng et al. 2024 (SimPO), eq. 6"),
    _spec("cpo", cpo_loss, "Xu et al. 2024 (CPO), eq. 3 + NLL"),
    _spec("orpo", orpo_loss, "Hong et al. 2024 (ORPO), eqs. 4, 6, 7"),
    _spec("bco_pair", bco_pair_loss, "Jung et al. 2024 (BCO), pairwise, reward shift δ = 0"),
    _spec("sppo_hard", sppo_hard_loss, "Wu et al. 2024 (SPPO), eq. 4.7 with hard win probabilities"),
    _spec("nca_pair", nca_pair_loss, "Chen et al. 2024 (NCA), K = 2"),
    _spec("exo_pair", exo_pair_loss, "Ji et al. 2024 (EXO), eq. 16, K = 2"),
    _spec("apo_zero", apo_zero_loss, "D'Oosterlinck et al. 2024 (APO), eq. 7"),
    _spec("apo_down", apo_down_loss, "D'Oosterlinck et al. 2024 (APO), eq. 8"),
    _spec("discopop", discopop_loss, "Lu et al. 2024 (DiscoPOP), eq. 5"),
    _spec("aot", aot_loss, "Melnyk et al. 2024 (AOT), paired, hard sorting, logistic loss"),
    _spec("tdpo1", tdpo1_loss, "Zeng et al. 2024 (TDPO), eq. 17"),
    _spec("tdpo2", tdpo2_loss, "Zeng et al. 2024 (TDPO), eq. 18"),
    _spec("kto", kto_loss, "Ethayarajh et al. 2024 (KTO), eqs. 7–8, on unpaired rows"),
    _spec("sft", sft_loss, "supervised fine-tuning: cross-entropy per chosen token (what `dpop sft` runs)",
          uses_rejected=False, per_token=True),
    _spec("sigmoid_norm", sigmoid_norm_loss,
          "Rafailov et al. 2023, eq. 7 on length-averaged log-ratios (as in Lambert et al. 2024, Tülu 3)"),
]}


def get_loss(name: str) -> LossSpec:
    """The LossSpec registered as `name`; ConfigError naming the nearest valid names otherwise."""
    spec = LOSSES.get(name) if isinstance(name, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown loss {name!r}.{hint} Valid losses: {', '.join(LOSSES)}")
    return spec


def loss_option_defaults() -> dict[str, float]:
    """Every option of every loss with its default: the config keys the losses need."""
    defaults: dict[str, float] = {}
    for spec in LOSSES.values():
        defaults.update(spec.options)
    return defaults


def _option_float(loss: str, option: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"loss {loss!r}: option {option} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss {loss!r}: option {option} must be a number, got {value!r}") from None


def _unknown_option_error(spec: LossSpec, option: str) -> ConfigError:
    valid = f"its options are: {', '.join(spec.options)}" if spec.options else "it takes no options"
    owners = [s.name for s in LOSSES.values() if option in s.options]
    elsewhere = f" ({option} belongs to: {', '.join(owners)})" if owners else ""
    return ConfigError(f"loss {spec.name!r} has no option {option!r}{elsewhere}; {valid}")


def loss_options(name: str, source: Mapping[str, Any] | Any) -> dict[str, float]:
    """Pick the options `name` declares from a config-like mapping (or an object with attributes);
    a missing or None value gives the loss's default. Keys of other losses are ignored."""
    spec = get_loss(name)
    picked = {}
    for option, default in spec.options.items():
        value = source.get(option) if isinstance(source, Mapping) else getattr(source, option, None)
        picked[option] = default if value is None else _option_float(name, option, value)
    return picked


def _check_tensors(name: str, tensors: dict[str, Tensor | None]) -> None:
    shapes = {key: tuple(t.shape) for key, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(shape) != 1 for shape in shapes.values()):
        listed = ", ".join(f"{key} {list(shape)}" for key, shape in shapes.items())
        raise ValueError(f"loss {name!r}: inputs must all have shape (B,); got {listed}")


def preference_loss(name: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *, beta: float,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    chosen_kl: Tensor | None = None, rejected_kl: Tensor | None = None,
                    desirable: Tensor | None = None, reference_point: Tensor | None = None,
                    **options: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair (losses, chosen_rewards, rejected_rewards), each shape (B,), of the loss registered as `name`.

    Args:
        name: a key of LOSSES.
        policy_chosen_logps, policy_rejected_logps: log πθ(y_w|x), log πθ(y_l|x), summed over response tokens.
        ref_chosen_logps, ref_rejected_logps: the same under πref; may be None for a reference-free loss.
        beta: β > 0 (ORPO: the weight λ of its odds-ratio term).
        chosen_lengths, rejected_lengths: response token counts; required when the loss needs_lengths.
        chosen_kl, rejected_kl: Σ_t KL(πref ‖ πθ) over each response's tokens; required when the loss needs_kl.
        desirable: (B,) bool labels of unpaired rows, required by an unpaired loss (kto), whose "chosen" inputs are
            each row's completion and "rejected" inputs its mismatched completion y' (dpop.data.unpaired);
            reference_point: its z0 (None: from this batch alone).
        **options: the loss's options (see LOSSES[name].options); omitted ones take their defaults.
    Raises:
        ConfigError: unknown loss or option, or a value out of range (user-fixable).
        ValueError: missing reference log-probs or lengths, or mismatched shapes (caller's bug).
    """
    spec = get_loss(name)
    for option in options:
        if option not in spec.options:
            raise _unknown_option_error(spec, option)
    values = {option: _option_float(name, option, value) for option, value in options.items()}
    beta = _option_float(name, "beta", beta)
    if not beta > 0:
        raise ConfigError(f"loss {name!r}: beta must be > 0, got {beta}")

    if spec.reference_free:
        args = (policy_chosen_logps, policy_rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss {name!r} is reference-based: ref_chosen_logps and ref_rejected_logps "
                             "are required (use a reference-free loss such as simpo, cpo or orpo to skip them)")
        args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if spec.needs_lengths:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss {name!r} needs chosen_lengths and rejected_lengths (response token counts)")
        values.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if spec.needs_kl:
        if chosen_kl is None or rejected_kl is None:
            raise ValueError(f"loss {name!r} needs chosen_kl and rejected_kl (sequential token KLs to the reference)")
        values.update(chosen_kl=chosen_kl, rejected_kl=rejected_kl)
    if spec.unpaired:
        if desirable is None:
            raise ValueError(f"loss {name!r} trains on unpaired rows: desirable (their labels) is required")
        values.update(desirable=desirable, reference_point=reference_point)
    _check_tensors(name, {"policy_chosen_logps": policy_chosen_logps,
                          "policy_rejected_logps": policy_rejected_logps,
                          "ref_chosen_logps": ref_chosen_logps if not spec.reference_free else None,
                          "ref_rejected_logps": ref_rejected_logps if not spec.reference_free else None,
                          "chosen_lengths": chosen_lengths if spec.needs_lengths else None,
                          "rejected_lengths": rejected_lengths if spec.needs_lengths else None})
    return spec.fn(*args, beta=beta, **values)


def sequence_loss(name: str, policy, ref, *, beta: float, options: Mapping[str, float] | None = None,
                  reference_point: Tensor | None = None):
    """preference_loss on scored sequences: `policy` and `ref` carry .chosen and .rejected log-prob sums (B,)
    (dpop.scoring.logprobs.SequenceLogps, dpop.scoring.reference.RefLogps); `policy` also the token counts; `ref` may be None
    for a reference-free loss; `reference_point`: KTO's z0 (dpop.losses.objective.Objective.reference_point)."""
    return preference_loss(name, policy.chosen, policy.rejected, ref.chosen if ref is not None else None,
                           ref.rejected if ref is not None else None, beta=beta, chosen_lengths=policy.chosen_lengths,
                           rejected_lengths=policy.rejected_lengths, chosen_kl=getattr(policy, "chosen_kl", None),
                           rejected_kl=getattr(policy, "rejected_kl", None),
                           desirable=getattr(policy, "desirable", None), reference_point=reference_point,
                           **(options or {}))


from dpop.losses.objective import Objective, make_objective, objective_of  # noqa: E402 (uses the registry above)
