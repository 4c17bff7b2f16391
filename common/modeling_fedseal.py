"""fedseal's sequence classifier: a linear head over pooled states of several encoder layers.

This file is self-contained (torch and transformers only) because it is
copied beside every saved model, so that::

    AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True)

loads the model anywhere, without fedseal installed.

Features, for an encoder with hidden states ``h_0 .. h_L`` (embeddings, then
each layer):

1. for each layer ``l`` in ``config.fedseal_layers``: the attention-masked mean
   of ``h_l`` over the tokens, scaled to unit L2 norm (sentence encoders such as
   all-MiniLM-L6-v2 are trained with mean pooling; lower layers add what the
   last one no longer separates linearly);
2. those blocks concatenated and divided by ``sqrt(len(layers))``, so the
   feature vector has unit norm;
3. centred by ``feature_mean`` (estimated by the federation with differential
   privacy) and divided by ``sqrt(1 - |feature_mean|^2)``: since every feature
   vector has unit norm, that is the root of the mean squared distance to the
   mean, so the centred features have unit mean squared norm and gradient
   descent on the head is well conditioned whatever the encoder. The mean is
   first projected onto the unit ball, where the mean of unit vectors lies: the
   projection only brings a noisy estimate closer to the true mean, and a
   mean sent by a hostile server (say of norm 1e30) cannot blow the features up;
4. ``classifier``: a linear layer, zero-initialised.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

AUTO_CLASS = "modeling_fedseal.FedsealForSequenceClassification"
VARIANCE_FLOOR = 0.05  # never divide by less than sqrt of this (a noisy mean can overshoot)


def pooled_block(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One layer's attention-masked mean over the tokens, scaled to unit norm (step 1)."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return nn.functional.normalize(mean, dim=-1)


def pooled_features(
    hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """Unit-norm concatenation of per-layer, unit-norm masked mean pools (steps 1 and 2)."""
    blocks = [pooled_block(hidden_states[layer], attention_mask) for layer in layers]
    return torch.cat(blocks, dim=-1) / math.sqrt(len(layers))


class FedsealForSequenceClassification(PreTrainedModel):
    """Encoder (any ``AutoModel``) + normalised multi-layer mean pooling + linear head."""

    config_class = PretrainedConfig
    base_model_prefix = "backbone"  # not "encoder": BERT has a submodule of that name
    # The attention implementation is the backbone's business; declaring support
    # lets transformers pass the user's (or the default) choice through to it.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.backbone = AutoModel.from_config(config)
        layers = list(config.fedseal_layers)
        dim = config.hidden_size * len(layers)
        # Travels between server and sites with the head (so it is a parameter),
        # but is set by the federation's statistics round, never by gradients.
        self.feature_mean = nn.Parameter(torch.zeros(dim))
        if config.num_labels is None:
            raise ValueError("the model config has no num_labels")
        self.classifier = nn.Linear(dim, config.num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Leave weights as built: the backbone is loaded, the head starts at zero."""

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor
    ) -> torch.Tensor:
        """The pooled, unnormalised feature vector (steps 1 and 2)."""
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs
        )
        return pooled_features(out.hidden_states, attention_mask, list(self.config.fedseal_layers))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Centred and scaled features (step 3)."""
        mean = self.feature_mean.detach()
        mean = mean / mean.abs().amax().clamp(min=1.0)  # |mean|^2 must not overflow
        mean = mean / mean.norm().clamp(min=1.0)  # the projection onto the unit ball
        variance = (1.0 - mean.square().sum()).clamp(min=VARIANCE_FLOOR)
        return (features - mean) / variance.sqrt()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (steps 3 and 4)."""
        return self.classifier(self.standardise(features))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: torch.Tensor,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when ``labels`` are given)."""
        if input_ids is None:
            raise ValueError("FedsealForSequenceClassification needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.pop("return_dict", None)
        logits = self.head(self.features(input_ids, attention_mask, **kwargs))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
