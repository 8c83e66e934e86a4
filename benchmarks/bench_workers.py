"""What runs inside one benchmark subprocess: a dpop run, a TRL run, or the matmul-rate measurement.

Each worker prints ONE JSON line last on stdout (the parent reads the last line that starts with '{');
everything else the libraries print goes before it. A worker reports raw per-step records (seconds,
tokens, FLOPs, loss); the parent computes medians and ratios, so all engines are summarised by one rule.

Memory: `peak_rss_gb` is the process's peak resident set (getrusage ru_maxrss: model load, tokenisation,
reference pass and steps); `setup_peak_rss_gb` the peak before the first step; `steps_peak_rss_gb` the
peak during the steps alone (the kernel's high-water mark is reset through /proc/self/clear_refs after
setup; null where that is not possible).

    python benchmarks/bench.py worker --engine dpop --case bench --steps 8 --warmup 2
    python benchmarks/bench.py worker --engine trl --case bench --steps 8 --warmup 2
    python benchmarks/bench.py worker --engine matmul --tokens 1024
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_cases import TASK_SEED, build_rows, in_dpop_order, make_case
from bench_flops import Work, layout_work, measure_matmul, model_dims, rows_work, step_flops

# --- memory ---------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _gb(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024 / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM (peak RSS) so the next reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_fields(setup_hwm_kib: int | None, reset_ok: bool) -> dict:
    return {"peak_rss_gb": peak_rss_gb(), "setup_peak_rss_gb": _gb(setup_hwm_kib),
            "steps_peak_rss_gb": _gb(_status_kib("VmHWM")) if reset_ok else None}


# --- common ---------------------------------------------------------------------------------------------

def parse_sets(items) -> dict:
    """['key=value', ...] -> {key: value} (values stay strings; the config classes coerce them)."""
    values = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        values[key.strip().replace("-", "_")] = value.strip()
    return values


def _lengths(prompts, chosens, rejecteds) -> dict:
    return {"pairs": len(prompts), "prompt": statistics.mean(prompts), "chosen": statistics.mean(chosens),
            "rejected": statistics.mean(rejecteds)}


def _environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"threads": torch.get_num_threads(),
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            # the worker's peak GPU memory held by tensors (None on a CPU): the GPU's memory figure
            "cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _step_record(seconds: float, pairs: int, work, dims, loss: float | None, row: dict | None = None) -> dict:
    """One step's timing and work; `row` (dpop's metrics row) adds the chosen delta and margin (nats)."""
    row = row or {}
    return {"seconds": seconds, "pairs": pairs, "tokens": work.body_tokens, "head_tokens": work.head_tokens,
            "attention_pairs": work.attention_pairs, "flops": step_flops(dims, work), "loss": loss,
            "chosen_delta": row.get("logps/chosen_delta"), "margin_nats": _margin_nats(row)}


def _margin_nats(row: dict) -> float | None:
    """(lw - rw) - (ll - rl): the reward margin without β, in nats (None where there is no reference)."""
    needed = ("logps/chosen", "logps/ref_chosen", "logps/rejected", "logps/ref_rejected")
    if any(not isinstance(row.get(key), float) or row[key] != row[key] for key in needed):
        return None
    return (row["logps/chosen"] - row["logps/ref_chosen"]) - (row["logps/rejected"] - row["logps/ref_rejected"])


# --- dpop -----------------------------------------------------------------------------------------------

def run_dpop(args) -> dict:
    """setup() then train_step() per optimizer step, each step timed with perf_counter around the call."""
    import dpop.training.loop as dpop_train
    import dpop.training.setup as dpop_setup
    from dpop.config import make_config
    from dpop.models import load_tokenizer, resolve_model
    from dpop.tasks.arithmetic import write_jsonl

    case = make_case(args.case, args.batch_size)
    total_steps = args.warmup + args.steps
    model_dir = resolve_model(args.model)
    rows = build_rows(case, load_tokenizer(model_dir), case.batch_size * total_steps)
    scratch = Path(tempfile.mkdtemp(prefix="dpop-bench-"))
    data = write_jsonl(rows, scratch / "pairs.jsonl")
    # A private cache: the reference pass runs (and is timed) in every worker instead of hitting an earlier
    # run's cached log-probs. The model was resolved above, from the real cache.
    os.environ["DPOP_CACHE"] = str(scratch / "cache")
    values = dict(model=str(model_dir), data=str(data), output_dir=str(scratch / "run"), precision=args.precision,
                  ref_strategy="precompute", loss=args.loss, batch_size=case.batch_size, max_length=case.max_length,
                  max_prompt_length=case.max_prompt_length, max_steps=total_steps, seed=TASK_SEED,
                  learning_rate=args.learning_rate)
    if args.layout:
        values["layout"] = args.layout
    values.update(parse_sets(args.set))
    config = make_config(values)

    reference_seconds = []
    build_reference = dpop_setup.build_reference

    def timed_build_reference(*a, **k):  # the reference pass, reported apart from setup
        started = time.perf_counter()
        try:
            return build_reference(*a, **k)
        finally:
            reference_seconds.append(time.perf_counter() - started)

    dpop_setup.build_reference = timed_build_reference
    try:
        return _time_dpop(dpop_train, dpop_setup, config, case, args, reference_seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _time_dpop(dpop_train, dpop_setup, config, case, args, reference_seconds: list) -> dict:
    from dpop.data.order import micro_batches, optimizer_steps

    total_steps = args.warmup + args.steps
    started = time.perf_counter()
    run = dpop_setup.setup(config)
    setup_seconds = time.perf_counter() - started
    setup_hwm, reset_ok = _status_kib("VmHWM"), reset_peak_rss()

    dims = model_dims(run.accelerator.unwrap_model(run.model))
    pairs, layout = run.data.train.pairs, run.config.layout
    stream = optimizer_steps(micro_batches(len(pairs), run.config.batch_size, run.config.seed), run.config.grad_accum)
    steps = []
    for _ in range(total_steps):
        step_batches = next(stream)
        started = time.perf_counter()
        row = dpop_train.train_step(run, step_batches)
        seconds = time.perf_counter() - started
        indices = [i for micro in step_batches for i in micro.pair_indices]
        work = _sum_work(layout_work(len(pairs[i].prompt_ids), len(pairs[i].chosen_ids), len(pairs[i].rejected_ids),
                                     layout) for i in indices)
        steps.append(_step_record(seconds, len(indices), work, dims, float(row["loss"]), row))
    return {"engine": "dpop", "case": case.name, "case_description": case.describe(), "warmup": args.warmup,
            "setup_s": setup_seconds, "reference_pass_s": sum(reference_seconds) if reference_seconds else None,
            "steps": steps, **memory_fields(setup_hwm, reset_ok), "dims": dims.to_dict(),
            "token_lengths": _lengths([len(p.prompt_ids) for p in pairs], [len(p.chosen_ids) for p in pairs],
                                      [len(p.rejected_ids) for p in pairs]),
            "settings": {key: value for key, value in run.config.to_dict().items()
                         if key not in ("data", "output_dir", "model")},
            "environment": _environment()}


def _sum_work(works) -> Work:
    total = Work()
    for work in works:
        total = total.add(work)
    return total


def _literal(text: str):
    """'true' -> True, '3' -> 3, '1e-6' -> 1e-06, anything else stays text (DPOConfig settings from --set)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# --- TRL ------------------------------------------------------------------------------------------------

