"""The weights digests that name cached features and hidden states (common/digests.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedseal.common import digests


def _module() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    m[0].requires_grad_(False)  # frozen, as the encoder below the adapters
    return m


def test_the_digest_format_is_fixed():
    """A known answer (sha256 over "fedseal.weights.v1\\0", then per tensor its name, NUL, its
    shape, NUL and the sha256 of its float32 values): a change of the encoding renames every
    cache file, so it must be deliberate."""
    named = [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.tensor([1, 2], dtype=torch.int64))]
    assert digests.weights_digest(named) == "102c543e697b48bf5b6b878d037b2d86addf3f4ff3d6cf7d0e0dc8055e797ea6"


def test_a_frozen_tensor_is_hashed_once_and_again_only_when_it_changes(monkeypatch):
    m = _module()
    calls = []
    real = digests._values_digest
    monkeypatch.setattr(digests, "_values_digest", lambda t: calls.append(t) or real(t))
    first = digests.weights_digest(m.named_parameters())
    assert len(calls) == 4
    assert digests.weights_digest(m.named_parameters()) == first
    assert len(calls) == 6  # the trainable layer's two tensors again, the frozen ones kept
    with torch.no_grad():
        m[0].weight.mul_(2.0)  # in place: a new version
    assert digests.weights_digest(m.named_parameters()) != first
    with torch.no_grad():
        m[0].weight.div_(2.0)
        m[1].weight.add_(1.0)  # a trainable tensor changes too
    changed = digests.weights_digest(m.named_parameters())
    assert changed != first and len(calls) == 12  # 4, then 2, then the changed weight and 2, twice


def test_a_working_copy_takes_its_frozen_digests_from_its_source(monkeypatch):
    m = _module()
    before = digests.weights_digest(m.named_parameters())
    calls = []
    real = digests._values_digest
    monkeypatch.setattr(digests, "_values_digest", lambda t: calls.append(t) or real(t))
    for _ in range(3):
        working = copy.deepcopy(m)
        digests.inherit(m, working)
        assert digests.weights_digest(working.named_parameters()) == before
    assert len(calls) == 3 * 2  # only the trainable layer, each time
    with torch.no_grad():
        working[0].bias.add_(1.0)  # the copy's own frozen tensor changed: hashed afresh
    assert digests.weights_digest(working.named_parameters()) != before
    assert digests.weights_digest(m.named_parameters()) == before  # the source did not


def test_inherit_refuses_a_module_that_is_not_a_copy():
    m = _module()
    other = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3))
    try:
        digests.inherit(m, other)
    except ValueError as exc:
        assert "is not a copy of" in str(exc)
    else:
        raise AssertionError("a module of another shape was taken for a copy")


def test_a_tensor_changed_while_it_is_hashed_is_not_remembered(monkeypatch):
    m = _module()
    weight = m[0].weight
    real = digests._values_digest

    def changing(t):
        out = real(t)
        if t is weight:
            with torch.no_grad():
                weight.add_(1.0)  # written by another thread meanwhile
        return out

    monkeypatch.setattr(digests, "_values_digest", changing)
    digests.values_digest(weight)
    monkeypatch.setattr(digests, "_values_digest", real)
    assert digests.values_digest(weight) == real(weight)  # hashed afresh, not the old digest
