"""models reads the public tweets itself (it imports nothing of ours): the same texts, and
the same calibration split, as the clients' reader of the demo corpus."""

from __future__ import annotations

from clients.data import load_demo_corpus, train_test_split
from models.assets import public_tweets
from models.onnx_export import calibration_texts


def test_public_tweets_are_the_demo_corpus_texts() -> None:
    assert public_tweets() == load_demo_corpus().texts


def test_calibration_texts_are_the_first_of_the_training_split() -> None:
    train, _ = train_test_split(load_demo_corpus(), test_fraction=0.1, seed=0)
    assert calibration_texts(256) == list(train.texts[:256])
