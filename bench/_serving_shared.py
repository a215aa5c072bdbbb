"""bench/serving.py's shared-encoder scenario (issues 19 and 26): encoder-head models of
2,000 tenants on one shared encoder, against the same heads served per model and against
the torch-fp32 path. Not a benchmark itself (``make bench`` skips ``_*``).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from bench._serving_http_load import touch
from bench._serving_servers import Server, cpu_s, log

# the accuracy gate's training and test tweets. --smoke shrinks everything.
SHARED_SIZES = {"served_tenants": 200, "rss_low": 20, "rss_high": 2000,
                "gate_train": 2000, "gate_test": 1000}  # fmt: skip
IDLE_S = 3.0  # seconds of no traffic over which the server's idle CPU is measured
SMOKE_SHARED_SIZES = {"served_tenants": 4, "rss_low": 2, "rss_high": 8,
                      "gate_train": 48, "gate_test": 32}  # fmt: skip


def shared_setup(data_dir: Path, spec: Any, head: Any, tenants: int) -> list[str]:
    """``tenants`` tenants, each with its own encrypted head (the trained one, perturbed)."""
    import torch

    from fedtext.bootstrap import scratch_platform
    from models import save_weights
    from tenancy.db import session_scope
    from tenancy.registry import store_model_version
    from tenancy.tenants import Scope, create_api_key, create_tenant

    platform = scratch_platform(data_dir)
    base = {k: v.clone() for k, v in head.state_dict().items()}
    keys: list[str] = []
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for start in range(0, tenants, 100):
        with session_scope(platform.engine) as session:
            for i in range(start, min(start + 100, tenants)):
                tenant = create_tenant(session=session, keyring=platform.keyring, name=f"h{i:05d}")
                _, key = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
                keys.append(key)
                with torch.no_grad():
                    for name, value in head.state_dict().items():
                        value.copy_(
                            base[name] + 0.01 * torch.randn(value.shape, generator=generator)
                        )
                store_model_version(
                    session=session, keyring=platform.keyring, store=platform.store,
                    tenant=tenant, name="sentiment", spec_json=spec.to_json(),
                    weights=save_weights(head), deploy=True,
                )  # fmt: skip
    head.load_state_dict(base)
    log(f"{tenants} tenants with encrypted heads in {time.perf_counter() - started:.1f} s")
    return keys


def head_cold_loads(data_dir: Path, count: int, runtime: str) -> dict[str, float]:
    """Cold load of a head in process (fetch, SHA-256 check, decrypt, deserialize): ms."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlmodel import Session, select

    from fedtext.bootstrap import platform_from_settings
    from fedtext.settings import Settings
    from serving.runtime.model_cache import ModelCache
    from serving.runtime.shared_encoder import SharedEncoders
    from tenancy.tables import ModelVersion

    platform = platform_from_settings(Settings(data_dir=data_dir))
    heads = SharedEncoders(executor=ThreadPoolExecutor(1), runtime=runtime, device="cpu")
    cache = ModelCache(platform, heads=heads)
    times: list[float] = []
    with Session(platform.engine) as session:
        rows = list(session.exec(select(ModelVersion).limit(count + 1)))
        cache.get(session, rows[0])  # loads the encoder itself once
        gc.collect()
        gc.freeze()  # as `fedtext serve` does after startup: no full collections of torch
        for row in rows[1:]:
            started = time.perf_counter()
            cache.get(session, row)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "loads": len(times),
        "p50_ms": round(times[len(times) // 2], 2),
        "p99_ms": round(times[int(0.99 * len(times))], 2),
        "max_ms": round(times[-1], 2),
    }


def shared_encoder_scenario(
    tmp: Path, seconds: float, warmup: float, sizes: dict[str, Any]
) -> dict[str, Any]:
    """Heads of 200 tenants on one shared encoder, served by the default runtime variant,
    against the same heads served per model and against today's torch-fp32 path."""
    from bench._encoders import variant_report
    from clients.data import load_demo_corpus, train_test_split
    from models.runtimes import (
        ALLOW_UNGATED_ENV,
        DEFAULT_RUNTIME,
        LEGACY_RUNTIME,
        OFFERED,
        RUNTIMES,
    )

    # The optimized runtime, served even where it missed the accuracy gate (the operator's
    # override, as the JSON's gate fields say): its speed is what this scenario measures.
    runtime = sizes.get("runtime") or DEFAULT_RUNTIME
    if runtime not in OFFERED:
        os.environ[ALLOW_UNGATED_ENV] = "1"  # this process and the servers it starts
    corpus = load_demo_corpus()
    train, test = train_test_split(corpus, test_fraction=0.1, seed=0)
    test_texts, test_labels = list(test.texts), list(test.labels)
    n_train, n_test = sizes["gate_train"], sizes["gate_test"]
    variants = RUNTIMES if sizes.get("all_variants") else (LEGACY_RUNTIME, runtime)
    log(f"encoder variants {list(variants)}: {n_train} train / {n_test} test tweets ...")
    found = variant_report(
        list(train.texts)[:n_train], list(train.labels)[:n_train],
        test_texts[:n_test], test_labels[:n_test], variants,
    )  # fmt: skip
    served_tenants, rss_tenants = sizes["served_tenants"], (sizes["rss_low"], sizes["rss_high"])
    spec, head = found["heads"][runtime]
    data_dir = tmp / "shared"
    keys = shared_setup(data_dir, spec, head, rss_tenants[1])
    served_keys = keys[:served_tenants]
    # Today's path: the same tenants with heads trained on torch-fp32 vectors, on a
    # server whose runtime is torch-fp32 (what every server ran before runtimes existed).
    torch_dir = tmp / "shared-torch"
    torch_keys = shared_setup(torch_dir, *found["heads"][LEGACY_RUNTIME], served_tenants)
    load_texts = test_texts[n_test : n_test + 2000]  # not the ones the gate scored
    log_path = tmp / "server.log"
    out: dict[str, Any] = {"encoder_variants": found["report"]}
    out["head_cold_load"] = head_cold_loads(data_dir, min(200, rss_tenants[1] - 1), runtime)
    log(f"head cold loads in process: {out['head_cold_load']}")

    log("baseline: the same models per model (shared_encoder=false) ...")
    with Server("fedtext", data_dir, log_path, shared_encoder="false") as server:
        touch(tmp, server.url, served_keys, load_texts)
        m0 = server.metrics()
        base = server.drive(tmp, served_keys, load_texts, 64, seconds, warmup)
        base["mean_batch"] = _mean_batch(server.metrics(), m0)
        base["rss_mb"] = server.rss_mb()
        log(f"baseline c=64: {base}")

    log("shared encoder, torch-fp32 (today's path) ...")
    with Server("fedtext", torch_dir, log_path, encoder_runtime=LEGACY_RUNTIME) as server:
        touch(tmp, server.url, torch_keys, load_texts)
        m0 = server.metrics()
        torch_run = server.drive(tmp, torch_keys, load_texts, 64, seconds, warmup)
        torch_run["mean_batch"] = _mean_batch(server.metrics(), m0)
        torch_run["load_avg_1m"] = round(os.getloadavg()[0], 2)
        log(f"shared torch-fp32 c=64: {torch_run}")

    log(f"shared encoder, {runtime} ...")
    with Server("fedtext", data_dir, log_path, encoder_runtime=runtime) as server:
        first = touch(tmp, server.url, keys[: rss_tenants[0]], load_texts, concurrency=1)
        # The encoder's working memory (activations of real tweets) reaches its steady
        # size first, so that the growth measured next is what the heads add.
        server.drive(tmp, keys[: rss_tenants[0]], load_texts, 64, min(3.0, seconds), 0.0)
        rss_20 = server.rss_mb()
        m0 = server.metrics()
        # The served runs first, with the same 200 tenants memoized as the runs above (the
        # predict memo's refresh grows with memoized tenants: measured below, idle).
        served = touch(tmp, server.url, served_keys[rss_tenants[0] :], load_texts, 16)
        m1 = server.metrics()
        shared = server.drive(tmp, served_keys, load_texts, 64, seconds, warmup)
        shared["mean_batch"] = _mean_batch(server.metrics(), m1)
        shared["load_avg_1m"] = round(os.getloadavg()[0], 2)
        log(f"shared c=64: {shared}")
        rate = shared["pps"] / 2
        m2 = server.metrics()
        half = server.drive_open(tmp, served_keys, load_texts, rate, seconds, warmup)
        half["mean_batch"] = _mean_batch(server.metrics(), m2)
        half["load_avg_1m"] = round(os.getloadavg()[0], 2)
        log(f"shared open loop at {rate:.1f}/s: {half}")
        rest = touch(tmp, server.url, keys[served_tenants:], load_texts, concurrency=16)
        rss_2000 = server.rss_mb()
        m3 = server.metrics()
        # What the server spends with no traffic at all, 2,000 tenants memoized (the
        # predict memo's refresh every second): a fixed cost, spread over the predictions.
        cpu = cpu_s(server.proc.pid)
        time.sleep(IDLE_S)
        idle_ms_per_s = round(1000 * (cpu_s(server.proc.pid) - cpu) / IDLE_S, 1)
        (sum1, count1), (sum0, count0) = (_family_loads(m, "encoder-head") for m in (m3, m0))
        shared["rss_mb"] = server.rss_mb()
    limit = found["report"][runtime]["pps_requests_of_64"]
    out["summary"] = {
        "runtime": runtime,
        "pps_c64": shared["pps"],
        "torch_fp32_pps_c64": torch_run["pps"],
        "accuracy_change": found["report"][runtime]["accuracy_change"],
        "gate_passed": found["report"][runtime]["gate_passed"],
        "baseline_pps_c64": base["pps"],
        "encoder_limit_pps": limit,
        "p99_ms_half_load": half["p99_ms"],
        "errors": shared["errors"]
        + half["errors"]
        + first["errors"]
        + served["errors"]
        + rest["errors"]
        + torch_run["errors"],
        "rss_mb_20_heads": rss_20,
        "rss_mb_2000_heads": rss_2000,
    }
    out["ratios"] = {
        # None when no request of today's path finished within the window (a loaded
        # machine): a ratio over zero would be a made-up number.
        "vs_torch_fp32": round(shared["pps"] / torch_run["pps"], 2) if torch_run["pps"] else None,
        "vs_baseline": round(shared["pps"] / max(base["pps"], 1e-9), 2),
        "vs_encoder_limit": round(shared["pps"] / max(limit, 1e-9), 3),
        "rss_growth_mb_20_to_2000": round(rss_2000 - rss_20, 1),
    }
    out["goals"] = {
        "pps_c64_4x_torch_fp32": None  # not measured: see vs_torch_fp32
        if out["ratios"]["vs_torch_fp32"] is None
        else out["ratios"]["vs_torch_fp32"] >= 4,
        "accuracy_change_at_least_-0.005": out["summary"]["accuracy_change"] >= -0.005,
        "pps_c64_0.7_of_encoder_limit": out["ratios"]["vs_encoder_limit"] >= 0.7,
        "p99_half_load_under_150_ms": half["p99_ms"] < 150,
        "no_errors": out["summary"]["errors"] == 0,
        "rss_growth_under_50_mb": out["ratios"]["rss_growth_mb_20_to_2000"] < 50,
    }
    out["runs"] = {
        "baseline_c64": base,
        "torch_fp32_c64": torch_run,
        "shared_c64": shared,
        "shared_open_half": half,
    }
    out["server_idle_cpu_ms_per_s_2000_tenants"] = idle_ms_per_s
    out["server_head_cold_load_ms_mean"] = round(1000 * (sum1 - sum0) / max(count1 - count0, 1), 2)
    out["settings"] = {
        "tenants_served": served_tenants,
        "tenants_loaded_for_rss": list(rss_tenants),
        "concurrency": 64,
        "inputs_per_request": 1,
        "traffic": "uniform over tenants (round robin)",
        "open_loop_rate": round(rate, 1),
        "baseline": "fedtext serve with FEDTEXT_SERVE_SHARED_ENCODER=false: the same "
        "encoder-head models served per model (per-model cache and micro-batching)",
        "encoder_runtime": runtime,
        "runtime_offered_by_default": runtime in OFFERED,
        "cores": len(os.sched_getaffinity(0)),
    }
    return out


def _mean_batch(after: dict[str, float], before: dict[str, float]) -> float:
    """Mean inputs per forward pass between two /metrics reads."""
    total = after.get("fedtext_batch_size_sum{}", 0.0) - before.get("fedtext_batch_size_sum{}", 0.0)
    count = after.get("fedtext_batch_size_count{}", 0.0) - before.get(
        "fedtext_batch_size_count{}", 0.0
    )
    return round(total / max(count, 1.0), 2)


def _family_loads(m: dict[str, float], family: str) -> tuple[float, float]:
    total = sum(v for k, v in m.items() if k.startswith("fedtext_model_load_duration_seconds_sum")
                and f"family={family}" in k)  # fmt: skip
    count = sum(v for k, v in m.items() if k.startswith("fedtext_model_load_duration_seconds_count")
                and f"family={family}" in k)  # fmt: skip
    return total, count
