"""Model factory and weight transport with a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedseal.client.trainer import train_local
from fedseal.common.batches import encode
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import recipe
from fedseal.common.model import ModelError, build_model, load_tokenizer, load_trainable, trainable_state
from fedseal.common.privacy import plan_site
from fedseal.common.records import (
    RecordError,
    flatten,
    record_to_state,
    state_to_record,
    to_numpy_state,
    unflatten,
)
from fedseal.common.synthetic import LABEL_NAMES, synthetic_examples


def test_lora_trains_only_adapters_in_the_top_layer_and_the_probes_head(tiny_bert):
    model = build_model(FedConfig(model=tiny_bert, finetune="lora"), LABEL_NAMES)
    names = list(trainable_state(model))
    adapters = [n for n in names if "lora_" in n]
    assert adapters and all(".layer.1." in n for n in adapters)  # of 2 layers: one stays cached
    assert sorted(set(names) - set(adapters)) == ["classifier.bias", "classifier.weight", "feature_mean"]
    full = build_model(FedConfig(model=tiny_bert, finetune="full"), LABEL_NAMES)
    assert len(trainable_state(full)) > len(names)


def test_state_round_trip_through_records(tiny_bert):
    model = build_model(FedConfig(model=tiny_bert, finetune="lora"), LABEL_NAMES)
    state = to_numpy_state(trainable_state(model))
    again = record_to_state(state_to_record(state), state)
    assert all(np.array_equal(state[k], again[k]) for k in state)
    np.testing.assert_array_equal(flatten(unflatten(flatten(state), state)), flatten(state))
    shifted = {k: v + 1 for k, v in state.items()}
    load_trainable(model, shifted)
    assert all(np.allclose(to_numpy_state(trainable_state(model))[k], shifted[k]) for k in state)


def test_wrong_shape_nan_and_foreign_weights_are_refused(tiny_bert):
    model = build_model(FedConfig(model=tiny_bert, finetune="lora"), LABEL_NAMES)
    state = to_numpy_state(trainable_state(model))
    key = next(iter(state))
    bad_shape = dict(state, **{key: np.zeros((3, 3), np.float32)})
    with pytest.raises(RecordError, match="has shape"):
        record_to_state(state_to_record(bad_shape), state)
    nan = dict(state, **{key: np.full_like(state[key], np.nan)})
    with pytest.raises(RecordError, match="NaN"):
        record_to_state(state_to_record(nan), state)
    with pytest.raises(ModelError, match="same model"):
        load_trainable(model, {"other": torch.zeros(1)})


def test_unknown_lora_target_lists_real_layer_names(tiny_bert):
    with pytest.raises(ModelError, match="match no linear layer.*'query'"):
        build_model(FedConfig(model=tiny_bert, finetune="lora", lora_targets=("q_proj",)), LABEL_NAMES)


def test_dp_sgd_step_changes_weights(tiny_bert):
    """Full fine-tuning of BERT under Opacus used to fail in per-sample hooks (LoRA's adapter
    steps: tests/test_lora_round.py)."""
    cfg = FedConfig(model=tiny_bert, finetune="full", local_steps=2, batch_size=8, lr=1e-2)
    model = build_model(cfg, LABEL_NAMES)
    before = to_numpy_state(trainable_state(model))
    data: TensorDataset = encode(load_tokenizer(cfg), synthetic_examples(64, seed=0), 32)
    plan = plan_site(64, batch_size=8, steps=2, epsilon=8, delta=1e-3, accountant="rdp")  # a bucket
    result = train_local(model, data, cfg, recipe(cfg, 64), plan, torch.device("cpu"))
    after = to_numpy_state(trainable_state(model))
    assert result.steps == 2
    assert any(not np.allclose(before[k], after[k]) for k in before)
