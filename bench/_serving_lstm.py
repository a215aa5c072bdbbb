"""bench/serving.py's lstm scenario: fedtext serve against the naive baseline.

20 tenants' encrypted ``lstm`` versions; the int8 quantization report; closed-loop runs
at concurrency 1, 16 and 64 (and 64 over gRPC); the no-batching ablation; the soak with a
cache of 5 models. Not a benchmark itself (``make bench`` skips ``_*``).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

from bench._serving_servers import Server, log

TENANTS = 20
CONCURRENCY = (1, 16, 64)


def _train_model(train_texts: list[str], train_labels: list[int], examples: int) -> Any:
    """A briefly trained lstm (non-private; the benchmark needs sensible weights only)."""
    import torch

    from clients.data import DEMO_LABELS
    from models import ModelSpec, build_model, load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 shared cores ran ~10x slower here
    spec = ModelSpec.create("lstm", list(DEMO_LABELS))
    model = build_model(spec).train()
    tok = load_tokenizer()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    order = list(range(len(train_texts)))
    random.Random(0).shuffle(order)
    started, seen = time.monotonic(), 0
    for i in range(0, len(order), 64):
        idx = order[i : i + 64]
        enc = tok.encode([train_texts[j] for j in idx], spec.max_seq_len)
        y = torch.tensor([train_labels[j] for j in idx])
        loss = torch.nn.functional.cross_entropy(model(enc.input_ids, enc.attention_mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(idx)
        if seen >= examples:
            break
    log(f"trained on {seen} examples in {time.monotonic() - started:.1f} s")
    return spec, model.eval()


def setup(data_dir: Path, train_examples: int, tenants: int = TENANTS) -> dict[str, Any]:
    """Tenants, keys and encrypted model versions in ``data_dir``; returns what the load needs."""
    from clients.data import load_demo_corpus, train_test_split
    from fedtext.bootstrap import scratch_platform
    from models import save_weights
    from tenancy.db import session_scope
    from tenancy.registry import store_model_version
    from tenancy.tenants import Scope, create_api_key, create_tenant

    corpus = load_demo_corpus()
    train, test = train_test_split(corpus, test_fraction=0.1, seed=0)
    spec, model = _train_model(list(train.texts), list(train.labels), train_examples)
    weights = save_weights(model)
    platform = scratch_platform(data_dir)
    keys: list[str] = []
    with session_scope(platform.engine) as session:
        for i in range(tenants):
            tenant = create_tenant(session=session, keyring=platform.keyring, name=f"t{i:02d}")
            _, key = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
            keys.append(key)
            store_model_version(
                session=session,
                keyring=platform.keyring,
                store=platform.store,
                tenant=tenant,
                name="sentiment",
                spec_json=spec.to_json(),
                weights=weights,
                deploy=True,
            )
    return {
        "platform": platform,
        "keys": keys,
        "test_texts": list(test.texts),
        "test_labels": list(test.labels),
    }


# --------------------------------------------------------------------------- quantization


def quantization_report(platform: Any, test_texts: list[str], test_labels: list[int]) -> dict:
    """Float32 vs dynamic int8 of one stored version: accuracy and forward speed."""
    import torch
    from sqlmodel import Session, select

    from serving.runtime.model_cache import load_served_model
    from tenancy.tables import ModelVersion

    torch.set_num_threads(1)  # as the server runs its forward threads
    with Session(platform.engine) as session:
        row = session.exec(select(ModelVersion)).first()
        assert row is not None
        out: dict[str, Any] = {"test_examples": len(test_texts)}
        for mode in (None, "dynamic-int8"):
            row.quantize = mode
            served = load_served_model(session, platform, row)
            correct = 0
            started = time.perf_counter()
            for i in range(0, len(test_texts), 64):
                rows = served.infer(test_texts[i : i + 64])
                correct += sum(
                    max(range(len(r)), key=r.__getitem__) == y
                    for r, y in zip(rows, test_labels[i : i + 64], strict=True)
                )
            batch64 = len(test_texts) / (time.perf_counter() - started)
            started = time.perf_counter()
            for text in test_texts[:300]:
                served.infer([text])
            batch1 = 300 / (time.perf_counter() - started)
            out[str(mode or "float32")] = {
                "accuracy": round(correct / len(test_texts), 4),
                "pps_batch64": round(batch64, 1),
                "pps_batch1": round(batch1, 1),
                "load_ms": round(served.load_seconds * 1000, 2),
            }
    f, q = out["float32"], out["dynamic-int8"]
    out["speedup_batch64"] = round(q["pps_batch64"] / f["pps_batch64"], 3)
    out["speedup_batch1"] = round(q["pps_batch1"] / f["pps_batch1"], 3)
    out["accuracy_change"] = round(q["accuracy"] - f["accuracy"], 4)
    return out


# --------------------------------------------------------------------------- servers


def _record(result: dict[str, Any], where: str, server: str, run: dict[str, Any]) -> None:
    """Runs keep exactly the issue's keys; request counts and server CPU go under "extra"."""
    extra = {k: run.pop(k) for k in ("requests", "server_cpu_ms_per_prediction", "client_cpu_s")}
    result["extra"][f"{server}@{run['concurrency']}"] = extra
    result[where].append({"server": server, **run})


