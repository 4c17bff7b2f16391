"""Tokenised tensors and model inputs shared by training and evaluation."""

from __future__ import annotations

import inspect
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseal.common.data import Examples


def encode(tokenizer, examples: Examples, max_length: int) -> TensorDataset:
    """(input_ids, attention_mask, label) tensors padded to ``max_length``."""
    enc = tokenizer(
        examples.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    labels = torch.tensor(examples.labels, dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


@lru_cache(maxsize=32)
def _accepted(forward_owner: type[torch.nn.Module]) -> frozenset[str]:
    return frozenset(inspect.signature(forward_owner.forward).parameters)


def _base_class(model: nn.Module) -> type:
    """Class of the outermost Hugging Face model inside Opacus/peft wrappers."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return type(module)
    return type(model)


def model_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """Inputs for one batch, trimmed to its longest sequence.

    ``position_ids`` and ``token_type_ids`` are passed explicitly with a real
    batch dimension when the model accepts them: otherwise BERT-family models in
    transformers 5 broadcast a ``(1, L)`` buffer, and Opacus's per-sample
    gradient hooks on the embeddings see a batch of 1 (the "stack expects each
    tensor to be equal size" failure of full fine-tuning).
    """
    if input_ids.shape[0] > 0:
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    batch, length = input_ids.shape
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    accepted = _accepted(_base_class(model))
    if "position_ids" in accepted:
        inputs["position_ids"] = torch.arange(length, device=device).repeat(batch, 1)
    if "token_type_ids" in accepted:
        inputs["token_type_ids"] = torch.zeros((batch, length), dtype=torch.long, device=device)
    return inputs


@torch.no_grad()
def predict(model: nn.Module, data: TensorDataset, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits of ``model`` on every example of ``data``, in order, on ``device``."""
    model.eval()
    logits = [
        model(**model_inputs(model, input_ids, attention_mask, device)).logits
        for input_ids, attention_mask, _ in DataLoader(data, batch_size=batch_size)
    ]
    return torch.cat(logits)


def evaluate(
    model: nn.Module, data: TensorDataset, *, batch_size: int, num_labels: int, device: torch.device
) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and macro-F1 of ``model`` on ``data``."""
    logits = predict(model, data, batch_size=batch_size, device=device)
    return scores_of(logits, data.tensors[2].to(device), num_labels)


@torch.no_grad()
def scores_of(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and macro-F1 of ``logits`` against ``labels``."""
    pred, gold = logits.argmax(dim=-1).cpu().numpy(), labels.cpu().numpy()
    return {
        "accuracy": float((pred == gold).mean()),
        "loss": float(nn.functional.cross_entropy(logits.float(), labels)),
        "macro_f1": macro_f1(gold, pred, num_labels),
    }


def macro_f1(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 (a class absent from both counts as F1 0)."""
    scores = []
    for c in range(num_labels):
        tp = float(np.sum((pred == c) & (gold == c)))
        fp = float(np.sum((pred == c) & (gold != c)))
        fn = float(np.sum((pred != c) & (gold == c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> list[list[int]]:
    """Counts ``m[g][p]`` of examples with gold label ``g`` predicted as ``p``."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return matrix.tolist()
