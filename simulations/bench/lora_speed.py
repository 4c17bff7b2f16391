"""How fast a DP step on top-layer adapters runs on a CPU site, against two baselines.

Usage (one thread, as a site on this shared machine would run)::

    python -m simulations.bench.lora_speed --data ../shared/data/sst2 --json OUT.json

All arms take the same Poisson-sized batches of the same sentences, each in
length-sorted chunks (:func:`fedseal.common.hidden_cache.length_chunks`), and
report examples per CPU-second (``time.process_time``) over ``--steps`` steps after
one warm-up step:

* ``cached_dp_<mode>``: DP-SGD (per-example clipping and noise, Opacus
  ``grad_sample_mode`` hooks, functorch or ghost) on LoRA in the top
  ``--layers`` layers plus the head's weights, from the cached states below them;
* ``cached_nonprivate``: the same layers and data, a plain step;
* ``all_layers_dp``: DP-SGD (the fastest mode above) with LoRA in every layer
  and no cache: the whole encoder runs forward and backward from the token ids.

Targets (issue 21): DP at most 1.5 times slower than the non-private step of
the same layers; the cached top layers at least 3 times faster than adapters in
every layer. The ``cache`` entry says what the cache costs and whether float16
storage is safe: build time, bytes as stored, as float32 and as padded float32,
and how far the top layers' features and logits from float16 states are from
those from float32 states.
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedseal.client.dp_step import MODES, PrivateSteps
from fedseal.client.lora_round import _losses, only_trained, trained_parameters
from fedseal.common.batches import model_inputs
from fedseal.common.hidden_cache import HiddenStates, compute_hidden, length_chunks
from fedseal.common.lora_rule import LAYERS, MAX_TOKENS
from fedseal.common.top_layers import TopStack
from simulations.bench.lora_setup import (
    common_arguments,
    depth,
    encoded,
    load_task,
    lpft_model,
    run_and_report,
)

log = logging.getLogger("fedseal.bench.lora_speed")

TARGETS = {"dp_slowdown_max": 1.5, "cache_speedup_min": 3.0}
CPU = torch.device("cpu")


def _perturb_adapters(model: nn.Module, seed: int) -> None:
    """Give the adapters' B matrices small random values, as after some training.

    At initialisation B is zero and A's gradients vanish; a trained model's
    step computes them all.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def timed(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor]) -> dict[str, float]:
    """Examples per CPU-second and per wall second of ``step`` over ``batches[1:]``."""
    step(batches[0])  # warm-up: allocations, Opacus's first hooks
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    examples = sum(len(b) for b in batches[1:])
    return {
        "examples_per_cpu_second": round(examples / cpu, 1),
        "examples_per_second": round(examples / wall, 1),
        "cpu_seconds": round(cpu, 2),
        "examples": examples,
    }


def cached_arm(
    model: nn.Module,
    hidden: HiddenStates,
    labels: torch.Tensor,
    batches: list[torch.Tensor],
    noise: float | None,
    mode: str,
) -> dict[str, float]:
    """Steps through the cached top layers (DP with ``noise``, or plain when None)."""
    stack = TopStack(model, hidden.cut).eval()
    params = trained_parameters(model)
    with only_trained(model, params):
        optimizer = torch.optim.SGD(params, lr=0.0)  # speed only: the weights stay
        with PrivateSteps(
            stack,
            params,
            optimizer,
            noise_multiplier=noise,
            clip=0.1,
            expected_batch=len(batches[0]),
            mode=mode,
        ) as runner:

            def step(index: torch.Tensor) -> None:
                runner.step(
                    [
                        functools.partial(_losses, stack, hidden, labels, chunk, CPU)
                        for chunk in hidden.chunks(index, MAX_TOKENS)
                    ]
                )

            return timed(step, batches)


def all_layers_arm(
    model: nn.Module, data, batches: list[torch.Tensor], noise: float, mode: str
) -> dict[str, float]:
    """DP steps with adapters in every layer, the whole encoder run from the token ids."""
    input_ids, mask, labels = data.tensors
    lengths = mask.sum(dim=1)
    params = trained_parameters(model)

    def losses(index: torch.Tensor) -> torch.Tensor:
        logits = model(**model_inputs(model, input_ids[index], mask[index], CPU)).logits
        return nn.functional.cross_entropy(logits, labels[index], reduction="none")

    model.eval()
    with only_trained(model, params):
        optimizer = torch.optim.SGD(params, lr=0.0)
        with PrivateSteps(
            model,
            params,
            optimizer,
            noise_multiplier=noise,
            clip=0.1,
            expected_batch=len(batches[0]),
            mode=mode,
        ) as runner:

            def step(index: torch.Tensor) -> None:
                runner.step(
                    [functools.partial(losses, chunk) for chunk in length_chunks(lengths, index, MAX_TOKENS)]
                )

            return timed(step, batches)


