"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def make_tiny_bert(path: Path) -> Path:
    """Save a 2-layer, 32-wide random BERT with a word-level vocabulary to ``path``.

    The vocabulary is the synthetic task's words (plus BERT's special tokens), so
    the whole model has about 30k parameters: small enough to fine-tune in full
    under DP-SGD in seconds.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from fedseal.common import synthetic

    path.mkdir(parents=True, exist_ok=True)
    words = sorted(set(synthetic.POSITIVE + synthetic.NEGATIVE + synthetic.FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Put the root logger back after each test.

    A test that runs a command's ``main`` installs its console handler on the
    stderr pytest captured for that test; left in place, every later log record
    goes to that closed stream ("Logging error ... I/O operation on closed file").
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Path of a tiny random BERT (a local model folder, as a user would pass)."""
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture
def tiny_lpft(tiny_bert):
    """Factory: the tiny probe model with LoRA in its top layer (of 2), in eval mode, and 7
    encoded texts (3 labels). ``trained=True`` moves the adapters, the head and the feature
    mean off their initial values, as after some rounds."""
    import torch

    from fedseal.common.batches import encode
    from fedseal.common.config import FedConfig
    from fedseal.common.data import Examples
    from fedseal.common.model import build_model, load_tokenizer
    from fedseal.common.top_layers import add_top_lora

    labels = ("negative", "positive", "neutral")
    texts = [
        "a good film",
        "a bad plot and slow",
        "fine",
        "great great acting",
        "dull",
        "the plot was slow and the acting was bad",
        "good",
    ]

    def make(trained: bool = True):
        cfg = FedConfig(model=tiny_bert, labels=labels)
        torch.manual_seed(0)
        model = add_top_lora(build_model(cfg, cfg.labels), layers=1, rank=4, alpha=8)
        if trained:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name or "classifier" in name:
                        p.normal_(0, 0.5)
                    elif "feature_mean" in name:
                        p.normal_(0, 0.05)
        data = encode(load_tokenizer(cfg), Examples(texts, [0, 1, 2, 0, 1, 1, 0], labels, "t"), 16)
        return model.eval(), data

    return make


@pytest.fixture(scope="session")
def sst2() -> Path:
    """The shared SST-2 folder, or skip when it is not beside the project."""
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {SST2} (expected ../shared/data/sst2 from the project root)")
    return SST2