def lstm_scenario(tmp: Path, args: argparse.Namespace, seconds: float, warmup: float,
                  started: float) -> dict[str, Any]:  # fmt: skip
    data_dir = tmp / "data"
    state = setup(
        data_dir,
        train_examples=64 if args.smoke else 1600 if args.quick else 6400,
        tenants=4 if args.smoke else TENANTS,  # --smoke: 4 cold loads, not 20
    )
    keys, texts = state["keys"], state["test_texts"]
    log_path = tmp / "server.log"
    log("quantization report ...")
    n_quant = 64 if args.smoke else 1000
    quant = quantization_report(state["platform"], texts[:n_quant], state["test_labels"][:n_quant])
    result: dict[str, Any] = {"runs": [], "ablation": [], "extra": {}, "quantization": quant}
    load_texts = texts[:2000]
    # --smoke: only the concurrency the JSON's ratio needs (each level is a load process).
    levels = (64,) if args.smoke else CONCURRENCY

    log("fedtext server ...")
    with Server("fedtext", data_dir, log_path) as server:
        result["rss_mb"] = {"start": server.rss_mb()}
        # Cold loads: first request of each tenant (decrypt + deserialize + prepare).
        import httpx

        for key in keys:
            r = httpx.post(
                f"{server.url}/v1/models/sentiment/predict",
                json={"inputs": [texts[0]]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            r.raise_for_status()
        m = server.metrics()
        total = sum(
            v for k, v in m.items() if k.startswith("fedtext_model_load_duration_seconds_sum")
        )
        count = sum(
            v for k, v in m.items() if k.startswith("fedtext_model_load_duration_seconds_count")
        )
        result["cold_load_ms"] = {"lstm": round(1000 * total / count, 2)}
        for c in levels:
            run = server.drive(tmp, keys, load_texts, c, seconds, warmup)
            _record(result, "runs", "fedtext", run)
            log(f"fedtext c={c}: {run}")
        # The c=64 scenario again over gRPC (bench/_load.py): same server, same run.
        from bench._load import drive as drive_grpc

        grpc_address = f"127.0.0.1:{server.grpc_port}"
        run = drive_grpc(tmp, server.proc.pid, grpc_address, keys, load_texts, 64, seconds, warmup)
        _record(result, "runs", "fedtext-grpc", run)
        log(f"fedtext over gRPC c=64: {run}")
        m = server.metrics()
        bsum = m.get("fedtext_batch_size_sum{}", 0.0)
        bcount = m.get("fedtext_batch_size_count{}", 1.0)
        result["fedtext_mean_batch"] = round(bsum / max(bcount, 1.0), 2)
        result["rss_mb"]["end"] = server.rss_mb()

    log("baseline server ...")
    with Server("baseline", data_dir, log_path) as server:
        # --smoke: c=64 is the baseline's only run, and its first 64 requests take ~2 s
        # (a model rebuilt per request): only requests started after the warm-up count,
        # so the warm-up outlasts that first wave (the c=1 and c=16 runs did it before).
        base_warmup = max(warmup, 2.5) if args.smoke else warmup
        for c in levels:
            run = server.drive(tmp, keys, load_texts, c, seconds, base_warmup)
            _record(result, "runs", "baseline", run)
            log(f"baseline c={c}: {run}")

    if not args.no_ablation:
        log("ablation: fedtext without batching ...")
        with Server("fedtext", data_dir, log_path, max_batch=1) as server:
            for c in (16, 64):
                run = server.drive(tmp, keys, load_texts, c, seconds, warmup)
                _record(result, "ablation", "fedtext-no-batching", run)
                log(f"no-batching c={c}: {run}")

    soak_budget = 300 - (time.monotonic() - started) - 25
    if args.no_soak or (args.quick and soak_budget < args.soak_seconds + 10):
        result["soak"] = {"skipped": True, "reason": "--no-soak or not enough of the --quick 5 min"}
    else:
        log(f"soak {args.soak_seconds:.0f} s, cache of 5 models ...")
        with Server("fedtext", data_dir, log_path, cache_models=5) as server:
            server.drive(tmp, keys, load_texts, 64, 5.0, 0.0)  # warm up to a steady state
            rss_start = server.rss_mb()
            run = server.drive(tmp, keys, load_texts, 64, args.soak_seconds, 0.0)
            rss_end = server.rss_mb()
            m = server.metrics()
            result["soak"] = {
                "seconds": args.soak_seconds,
                "concurrency": 64,
                "tenants": TENANTS,
                "cache_models": 5,
                "errors": run["errors"],
                "rps": run["rps"],
                "p99_ms": run["p99_ms"],
                "evictions": m.get("fedtext_model_cache_evictions_total{}", 0.0),
                "loads": m.get("fedtext_model_cache_misses_total{}", 0.0),
                "rss_mb": {"start": rss_start, "end": rss_end},
                "rss_change": round(rss_end / rss_start - 1, 3),
            }
    # No request text may appear in the servers' logs.
    logged = log_path.read_text(errors="replace")
    result["log_lines"] = logged.count("\n")
    result["log_has_request_text"] = any(t in logged for t in load_texts[:200] if len(t) > 20)
    result["settings"] = {
        "seconds_per_run": seconds,
        "warmup_s": warmup,
        "baseline_warmup_s": base_warmup,
        "inputs_per_request": 1,
        "tenants": len(keys),
        "cores": len(os.sched_getaffinity(0)),
        "baseline": "per request: auth, SHA-256 check, decrypt, rebuild DPLSTM model, 1 forward",
    }
    by = {(r["server"], r["concurrency"]): r for r in result["runs"]}
    result["pps_ratio_c64"] = round(
        by["fedtext", 64]["pps"] / max(by["baseline", 64]["pps"], 1e-9), 2
    )
    return result
