"""The hidden-state cache below the adapters and the top layers run on it (common/hidden_cache.py,
common/top_layers.py): the same logits as the whole model, keyed by what they depend on."""

from __future__ import annotations

import logging

import pytest
import torch

from fedseal.common import hidden_cache
from fedseal.common.batches import encode
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples
from fedseal.common.hidden_cache import HiddenStates, compute_hidden, hidden_key, hidden_states, length_chunks
from fedseal.common.model import ModelError, build_model, load_tokenizer
from fedseal.common.top_layers import TopStack, adapted_layers, add_top_lora

CPU = torch.device("cpu")
LABELS = ("negative", "positive", "neutral")
TEXTS = ["a good film", "a bad plot and slow", "fine"]


def test_the_adapters_sit_in_the_top_layers_only_and_start_as_the_identity(tiny_bert, tiny_lpft):
    model, data = tiny_lpft(trained=False)
    assert adapted_layers(model) == 1
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(".layer.1." in n for n in lora)
    travelling = [
        n.split("base_model.model.")[-1]
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    ]
    assert travelling == ["feature_mean", "classifier.weight", "classifier.bias"]
    probe = build_model(FedConfig(model=tiny_bert, labels=LABELS), LABELS).eval()
    with torch.no_grad():
        probe.classifier.weight.normal_()
        model.classifier.weight.copy_(probe.classifier.weight)
        before = probe(input_ids=data.tensors[0], attention_mask=data.tensors[1]).logits
        after = model(input_ids=data.tensors[0], attention_mask=data.tensors[1]).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_bad_adapter_settings_name_what_to_change(tiny_bert):
    cfg = FedConfig(model=tiny_bert, labels=LABELS)
    with pytest.raises(ModelError, match="between 1 and the encoder's 2 layers"):
        add_top_lora(build_model(cfg, cfg.labels), layers=3, rank=4, alpha=8)
    with pytest.raises(ModelError, match=r"\['qkv'\] match no linear layer"):
        add_top_lora(build_model(cfg, cfg.labels), layers=1, rank=4, alpha=8, targets=("qkv",))


@pytest.mark.parametrize("storage, tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_the_top_layers_on_cached_states_give_the_whole_models_logits(tiny_lpft, storage, tolerance):
    model, data = tiny_lpft()
    hidden = compute_hidden(model, data, cut=1, device=CPU, storage=storage)
    assert hidden.states.dtype == storage
    # only the real tokens are kept
    assert hidden.states.shape[0] == int(data.tensors[1].sum()) < data.tensors[1].numel()
    stack = TopStack(model, cut=1)
    index = torch.tensor([6, 0, 5, 2])
    with torch.no_grad():
        mine = stack(*hidden.batch(index, CPU))
        whole = model(input_ids=data.tensors[0][index], attention_mask=data.tensors[1][index]).logits
    assert torch.allclose(mine, whole, atol=tolerance), (mine - whole).abs().max()


def test_chunks_cover_each_example_once_within_the_token_budget():
    lengths = torch.tensor([5, 1, 9, 3, 3, 7, 2, 8])
    index = torch.tensor([0, 2, 3, 4, 5, 7])
    chunks = list(length_chunks(lengths, index, max_tokens=16))
    assert sorted(torch.cat(chunks).tolist()) == sorted(index.tolist())
    assert all(len(c) * int(lengths[c].max()) <= 16 for c in chunks)
    assert [lengths[c].tolist() for c in chunks] == [[3, 3, 5], [7, 8], [9]]
    assert list(length_chunks(lengths, torch.tensor([2]), max_tokens=4))[0].tolist() == [2]
    assert list(length_chunks(lengths, torch.tensor([], dtype=torch.long), max_tokens=4)) == []


def test_the_cache_is_keyed_by_the_frozen_layers_and_the_texts(tiny_bert, tiny_lpft, tmp_path, monkeypatch):
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    model, data = tiny_lpft()
    first = hidden_states(model, data, 1, CPU, tmp_path)
    files = list(tmp_path.glob("hidden-*.npz"))
    assert [f.name for f in files] == [f"hidden-{hidden_key(model, data, 1)}.npz"]
    assert hidden_states(model, data, 1, CPU, tmp_path) is first  # the process's memory
    backbone = model.backbone
    key = hidden_key(model, data, 1)
    with torch.no_grad():  # the adapted layer and the adapters do not change the cached states
        backbone.encoder.layer[1].output.dense.weight.mul_(2.0)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(1.0)
    assert hidden_key(model, data, 1) == key
    other = encode(
        load_tokenizer(FedConfig(model=tiny_bert)), Examples(TEXTS[:3], [0, 1, 2], LABELS, "t"), 16
    )
    assert hidden_key(model, other, 1) != key
    assert hidden_key(model, data, 1, torch.float32) != key
    with torch.no_grad():  # a frozen layer below the cut does
        backbone.encoder.layer[0].output.dense.weight.mul_(2.0)
    assert hidden_key(model, data, 1) != key


def test_a_cache_file_is_read_back_and_a_damaged_one_recomputed(tiny_lpft, tmp_path, monkeypatch, caplog):
    model, data = tiny_lpft()
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    first = hidden_states(model, data, 1, CPU, tmp_path)
    path = next(tmp_path.glob("hidden-*.npz"))
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    monkeypatch.setattr(hidden_cache, "compute_hidden", lambda *a, **k: pytest.fail("recomputed"))
    again = hidden_states(model, data, 1, CPU, tmp_path)
    assert torch.equal(again.states, first.states) and torch.equal(again.lower, first.lower)
    monkeypatch.undo()
    path.write_bytes(b"not a cache")
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    with caplog.at_level(logging.WARNING, logger="fedseal.common.hidden_cache"):
        third = hidden_states(model, data, 1, CPU, tmp_path)
    assert "unreadable" in caplog.text
    assert torch.equal(third.states, first.states)


def test_a_cache_that_does_not_fit_its_data_is_not_used(tiny_lpft, tmp_path, monkeypatch, caplog):
    import numpy as np

    model, data = tiny_lpft()
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    first = hidden_states(model, data, 1, CPU, tmp_path)
    path = next(tmp_path.glob("hidden-*.npz"))
    offsets = first.offsets.numpy().copy()
    offsets[1] += 1  # one example a token longer than its mask says
    with path.open("wb") as fh:
        np.savez(fh, states=first.states.numpy(), offsets=offsets, lower=first.lower.numpy())
    monkeypatch.setattr(hidden_cache, "_MEMORY", type(hidden_cache._MEMORY)())
    with caplog.at_level(logging.WARNING, logger="fedseal.common.hidden_cache"):
        again = hidden_states(model, data, 1, CPU, tmp_path)
    assert "does not fit" in caplog.text
    assert torch.equal(again.offsets, first.offsets)


def test_batches_pad_each_example_back_on_the_right():
    hidden = HiddenStates(
        states=torch.arange(12, dtype=torch.float16).reshape(6, 2),
        offsets=torch.tensor([0, 1, 4, 6]),
        lower=torch.eye(3),
        cut=1,
    )
    states, mask, lower = hidden.batch(torch.tensor([2, 0, 1]), CPU)
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert states[0].tolist() == [[8, 9], [10, 11], [0, 0]]
    assert states[2].tolist() == [[2, 3], [4, 5], [6, 7]]
    assert states.dtype == torch.float32 and lower.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
