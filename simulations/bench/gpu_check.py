"""The LP-FT path on a GPU (or a CPU), end to end: accuracy, epsilon and examples per second.

Runs, on whatever device ``--device`` picks (``auto``: CUDA when present), with the
packaged model (``default``) and SST-2 by path:

1. a federated LP-FT run (``finetune = lora``: statistics round, DP head rounds,
   DP adapter rounds; every setting ``auto``) of ``--sites`` IID sites over the first
   ``--max-examples`` training sentences, at ``--epsilon``, through the real
   ClientApp on the local grid (:func:`simulations.bench.lpft_federated.run_arm`):
   its final dev accuracy, the largest site epsilon and its wall seconds;
2. the adapter phase's step on one site's cached states
   (:func:`fedseal.client.lora_round.lora_round`, in float32 on every device):
   examples per second of DP steps and of the same steps
   without noise or clipping, and their ratio.

Sized to finish within 8 minutes on one GPU with all of SST-2's 67,349 sentences::

    python -m simulations.bench.gpu_check --data ../shared/data/sst2 --json gpu.json

and to check the path on a CPU in a few minutes::

    python -m simulations.bench.gpu_check --data ../shared/data/sst2 --max-examples 800 \\
        --sites 2 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from simulations.bench.report import emit_report, setup_bench_logging

DEFAULT_EXAMPLES = 67_349  # all of SST-2's training sentences


def step_speed(
    data_dir: Path, examples: int, steps: int, device: torch.device, model_name: str = "default"
) -> dict[str, Any]:
    """Examples per second of the adapter phase's DP step and of a plain one, on ``device``."""
    from fedseal.client.lora_round import lora_round
    from fedseal.common.batches import encode
    from fedseal.common.buckets import size_bucket
    from fedseal.common.config import FedConfig
    from fedseal.common.data import read_examples
    from fedseal.common.hidden_cache import compute_hidden
    from fedseal.common.lora_rule import lora_recipe
    from fedseal.common.model import build_model, load_tokenizer
    from fedseal.common.phases import Phase
    from fedseal.common.top_layers import adapted_layers, encoder_layers

    cfg = FedConfig(model=model_name, finetune="lora", labels=("0", "1"))
    train = read_examples(data_dir / "train.tsv", label_names=cfg.labels)
    train = train.subset(range(min(examples, len(train))))
    data = encode(load_tokenizer(cfg), train, cfg.max_length)
    model = build_model(cfg, cfg.labels).to(device)
    cut = len(encoder_layers(model.backbone)) - adapted_layers(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    hidden = compute_hidden(model, data, cut, device)
    cache_seconds = time.perf_counter() - started
    recipe = lora_recipe(size_bucket(len(train)), 1, steps_per_round=steps)
    out: dict[str, Any] = {
        "examples": len(train),
        "expected_batch": recipe.expected_batch,
        "steps": steps,
        "cache_seconds": round(cache_seconds, 2),
    }
    warm_up = dataclasses.replace(recipe, steps_per_round=1)
    for arm, sigma in (("dp", 1.0), ("nonprivate", None)):

        def phase(n: int, sigma: float | None = sigma) -> Phase | None:
            return Phase(sigma, recipe.sample_rate, n) if sigma is not None else None

        lora_round(model, hidden, data.tensors[2], warm_up, phase(1), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        lora_round(model, hidden, data.tensors[2], recipe, phase(steps), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        out[f"{arm}_examples_per_second"] = round(steps * recipe.sample_rate * len(train) / seconds, 1)
    out["dp_slowdown"] = round(out["nonprivate_examples_per_second"] / out["dp_examples_per_second"], 3)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts; the report."""
    from fedseal.common.model import pick_device
    from simulations.bench.lpft_federated import run_arm

    device = pick_device(args.device)
    report: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        run_result = run_arm(
            "lpft",
            args.data,
            Path(tmp),
            examples=args.max_examples,
            sites=args.sites,
            rounds=args.rounds,
            epsilon=args.epsilon,
            model=args.model,
            device=args.device,
        )
    report.update(
        {
            "accuracy": run_result["accuracy"],
            "epsilon": run_result["epsilon"],
            "accuracy_per_round": run_result["accuracy_per_round"],
            "federated_seconds": run_result["seconds"],
        }
    )
    report["adapter_step"] = step_speed(
        args.data, min(args.max_examples, args.speed_examples), args.steps, device, args.model
    )
    report["examples_per_second"] = report["adapter_step"]["dp_examples_per_second"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print the JSON (and write it with ``--json``)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--max-examples", type=int, default=DEFAULT_EXAMPLES, help="training sentences the federation shares"
    )
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="LP-FT's rounds (>= 3)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=10, help="timed adapter steps per arm")
    parser.add_argument(
        "--speed-examples", type=int, default=16_384, help="sentences the step timing samples from"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    setup_bench_logging(args.log_level)
    report = run(args)
    if args.json:
        emit_report(report, args.json, quiet=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
