"""Data readers: formats, columns, labels, and every error a user can hit."""

from __future__ import annotations

import json

import pytest

from fedseal.common.data import DataError, read_examples, write_examples


def _write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_reads_tsv_csv_jsonl_alike(tmp_path):
    tsv = _write(tmp_path / "a.tsv", 'label\tsentence\n1\tit \'s "great"\n0\tdull , flat\n')
    csv_ = _write(tmp_path / "a.csv", 'label,sentence\n1,"it \'s ""great"""\n0,"dull , flat"\n')
    jsonl = _write(
        tmp_path / "a.jsonl",
        json.dumps({"label": 1, "sentence": 'it \'s "great"'})
        + "\n\n"
        + json.dumps({"label": "0", "sentence": "dull , flat"})
        + "\n",
    )
    results = [read_examples(p) for p in (tsv, csv_, jsonl)]
    for ex in results:
        assert ex.texts == ['it \'s "great"', "dull , flat"]
        assert ex.labels == [1, 0]
        assert ex.label_names == ("0", "1")


def test_configurable_columns_and_string_labels(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"body": "refund please", "topic": "billing"},
                {"body": "app crashes", "topic": "bug"},
                {"body": "charged twice", "topic": "billing"},
            ]
        ),
    )
    ex = read_examples(path, text_column="body", label_column="topic")
    assert ex.label_names == ("billing", "bug")
    assert ex.labels == [0, 1, 0]
    assert ex.label_counts() == {"billing": 2, "bug": 1}


def test_numeric_labels_sort_numerically(tmp_path):
    rows = "label\tsentence\n" + "".join(f"{n}\tx{n}\n" for n in (10, 2, 1))
    assert read_examples(_write(tmp_path / "n.tsv", rows)).label_names == ("1", "2", "10")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.tsv")


def test_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="unknown format '.txt'"):
        read_examples(_write(tmp_path / "a.txt", "x"))


def test_missing_column_lists_the_columns(tmp_path):
    path = _write(tmp_path / "a.tsv", "label\ttext\n1\thello\n")
    with pytest.raises(DataError, match=r"no column 'sentence'.*\['label', 'text'\].*--text-column"):
        read_examples(path)


@pytest.mark.parametrize("content", ["", "label\tsentence\n", "\n\n"])
def test_empty_file(tmp_path, content):
    with pytest.raises(DataError, match="no examples"):
        read_examples(_write(tmp_path / "e.tsv", content))


def test_empty_jsonl(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_examples(_write(tmp_path / "e.jsonl", "\n"))


def test_unknown_label_against_the_federation_label_set(tmp_path):
    path = _write(tmp_path / "a.tsv", "label\tsentence\n0\tok\n7\tweird\n")
    with pytest.raises(DataError, match=r"label '7'.*not one of.*\['0', '1'\]"):
        read_examples(path, label_names=["0", "1"])


def test_non_utf8_bytes(tmp_path):
    path = _write(tmp_path / "a.tsv", b"label\tsentence\n1\tcaf\xe9\n", mode="wb")
    with pytest.raises(DataError, match="not UTF-8.*re-save"):
        read_examples(path)


def test_ragged_row_and_bad_json(tmp_path):
    with pytest.raises(DataError, match=r"a.tsv:2: 3 fields but the header has 2"):
        read_examples(_write(tmp_path / "a.tsv", "label\tsentence\n1\tx\ty\n"))
    with pytest.raises(DataError, match=r"b.jsonl:1: not valid JSON"):
        read_examples(_write(tmp_path / "b.jsonl", "{nope\n"))
    with pytest.raises(DataError, match="empty"):
        read_examples(_write(tmp_path / "c.jsonl", '{"sentence": "  ", "label": 1}\n'))


def test_write_then_read_round_trip(tmp_path):
    ex = read_examples(_write(tmp_path / "a.tsv", "label\tsentence\n1\tgood\n0\tbad\n"))
    again = read_examples(write_examples(ex, tmp_path / "out" / "s.jsonl"), label_names=ex.label_names)
    assert (again.texts, again.labels) == (ex.texts, ex.labels)


def test_reads_real_sst2(sst2):
    dev = read_examples(sst2 / "dev.tsv")
    assert len(dev) == 872
    assert dev.label_names == ("0", "1")
    assert 400 < dev.label_counts()["1"] < 472


def test_a_stray_label_in_the_users_files_is_refused_with_the_way_out(tmp_path):
    from fedseal.common.config import ConfigError, FedConfig
    from fedseal.common.data import Examples, write_examples
    from fedseal.common.synthetic import synthetic_examples
    from fedseal.simulations.simulate import prepare_sites

    good = synthetic_examples(3000, seed=1)
    names = (*good.label_names, "postive")  # one line with a typo
    typo = Examples(
        texts=[*good.texts, "a fine film"],
        labels=[*good.labels, len(names) - 1],
        label_names=names,
        source="typo",
    )
    train = write_examples(typo, tmp_path / "train.jsonl")
    held_out = write_examples(synthetic_examples(100, seed=2), tmp_path / "eval.jsonl")
    cfg = FedConfig(train=str(train), eval=str(held_out), clients=2, out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"label\(s\) 'postive' appear in only 1 of 3101"):
        prepare_sites(cfg)
    # naming the classes settles it: the stray line is then the file's error, not a class
    cfg = cfg.replace(labels=good.label_names)
    with pytest.raises(DataError, match="example 3001 has label 'postive', which is not one"):
        prepare_sites(cfg)
    # without the typo, the classes are those found
    clean = write_examples(good, tmp_path / "clean.jsonl")
    assert prepare_sites(cfg.replace(train=str(clean), labels=())).labels == good.label_names
