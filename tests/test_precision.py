"""bf16 on CPU (dpop.precision): autocast over fp32 weights, with attention routed through fp32."""

import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpop.data import load_pairs
from dpop.precision import FP32_ATTENTION, prepare_model
from dpop.training.loop import train


class AttentionDtypes(TorchDispatchMode):
    """Records the query dtype of every attention kernel call, as dispatched (after autocast)."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_on_cpu_runs_attention_in_fp32_with_the_same_logits(tiny_model_dir):
    from dpop.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    plain, _ = load_model(str(tiny_model_dir))
    prepare_model(model, "bf16", "cpu")
    assert model.config._attn_implementation == FP32_ATTENTION
    assert next(model.parameters()).dtype == torch.float32  # the weights stay fp32: autocast rounds copies
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with AttentionDtypes() as ours_seen:
            ours = model(ids).logits.float()
        with AttentionDtypes() as plain_seen:
            theirs = plain(ids).logits.float()
    assert ours_seen.dtypes == {torch.float32}  # the attention kernel itself, after autocast, ran in fp32
    assert plain_seen.dtypes == {torch.bfloat16}  # what autocast does to plain sdpa
    assert torch.allclose(ours, theirs, atol=0.05)  # the same model; only the attention arithmetic differs


def test_the_fp32_attention_keeps_a_left_padding_mask(tiny_model_dir):
    """transformers builds no mask for an attention name its mask registry lacks: the wrapper must bring sdpa's,
    or left-padded rows (batched generation) attend to their padding."""
    from dpop.models import load_model
    from dpop.precision import fp32_attention_scope, use_fp32_attention

    model, _ = load_model(str(tiny_model_dir))
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with fp32_attention_scope():
            use_fp32_attention(model)
            ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(ours[:, 3:], expected[:, 3:], atol=1e-5)  # every real token, the padded row's included


def test_fp32_leaves_attention_alone(tiny_model_dir):
    from dpop.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    prepare_model(model, "fp32", "cpu")
    assert model.config._attn_implementation == "sdpa"


def test_a_bf16_run_saves_a_model_that_names_standard_attention(tiny_config):
    config = tiny_config("bf16", precision="bf16", max_steps=2, learning_rate=1e-3)
    train(config)
    saved = (Path(config.output_dir) / "final" / "config.json").read_text()
    assert FP32_ATTENTION not in saved


# --- bf16-sr: stochastic rounding by a fixed dither -------------------------------------------------------

def _grid_neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above (in magnitude) each fp32 value: truncation and truncation + 1 step."""
    bits = values.contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32), (bits + 65536).view(torch.float32)


def test_rounding_a_dithered_weight_is_stochastic_rounding_of_the_weight():
    from dpop.precision import _thresholds, stochastic_round_bf16

    torch.manual_seed(0)
    master = torch.randn(200_000) * 0.05
    rounded = stochastic_round_bf16(master, _thresholds("w", master.numel(), seed=0, device="cpu")).float()
    low, high = _grid_neighbours(master)
    assert bool(((rounded == low) | (rounded == high)).all())  # one of the two neighbours, never further
    step = (high - low).abs()
    # unbiased: the rounding errors, in units of each value's bf16 step, average to 0 (sd of the mean ~0.0006)
    assert abs(float(((rounded - master) / step).mean())) < 0.005
    # and not round-to-nearest: of values a quarter step above the grid, about a quarter go up (nearest: none)
    quarter = low + step / 4 * torch.sign(master)
    rounded = stochastic_round_bf16(quarter, _thresholds("w", master.numel(), seed=0, device="cpu")).float()
    assert 0.24 < float((rounded != low).float().mean()) < 0.26


