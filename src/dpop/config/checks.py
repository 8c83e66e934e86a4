"""Checks across a TrainConfig's fields: settings that are each valid but contradict one another."""

from __future__ import annotations

from dpop.config import TRACKERS, _split_list, _suggest
from dpop.errors import ConfigError
from dpop.losses.objective import make_objective


def check_consistency(config) -> None:
    """ConfigError for settings that contradict each other (each field alone has been checked)."""

    # one weight per loss, each loss once; kto alone, without use_weighting
    objective = make_objective(config.loss, config.loss_weights, use_weighting=config.use_weighting)
    if objective.needs_kl and config.ref_strategy in ("precompute", "guided"):
        raise ConfigError(f"loss {config.loss}: TDPO's sequential KL needs the reference's full token distributions "
                          "at every step, which a precomputed cache does not hold; use --ref-strategy model (a "
                          "live frozen copy), or lora with LoRA")
    if objective.unpaired and config.ld_alpha is not None:
        raise ConfigError(f"ld_alpha (LD-DPO) weighs a pair's longer response against the shorter; {config.loss} "
                          "trains on unpaired rows")
    if objective.unpaired and config.filter_ches:
        raise ConfigError(f"filter_ches scores a pair's two responses against each other; {config.loss} trains on "
                          "unpaired rows: drop filter_ches")
    prompt_limit = config.max_prompt_length
    if prompt_limit is not None and prompt_limit >= config.max_length:
        raise ConfigError(f"max_prompt_length ({prompt_limit}) must be below max_length ({config.max_length}) to "
                          f"leave room for the response; try max_prompt_length {config.max_length // 2}")
    if config.ref_strategy == "lora" and config.lora_r == 0:
        raise ConfigError("ref_strategy: 'lora' needs LoRA on (set lora_r > 0), or use 'precompute'")
    if config.ref_strategy == "guided" and config.ref_model:
        raise ConfigError("ref_strategy 'guided' trains its own reference (the guide); drop ref_model")
    if config.ref_strategy == "lora" and config.ref_model:
        raise ConfigError("ref_strategy: 'lora' uses the policy's own base weights as the reference; drop ref_model "
                          "or use ref_strategy 'precompute' or 'model'")
    for name in ("lora_dora", "lora_4bit"):
        if getattr(config, name) and config.lora_r == 0:
            raise ConfigError(f"{name} needs LoRA on: set lora_r > 0 (e.g. --lora-r 16)")
    if config.lora_save != "merged" and config.lora_r == 0:
        raise ConfigError(f"lora_save {config.lora_save!r} needs LoRA on (set lora_r > 0); a full fine-tune's "
                          "final/ always holds the whole model")
    if config.sync_ref_model and (config.ref_strategy != "model" or config.lora_r > 0):
        raise ConfigError("sync_ref_model (TR-DPO) updates a live reference model from the policy: use "
                          "--ref-strategy model on a full fine-tune (a precomputed reference is fixed, and a LoRA "
                          "policy's reference is its own frozen base)")
    if config.engine == "fsdp2":
        check_fsdp2(config)
    if config.resume and config.overwrite:
        raise ConfigError("resume and overwrite contradict each other: --resume continues the run in output_dir, "
                          "--overwrite deletes it")
    names = _split_list(config.report_to)
    for name in names:
        if name not in (*TRACKERS, "none"):
            raise ConfigError(f"report_to: unknown tracker '{name}'{_suggest(name, TRACKERS)}; "
                              f"choose from {', '.join(TRACKERS)} or none")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"report_to: 'none' cannot be combined with trackers, got {config.report_to!r}")


def check_fsdp2(config) -> None:
    """What dpop's FSDP2 engine (dpop.distributed.fsdp) does not do, refused before anything loads."""
    if config.lora_r > 0 or config.ref_strategy == "lora":
        raise ConfigError("engine fsdp2 with LoRA is not supported: the adapters would be sharded and merged into "
                          "sharded weights; LoRA's optimizer state is small, so use --engine ddp (or lora_r 0)")
    if config.ref_strategy in ("model", "guided"):
        raise ConfigError(f"engine fsdp2 with ref_strategy {config.ref_strategy}: a live reference model (TDPO's, "
                          "TR-DPO's, Pre-DPO's guide) would be held whole on every process beside the sharded policy, "
                          "which is what sharding avoids; use --ref-strategy precompute (ref_model may name the "
                          "reference: its log-probs are computed once, before sharding), or --engine ddp")
