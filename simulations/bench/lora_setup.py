"""What the LoRA benchmarks share: the tasks, the probe model with adapters, its cached states."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedseal.common.batches import encode
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples
from fedseal.common.lora_rule import ALPHA, RANK, TARGETS
from fedseal.common.model import build_model, load_tokenizer
from fedseal.common.top_layers import add_top_lora, encoder_layers, fedseal_of
from simulations.bench.report import emit_report, setup_bench_logging
from simulations.bench.topics import topic_examples
from simulations.bench.utility import read_split

TASKS = ("sst2", "topics")
MAX_LENGTH = 64


def load_task(task: str, data: Path | None, train_size: int, seed: int) -> tuple[Examples, Examples]:
    """(train, dev) examples of ``task``.

    ``sst2``: ``train_size`` training sentences drawn at random (seeded), the
    whole dev split. ``topics``: the seeded six-class topic task
    (:mod:`simulations.bench.topics`), ``train_size`` and 600 examples.
    """
    if task == "topics":
        return topic_examples(train_size, seed), topic_examples(600, seed + 1)
    if data is None:
        raise SystemExit(
            "--data (the SST-2 folder holding train.tsv and dev.tsv) is needed for the sst2 task"
        )
    train = read_split(data, "train")
    order = np.random.default_rng(seed).permutation(len(train))[:train_size]
    return train.subset(sorted(int(i) for i in order)), read_split(data, "dev")


def encoded(model_name: str, examples: Examples) -> TensorDataset:
    """``examples`` tokenised by ``model_name``'s tokenizer, padded to :data:`MAX_LENGTH`."""
    return encode(load_tokenizer(FedConfig(model=model_name)), examples, MAX_LENGTH)


def lpft_model(model_name: str, labels: tuple[str, ...], layers: int) -> torch.nn.Module:
    """The probe's classifier (frozen encoder, zero head) with LoRA in its top ``layers``."""
    probe = build_model(FedConfig(model=model_name, labels=labels), labels)
    return add_top_lora(probe, layers, RANK, ALPHA, TARGETS)


def depth(model: torch.nn.Module) -> int:
    """The encoder's number of layers."""
    return len(encoder_layers(fedseal_of(model).backbone))


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both LoRA benchmarks take: data, task, output, model, threads, seed, logging."""
    parser.add_argument("--data", type=Path, help="SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--task", choices=TASKS, default="sst2")
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Set up logging and threads, run, write and print the report; the exit status."""
    setup_bench_logging(args.log_level)
    torch.set_num_threads(args.threads)
    emit_report(run(args), args.json)
    return 0