def test_dither_keeps_grid_values_zeros_and_infinities_and_comes_off_exactly():
    from dpop.precision import _thresholds, dither_bf16_

    values = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 3.0e38, 1e-39])
    offsets = _thresholds("w", values.numel(), seed=3, device="cpu")
    dithered = values.clone()
    dither_bf16_(dithered, offsets)
    assert torch.equal(dithered.bfloat16(), values.bfloat16())  # grid values round back to themselves
    assert torch.equal(dithered[[0, 1, 7]], values[[0, 1, 7]])  # zeros and tiny values are left alone
    assert torch.equal(torch.signbit(dithered), torch.signbit(values))
    dither_bf16_(dithered, offsets, remove=True)
    assert torch.equal(dithered.view(torch.int32), values.view(torch.int32))  # the same bits back
    torch.manual_seed(0)
    random = torch.randn(10_000)
    offsets = _thresholds("w", random.numel(), seed=3, device="cpu")
    moved = random.clone()
    dither_bf16_(moved, offsets)
    assert not torch.equal(moved, random)
    low, high = _grid_neighbours(random)
    # within half a bf16 step (of the next binade's step where the offset crosses a power of 2)
    assert bool(((moved - random).abs() <= (high - low).abs()).all())
    assert float(((moved - random).abs() / (high - low).abs()).max()) > 0.45
    dither_bf16_(moved, offsets, remove=True)
    assert torch.equal(moved.view(torch.int32), random.view(torch.int32))


def test_dither_offsets_are_a_function_of_seed_and_name():
    from dpop.precision import _thresholds

    first = _thresholds("layers.0.weight", 1000, seed=0, device="cpu")
    assert torch.equal(first, _thresholds("layers.0.weight", 1000, seed=0, device="cpu"))
    assert not torch.equal(first, _thresholds("layers.0.weight", 1000, seed=1, device="cpu"))
    assert not torch.equal(first, _thresholds("layers.1.weight", 1000, seed=0, device="cpu"))
    assert -32767 <= int(first.min()) and int(first.max()) <= 32767
    assert abs(float(first.float().mean()) / 2 ** 16) < 0.03  # centred: all 16 bits random, the top one too


def test_bf16_weights_move_as_the_fp32_weights_do():
    """An fp32 update of a quarter step moves its bf16 cast with probability 1/4: the bf16 weights' total change
    equals the fp32 weights', and weights that did not move keep their bf16 value (no re-draw noise)."""
    from dpop.precision import DitheredWeights

    torch.manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(100_000) * 0.05).bfloat16().float())  # on the grid, like the builtin
    start = weight.detach().clone()
    DitheredWeights([("w", weight)], seed=0)
    assert torch.equal(weight.bfloat16().float(), start)  # grid values round to themselves: step 0 is exact
    low, high = _grid_neighbours(start)
    step = (high - low).abs()
    moved = torch.zeros_like(start, dtype=torch.bool)
    moved[:50_000] = True
    with torch.no_grad():
        weight.add_(torch.where(moved, step / 4 * torch.sign(start), 0.0))
    change = (weight.bfloat16().float() - start).abs() / step
    assert bool((change[~moved] == 0).all())
    assert 0.23 < float(change[moved].mean()) < 0.27  # a quarter step on average, whole steps each


def test_masters_takes_the_dither_off_and_puts_it_back():
    from dpop.precision import DitheredWeights

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    original = layer.weight.detach().clone()
    weights = DitheredWeights(layer.named_parameters(), seed=0)
    dithered = layer.weight.detach().clone()
    assert not torch.equal(dithered, original)
    with weights.masters():
        assert torch.equal(layer.weight, original)  # what checkpoints and final/ hold
    assert torch.equal(layer.weight, dithered)


def test_update_ratio_tells_a_dead_zone_from_a_followed_update():
    """bf16 autocast over grid weights: a tiny update changes no rounded value (ratio ~0); bf16-sr: ratio ~1."""
    from dpop.precision import trained_weights

    torch.manual_seed(0)
    for precision, low, high in (("bf16", 0.0, 0.1), ("bf16-sr", 0.8, 1.2), ("fp32", 0.999, 1.001)):
        layer = torch.nn.Linear(256, 256)
        with torch.no_grad():
            layer.weight.copy_(layer.weight.bfloat16().float())
        weights = trained_weights(layer, precision, seed=0)
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        layer.weight.grad = torch.full_like(layer.weight, -1e-5)  # 1e-5: well under half a bf16 step of ~0.03
        layer.bias.grad = torch.zeros_like(layer.bias)
        before = weights.sample()
        optimizer.step()
        ratio = weights.update_metrics(before)["precision/update_ratio"]
        assert low <= ratio <= high, (precision, ratio)


