"""LoRA adapters in an encoder's top layers, and those layers run alone on cached states.

LP-FT (a linear probe, then fine-tuning from it; Kumar et al. 2022, "Fine-Tuning
can Distort Pretrained Features"; under DP, Ke et al. 2024) starts from the probe's
model, :class:`~fedseal.common.modeling_fedseal.FedsealForSequenceClassification`,
and adds LoRA adapters (Hu et al. 2021; under DP, Yu et al. 2022) to the query and
value projections of its top ``layers`` layers only. The adapters start as the
identity (peft initialises ``B`` to zero), so the first adapter step starts
exactly from the probe's model, and the layers below them stay frozen: their
output is computed once per site (:mod:`fedseal.common.hidden_cache`) and
:class:`TopStack` runs only the adapted layers, the pooling and the head.

The model keeps the probe's head semantics (``features`` then ``standardise``
then ``classifier``), so the federation's probe head carries over unchanged, and
``save_merged`` writes a plain ``FedsealForSequenceClassification`` with the
adapters merged into its weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from fedseal.common.errors import ModelError
from fedseal.common.modeling_fedseal import FedsealForSequenceClassification, pooled_block

TRAVELLING = ("feature_mean", "classifier.weight", "classifier.bias")
"""The probe's parameters, which keep travelling (and stay trainable) beside the adapters."""


def fedseal_of(model: nn.Module) -> FedsealForSequenceClassification:
    """``model``, checked to be a ``FedsealForSequenceClassification`` (adapters or not)."""
    if not isinstance(model, FedsealForSequenceClassification):
        raise ModelError(
            f"expected fedseal's probe classifier (finetune=probe's model), got "
            f"{type(model).__name__}: LoRA in the top layers starts from the probe"
        )
    return model


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's Transformer layers (BERT-family layout: ``encoder.layer``).

    Raises
    ------
    ModelError
        If the backbone has no such list, or its positions are not absolute
        (relative or rotary positions enter every layer, so caching the states
        without their padding would not be exact).
    """
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(
            f"{type(backbone).__name__} has no encoder.layer list: LoRA in the top "
            "layers supports BERT-family encoders (BERT, RoBERTa, MiniLM, ELECTRA)"
        )
    kind = getattr(backbone.config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ModelError(
            f"{type(backbone).__name__} uses {kind!r} positions; LoRA in the top "
            "layers on cached states needs absolute position embeddings"
        )
    return layers


def add_top_lora(
    model: FedsealForSequenceClassification,
    layers: int,
    rank: int,
    alpha: int,
    targets: Sequence[str] = ("query", "value"),
) -> nn.Module:
    """``model`` itself, with LoRA adapters on ``targets`` in its top ``layers`` layers.

    The adapters are injected in place (peft's ``inject_adapter_in_model``), so
    every parameter keeps its name (``classifier.weight``, and
    ``backbone.encoder.layer.5.attention.self.query.lora_A.default.weight``).
    They start as the identity: the model computes what it computed before. The
    probe's parameters (:data:`TRAVELLING`) stay trainable, so they keep
    travelling with the adapters; :func:`merge_adapters` folds them back.

    Raises
    ------
    ModelError
        If ``layers`` is not between 1 and the encoder's depth, or no layer has
        a module named in ``targets``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    depth = len(encoder_layers(model.backbone))
    if not 1 <= layers <= depth:
        raise ModelError(f"lora layers must be between 1 and the encoder's {depth} layers, got {layers}")
    names = {name.split(".")[-1] for name, m in model.backbone.named_modules() if isinstance(m, nn.Linear)}
    if not set(targets) <= names:
        raise ModelError(
            f"lora-targets {sorted(set(targets) - names)} match no linear layer of "
            f"the encoder; its linear layers are named {sorted(names)}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        layers_to_transform=list(range(depth - layers, depth)),
        layers_pattern="layer",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in TRAVELLING or "lora_" in name)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every injected adapter merged into its layer's weight.

    The copy holds plain ``nn.Linear`` layers again, so it saves and loads as
    the model's own class (``from_pretrained``); ``model`` itself is unchanged.
    """
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.get_base_layer())
    return plain


def adapted_layers(model: nn.Module) -> int:
    """How many top layers carry adapters (0 for a model without any)."""
    layers = encoder_layers(fedseal_of(model).backbone)
    adapted = [
        i for i, layer in enumerate(layers) if any("lora_" in name for name, _ in layer.named_parameters())
    ]
    if adapted and adapted != list(range(adapted[0], len(layers))):
        raise ModelError(f"adapters sit in layers {adapted}, not in a run of top layers")
    return len(adapted)


class TopStack(nn.Module):
    """Layers ``cut..`` of a probe model, its pooling and its head, run on cached states.

    Shares its layers and head with ``model`` (training it trains the model).
    ``forward(states, mask, lower)`` takes what
    :meth:`~fedseal.common.hidden_cache.HiddenStates.batch` gives and returns
    the logits that ``model`` would compute from the token ids. The feature
    standardisation is read off ``model.standardise`` (an affine map, fixed
    while the adapters train): ``(f - m) / s = f * scale + shift``.
    """

    def __init__(self, model: nn.Module, cut: int) -> None:
        super().__init__()
        fedseal = fedseal_of(model)
        layers = encoder_layers(fedseal.backbone)
        if not 1 <= cut < len(layers) + 1:
            raise ModelError(f"cut {cut} is outside 1..{len(layers)}")
        self.layers = nn.ModuleList(layers[cut:])
        self.classifier = fedseal.classifier
        self.cut = cut
        self.pooled = list(fedseal.config.fedseal_layers)
        self.backbone_config = fedseal.backbone.config
        dim = fedseal.feature_mean.shape[0]
        with torch.no_grad():
            ref = fedseal.feature_mean
            self.shift = fedseal.standardise(torch.zeros(dim, device=ref.device, dtype=ref.dtype))
            self.scale = fedseal.standardise(torch.ones_like(self.shift)) - self.shift

    def features(self, states: torch.Tensor, mask: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """The model's pooled, unstandardised features (its ``features``)."""
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(
            config=self.backbone_config, inputs_embeds=states, attention_mask=mask
        )
        by_layer = {self.cut: states}
        for offset, layer in enumerate(self.layers, start=1):
            states = layer(states, attention)
            by_layer[self.cut + offset] = states
        width = states.shape[-1]
        blocks, taken = [], 0
        for layer in self.pooled:
            if layer <= self.cut:
                blocks.append(lower[:, taken : taken + width].to(states.dtype))
                taken += width
            else:
                blocks.append(pooled_block(by_layer[layer], mask))
        return torch.cat(blocks, dim=-1) / math.sqrt(len(self.pooled))

    def forward(self, states: torch.Tensor, mask: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """Logits of the model for cached ``states`` (see the class docstring)."""
        feats = self.features(states, mask, lower)
        return self.classifier(feats * self.scale.to(feats.dtype) + self.shift.to(feats.dtype))


__all__ = [
    "TRAVELLING",
    "TopStack",
    "adapted_layers",
    "add_top_lora",
    "encoder_layers",
    "fedseal_of",
    "merge_adapters",
]