@torch.no_grad()
def storage_check(model: nn.Module, data, cut: int, sample: int) -> dict[str, Any]:
    """What float16 storage changes: the top layers' outputs from float16 against float32 states."""
    subset = torch.utils.data.TensorDataset(*(t[:sample] for t in data.tensors))
    started = time.process_time()
    half = compute_hidden(model, subset, cut, CPU, torch.float16)
    seconds = time.process_time() - started
    full = compute_hidden(model, subset, cut, CPU, torch.float32)
    stack = TopStack(model, cut).eval()
    index = torch.arange(len(subset))
    feats_half = stack.features(*half.batch(index, CPU))
    feats_full = stack.features(*full.batch(index, CPU))
    width = full.states.shape[1]
    return {
        "examples": len(subset),
        "build_cpu_seconds_per_1000": round(1000 * seconds / len(subset), 2),
        "mean_tokens": round(float(full.lengths.float().mean()), 1),
        "bytes_per_example": {
            "float16_real_tokens": round(half.nbytes / len(subset)),
            "float32_real_tokens": round(full.nbytes / len(subset)),
            "float32_padded": data.tensors[0].shape[1] * width * 4 + full.lower.shape[1] * 4,
        },
        "feature_max_abs_difference": float((feats_half - feats_full).abs().max()),
        "feature_norm": round(float(feats_full.norm(dim=1).mean()), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every arm, the cache check, the ratios and the targets."""
    torch.manual_seed(args.seed)
    train, _ = load_task(args.task, args.data, args.examples, args.seed)
    labels_names = train.label_names
    data = encoded(args.model, train)
    top = lpft_model(args.model, labels_names, args.layers)
    every = lpft_model(args.model, labels_names, depth(top))
    for model in (top, every):
        _perturb_adapters(model, args.seed)
    cut = depth(top) - args.layers
    hidden = compute_hidden(top, data, cut, CPU)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randperm(len(data), generator=gen)[: args.batch] for _ in range(args.steps + 1)]
    labels = data.tensors[2]
    arms: dict[str, dict[str, float]] = {}
    for mode in args.modes:
        log.info("cached top layers, DP, %s ...", mode)
        arms[f"cached_dp_{mode}"] = cached_arm(top, hidden, labels, batches, 1.0, mode)
    log.info("cached top layers, non-private ...")
    arms["cached_nonprivate"] = cached_arm(top, hidden, labels, batches, None, "hooks")
    fastest = max(args.modes, key=lambda m: arms[f"cached_dp_{m}"]["examples_per_cpu_second"])
    log.info("adapters in every layer, no cache, DP, %s ...", fastest)
    arms["all_layers_dp"] = all_layers_arm(every, data, batches, 1.0, fastest)
    speed = {name: arm["examples_per_cpu_second"] for name, arm in arms.items()}
    dp = speed[f"cached_dp_{fastest}"]
    ratios = {
        "dp_slowdown": round(speed["cached_nonprivate"] / dp, 3),
        "cache_speedup": round(dp / speed["all_layers_dp"], 3),
    }
    return {
        "fastest_mode": fastest,
        "ratios": ratios,
        "targets": {
            **TARGETS,
            "dp_slowdown_met": ratios["dp_slowdown"] <= TARGETS["dp_slowdown_max"],
            "cache_speedup_met": ratios["cache_speedup"] >= TARGETS["cache_speedup_min"],
        },
        "arms": arms,
        "cache": storage_check(top, data, cut, min(len(data), 1024)),
        "settings": {
            "task": args.task,
            "model": args.model,
            "examples": len(data),
            "batch": args.batch,
            "measured_steps": args.steps,
            "layers": args.layers,
            "cut": cut,
            "max_tokens_per_chunk": MAX_TOKENS,
            "seed": args.seed,
        },
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the arms, write and print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.lora_speed", description=__doc__.split("\n\n")[0]
    )
    common_arguments(parser)
    parser.add_argument("--examples", type=int, default=4096, help="sentences to draw batches from")
    parser.add_argument("--batch", type=int, default=1024, help="examples per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per arm")
    parser.add_argument("--layers", type=int, default=LAYERS, help="top layers with adapters")
    parser.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=list(MODES),
        help=f"Opacus grad_sample_modes to time, comma-separated ({MODES})",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes {unknown} are not among {MODES}")
    return run_and_report(args, run)


if __name__ == "__main__":
    sys.exit(main())