def test_dead_zone_watch_fires_once_after_a_window_of_stuck_steps():
    from dpop.training.monitor import DeadZoneWatch

    watch = DeadZoneWatch("bf16", window=3)
    stuck = {"lr": 1e-6, "precision/update_ratio": 0.01, "precision/updated_frac": 0.004}
    assert watch.update(1, stuck) is None and watch.update(2, {**stuck, "lr": 0.0}) is None  # lr 0: no streak
    assert watch.update(3, stuck) is None and watch.update(4, stuck) is None
    message = watch.update(5, stuck)
    assert message and "bf16-sr" in message and "dead zone" in message and watch.fired_at == 5
    assert watch.update(6, stuck) is None  # once
    followed = DeadZoneWatch("bf16-sr", window=3)
    assert all(followed.update(s, {**stuck, "precision/update_ratio": 1.0}) is None for s in range(10))


def test_a_bf16_run_on_grid_weights_warns_of_the_dead_zone_and_bf16_sr_does_not(tiny_config, tmp_path, capsys):
    from dpop.models import load_model
    from dpop.precision import round_to_bf16_grid_

    model, tokenizer = load_model(tiny_config().model)
    round_to_bf16_grid_(model)
    model.save_pretrained(tmp_path / "grid")
    tokenizer.save_pretrained(tmp_path / "grid")
    fired = {}
    for precision in ("bf16", "bf16-sr"):
        config = tiny_config(precision, model=str(tmp_path / "grid"), precision=precision, max_steps=6,
                             learning_rate=1e-7, scheduler="constant")
        summary = train(config).summary
        fired[precision] = summary["precision_watch_fired_at"]
        rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
        ratios = [row["precision/update_ratio"] for row in rows if row["split"] == "train"]
        assert all((r < 0.1) if precision == "bf16" else (0.5 < r < 2) for r in ratios), (precision, ratios)
    assert fired == {"bf16": 5, "bf16-sr": None}
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("dead zone") == 1  # the bf16 run's warning, once


def test_bf16_sr_scoring_follows_fp32_where_round_to_nearest_erases_a_fine_tune(tiny_model_dir, eval_pairs_file):
    """A 'fine-tune' of grid weights by a third of a bf16 step each: fp32 scoring sees it, plain bf16 scoring
    rounds every weight back to where it started, bf16-sr scoring (dithered) sees it again on average; the
    weights are left as they were."""
    from dpop.evaluation.evaluate import evaluate_model
    from dpop.models import load_model
    from dpop.precision import round_to_bf16_grid_

    model, tokenizer = load_model(str(tiny_model_dir))
    round_to_bf16_grid_(model)
    start, _ = load_model(str(tiny_model_dir))
    round_to_bf16_grid_(start)
    pairs = load_pairs(eval_pairs_file).pairs
    texts = [pair.prompt[-1]["content"] + " " + pair.chosen[-1]["content"] for pair in pairs]
    ids = torch.tensor([tokenizer(text)["input_ids"][:48] for text in texts if len(tokenizer(text)["input_ids"]) >= 48])
    model(input_ids=ids, labels=ids).loss.backward()  # the direction that makes these answers more likely
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):  # the linear layers: used only through autocast's bf16 casts
                low, high = _grid_neighbours(parameter.detach())
                parameter.sub_((high - low).abs() / 3 * torch.sign(parameter.grad))  # a third of a bf16 step each
            parameter.grad = None
    tuned = {name: p.detach().clone() for name, p in model.named_parameters()}
    score = lambda m, precision: evaluate_model(m, tokenizer, pairs, generate=False, precision=precision,
                                                max_length=256)["logps/chosen"]
    fp32, start_fp32 = score(model, "fp32"), score(start, "fp32")
    plain, sr = score(model, "bf16"), score(model, "bf16-sr")
    effect = abs(fp32 - start_fp32)
    assert effect > 0.05, effect  # the fine-tune changes what the model says
    assert abs(plain - score(start, "bf16")) < 0.05 * effect  # round-to-nearest erased it (but where a weight
    # crossed a power of 2, whose smaller step the third of a step exceeds by half)
    assert abs(sr - fp32) < 0.5 * effect, (sr, fp32, start_fp32)  # bf16-sr keeps it
    assert all(torch.equal(p, tuned[name]) for name, p in model.named_parameters())  # the dither came off