def _trl_config(args, case, total_steps: int, output_dir: Path):
    import torch
    from trl import DPOConfig

    from dpop.config import resolve_precision
    from dpop.precision import uses_bf16

    # TRL's best: bf16 autocast where bf16 is fast (it has no stochastic rounding)
    bf16 = uses_bf16(resolve_precision(args.precision))
    values = dict(output_dir=str(output_dir), bf16=bf16, precompute_ref_log_probs=True,
                  per_device_train_batch_size=case.batch_size, gradient_accumulation_steps=1,
                  max_length=case.max_length, loss_type=["sigmoid"], beta=0.3, learning_rate=args.learning_rate,
                  max_steps=total_steps, seed=TASK_SEED, train_sampling_strategy="sequential",
                  save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
                  dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available())  # transformers refuses bf16 on CPU without use_cpu
    values.update({key: _literal(value) for key, value in parse_sets(args.set).items()})
    return DPOConfig(**values), values


def run_trl(args) -> dict:
    """TRL's DPOTrainer on the same rows and weights; each optimizer step timed by a TrainerCallback from
    on_step_begin to on_step_end (the batch is collated before on_step_begin, so TRL's step time excludes
    collation, which dpop's includes). The reference pass runs in DPOTrainer.__init__ and is timed apart."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    from dpop.models import resolve_model  # only to find the cached safetensors dir of the builtin model

    case = make_case(args.case, args.batch_size)
    total_steps = args.warmup + args.steps
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = in_dpop_order(build_rows(case, tokenizer, case.batch_size * total_steps))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    output_dir = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    config, values = _trl_config(args, case, total_steps, output_dir)
    dims = model_dims(model)
    steps, current, reference_seconds = [], {}, []

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            started = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                reference_seconds.append(time.perf_counter() - started)

        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            value = loss[0] if isinstance(loss, tuple) else loss
            current.setdefault("works", []).append(rows_work(inputs["attention_mask"].sum(dim=1).tolist(),
                                                             int(inputs["completion_mask"].sum())))
            current["pairs"] = current.get("pairs", 0) + inputs["input_ids"].shape[0] // 2
            current["loss"] = float(value.detach())
            return loss

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            current["setup_hwm"], current["reset_ok"] = _status_kib("VmHWM"), reset_peak_rss()

        def on_step_begin(self, *a, **k):
            current.update(works=[], pairs=0, started=time.perf_counter())

        def on_step_end(self, *a, **k):
            seconds = time.perf_counter() - current["started"]
            steps.append(_step_record(seconds, current["pairs"], _sum_work(current["works"]), dims, current["loss"]))

    started = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[StepTimer()])
    setup_seconds = time.perf_counter() - started
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    checkpointing = bool(getattr(trainer.model, "is_activation_checkpointing", False))
    dataset = trainer.train_dataset
    return {"engine": "trl", "case": case.name, "case_description": case.describe(), "warmup": args.warmup,
            "setup_s": setup_seconds, "reference_pass_s": sum(reference_seconds) if reference_seconds else None,
            "steps": steps, **memory_fields(current.get("setup_hwm"), current.get("reset_ok", False)),
            "dims": dims.to_dict(),
            "token_lengths": _lengths([len(x) for x in dataset["prompt_ids"]], [len(x) for x in dataset["chosen_ids"]],
                                      [len(x) for x in dataset["rejected_ids"]]),
            "settings": {**{key: (value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value))
                            for key, value in values.items() if key != "output_dir"},
                         "activation_checkpointing_active": checkpointing},
            "environment": _environment()}


# --- matmul ---------------------------------------------------------------------------------------------

def run_matmul(args) -> dict:
    from dpop.models import load_model

    model, _ = load_model(args.model)
    dims = model_dims(model)
    del model
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"engine": "matmul", "dims": dims.to_dict(), **measure_matmul(dims, tokens=args.tokens, device=device),
            "environment": _environment()}


def main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    runner = {"dpop": run_dpop, "trl": run_trl, "matmul": run_matmul}[args.engine]
    result = runner(args)
    print(json.dumps(result), flush=True)
