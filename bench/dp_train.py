"""DP-SGD training speed: non-private vs Opacus (hooks) vs fedtext's fast path, per family.

    .venv/bin/python bench/dp_train.py --quick      # under 5 minutes on 2 cores

For each model family (``lstm``, ``transformer``, ``minilm``, default configs) one
process times training steps at batch 64, sequence 48, on tweets from the public demo
corpus, the three ways interleaved step by step (so a busy machine slows all of them
alike); each rate is the batch over the median step time:

- ``nonprivate``: plain SGD (momentum 0.9) on the mean loss. For ``lstm`` the
  ``DPLSTM`` is swapped for ``nn.LSTM`` with the same weights (torch's fused kernel, the
  fastest non-private LSTM); ``nonprivate_dplstm_eps`` is the model as built.
- ``opacus``: Opacus 1.6 ``make_private`` (per-example gradient hooks), the reference.
- ``fast``: ``clients.fastdp.clipper.FastClipper`` + Opacus's noise/accountant optimizer, the
  default engine of ``train_dp``.

Both private paths add noise (sigma 1.0, C 1.0). Timed steps are whole optimizer steps
(forward, backward, clipping, noise, update) on fixed batches of 64.
``slowdown`` = fast time per example / non-private time per example.

Peak memory: each family runs again in a subprocess (glibc mmap threshold fixed at 64 KiB,
so freed tensors leave the resident set), each path one step (two without --quick) while
a thread samples the resident set every millisecond; ``*_peak_mb`` is the peak above the
resident set before that path's first step (model and data already loaded).

The last line printed is one JSON object: {"families": {family: {...}}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("lstm", "transformer", "minilm")
# The JSON line's keys (tests/test_bench_smoke.py checks them on --smoke).
JSON_KEYS = {"families": None, "settings": None}
LABELS = ["negative", "neutral", "positive"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def encode_corpus(batch: int, seq: int, count: int, path: Path) -> None:
    """``count`` batches of demo-corpus tweets, tokenized, saved as .npz (no pickle)."""
    import numpy as np
    import torch

    from clients.data import load_demo_corpus
    from models import load_tokenizer

    data = load_demo_corpus()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=gen)[: batch * count].tolist()
    enc = load_tokenizer().encode([data.texts[i] for i in idx], seq)
    labels = np.array([data.labels[i] for i in idx], dtype=np.int64)
    np.savez(path, ids=enc.input_ids.numpy(), mask=enc.attention_mask.numpy(), labels=labels)


def _batches(path: Path, batch: int) -> list[tuple[Any, Any, Any]]:
    import numpy as np
    import torch

    with np.load(path) as f:
        ids, mask, labels = (torch.from_numpy(f[k]) for k in ("ids", "mask", "labels"))
    return [
        (ids[i : i + batch], mask[i : i + batch], labels[i : i + batch])
        for i in range(0, len(ids), batch)
    ]


def _fused_lstm_copy(model: Any) -> Any:
    """``model`` with its DPLSTM replaced by nn.LSTM holding the same weights."""
    from opacus.layers import DPLSTM
    from torch import nn

    model = copy.deepcopy(model)
    dp = model.lstm
    assert isinstance(dp, DPLSTM)
    lstm = nn.LSTM(dp.input_size, dp.hidden_size, batch_first=True, bidirectional=dp.bidirectional)
    lstm.load_state_dict({k: v.detach() for k, v in dp.named_parameters()}, strict=True)
    model.lstm = lstm
    return model


def make_step(
    mode: str, base: Any, batch: int
) -> tuple[Callable[[tuple[Any, Any, Any]], None], Callable[[], None]]:
    """A training step for ``mode`` on a private copy of ``base``, and its cleanup."""
    import torch
    from opacus import PrivacyEngine
    from opacus.optimizers import get_optimizer_class
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from clients.fastdp.clipper import FastClipper

    if mode == "nonprivate" and hasattr(base, "lstm"):
        model = _fused_lstm_copy(base)
    else:
        model = copy.deepcopy(base)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)

    if mode in ("nonprivate", "nonprivate_dplstm"):

        def step(b: tuple[Any, Any, Any]) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(b[0], b[1]), b[2]).backward()
            optimizer.step()

        return step, lambda: None

    if mode == "opacus":
        ids = torch.zeros(batch, 2, dtype=torch.long)
        loader = DataLoader(TensorDataset(ids, ids, ids[:, 0]), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
        dp_model, dp_opt, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )

        def step(b: tuple[Any, Any, Any]) -> None:
            dp_opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.cross_entropy(dp_model(b[0], b[1]), b[2]).backward()
            dp_opt.step()

        return step, dp_model.remove_hooks

    if mode == "fast":
        optim_class = get_optimizer_class("flat", distributed=False, grad_sample_mode="ghost")
        dp_opt = optim_class(
            optimizer=optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            loss_reduction="mean",
        )
        clipper = FastClipper(model, 1.0).__enter__()

        def step(b: tuple[Any, Any, Any]) -> None:
            dp_opt.zero_grad(set_to_none=True)
            clipper.backward(F.cross_entropy(model(b[0], b[1]), b[2], reduction="none"))
            dp_opt.step()

        return step, lambda: clipper.__exit__(None, None, None)

    raise ValueError(f"Unknown mode {mode!r}.")


def _base_model(family: str) -> Any:
    import torch

    from models import ModelSpec, build_model

    torch.manual_seed(0)
    return build_model(ModelSpec.create(family, LABELS, max_seq_len=48))


def _modes(family: str) -> list[str]:
    extra = ["nonprivate_dplstm"] if family == "lstm" else []
    return ["nonprivate", *extra, "opacus", "fast"]


def time_family(
    family: str, data_path: Path, batch: int, reps: int, slow_every: int
) -> dict[str, float]:
    """Examples per second of each mode from the median of single-step times.

    Steps of the modes alternate one by one (the order rotating each repetition), so a
    burst of load from other processes hits every mode alike; the Opacus reference, much
    slower, runs only every ``slow_every``-th repetition.
    """
    base = _base_model(family)
    data = _batches(data_path, batch)
    runners = {mode: make_step(mode, base, batch) for mode in _modes(family)}
    for step, _ in runners.values():
        step(data[0])  # warm-up: allocations, first-call dispatch
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    modes = list(runners)
    for rep in range(reps):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for mode in order:
            if mode == "opacus" and rep % slow_every:
                continue
            b = data[rep % len(data)]
            start = time.perf_counter()
            runners[mode][0](b)
            times[mode].append(time.perf_counter() - start)
    for _, cleanup in runners.values():
        cleanup()
    return {mode: batch / statistics.median(t) for mode, t in times.items()}


def peak_memory_child(family: str, data_path: Path, batch: int, steps: int) -> dict[str, float]:
    """Peak resident memory of each mode above its pre-training baseline, in MB.

    Run in a subprocess started with a fixed glibc mmap threshold, so freed tensors go
    back to the OS and one mode's cached blocks do not hide the next one's peak.
    """
    import gc

    base = _base_model(family)
    data = _batches(data_path, batch)
    peaks: dict[str, float] = {}
    for mode in ("nonprivate", "opacus", "fast"):
        step, cleanup = make_step(mode, base, batch)
        gc.collect()
        baseline = _rss_bytes()
        peak = baseline
        done = threading.Event()

        def sample(done: threading.Event = done) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for i in range(steps):
            step(data[i % len(data)])
        done.set()
        sampler.join()
        cleanup()
        del step, cleanup
        gc.collect()
        peaks[mode] = round((peak - baseline) / 2**20, 1)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="lstm only, batch 8, one repetition, same JSON keys (make test runs it)",
    )
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("FAMILY", "DATA", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        family, data_file, steps = args.child
        print(json.dumps(peak_memory_child(family, Path(data_file), args.batch, int(steps))))
        return

    if args.smoke:
        args.families, args.batch, args.seq = "lstm", 8, 16
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"Unknown families {unknown}; known: {list(FAMILIES)}.")
    # Repetitions (one step of each mode) and how often the slow Opacus path runs.
    reps = {"lstm": (10, 4), "transformer": (5, 3), "minilm": (2, 2)}
    memory_steps = 1  # the first step holds the peak: every buffer is allocated in it
    if args.smoke:
        reps = {"lstm": (1, 1), "transformer": (1, 1), "minilm": (1, 1)}
    elif not args.quick:
        reps = {"lstm": (40, 4), "transformer": (20, 4), "minilm": (6, 3)}
        memory_steps = 2

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="fedtext-dp-bench-")
    data_path = Path(tmp.name) / "batches.npz"
    encode_corpus(args.batch, args.seq, 4, data_path)
    for family in families:
        start = time.perf_counter()
        eps = time_family(family, data_path, args.batch, *reps[family])
        proc = subprocess.run(
            [sys.executable, __file__, "--child", family, str(data_path), str(memory_steps),
             "--batch", str(args.batch), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )  # fmt: skip
        peaks = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {
            "nonprivate_eps": round(eps["nonprivate"], 1),
            "opacus_eps": round(eps["opacus"], 1),
            "fast_eps": round(eps["fast"], 1),
            "nonprivate_peak_mb": peaks["nonprivate"],
            "opacus_peak_mb": peaks["opacus"],
            "fast_peak_mb": peaks["fast"],
            "slowdown": round(eps["nonprivate"] / eps["fast"], 2),
            "speedup_over_opacus": round(eps["fast"] / eps["opacus"], 1),
        }
        if "nonprivate_dplstm" in eps:
            row["nonprivate_dplstm_eps"] = round(eps["nonprivate_dplstm"], 1)
        row["seconds"] = round(time.perf_counter() - start, 1)
        out[family] = row
        print(f"{family}: {json.dumps(row)}", flush=True)
    settings = {
        "seconds": round(time.perf_counter() - t0, 1),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "quick": args.quick,
        "smoke": args.smoke,
        "device": "cpu",
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    tmp.cleanup()
    print(json.dumps({"families": out, "settings": settings}))


if __name__ == "__main__":
    main()
