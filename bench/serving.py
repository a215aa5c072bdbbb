"""Serving benchmark: the real fedtext server against a naive one, over HTTP on 127.0.0.1.

    .venv/bin/python bench/serving.py --quick     # under 5 minutes on 2 cores

What it does, all in a fresh temporary data directory:

1. Trains one ``lstm`` model (default config) briefly, without DP, on the public demo
   corpus, and stores it, encrypted under each tenant's own data key, for 20 tenants.
2. Quantization report (in process): the same version served float32 and dynamic int8:
   accuracy on a held-out test split and forward throughput at batch 64 and batch 1.
3. Starts ``fedtext serve`` (uvicorn, one process) and a naive baseline server, each in its
   own process, and drives each at concurrency 1, 16 and 64 for a fixed time from a
   separate load process (aiohttp; one input per request, tenants round-robin).
   The naive baseline: per request it authenticates the same way, then fetches, checks and
   decrypts the blob, rebuilds the model as trained (Opacus DPLSTM) and runs one forward
   pass: no cache, no batching. An ablation run serves fedtext with batching off
   (max batch 1) to show what batching alone buys.
4. Soak: fedtext with a cache of 5 models, concurrency 64 over the 20 tenants (evictions
   on most requests' model switches) for 60 s: errors and resident memory.

5. Shared encoder (issues 19 and 26): ``encoder-head`` models (a public MiniLM encoder
   and a private head) for 2,000 tenants, each head encrypted under its tenant's key. In
   process (bench/_encoders.py): each encoder runtime variant (models/runtimes.py) on the
   test tweets: throughput in requests of 64 (the served variant's is the limit), cosine
   to torch fp32, and the accuracy gate (macro-F1 of a head trained on the variant's
   vectors of 2,000 training tweets, scored on 1,000 test tweets, minus torch fp32's);
   head cold loads. Then 200 tenants at concurrency 64 (uniform, one input per request)
   on a baseline server (the same models served per model,
   ``FEDTEXT_SERVE_SHARED_ENCODER=false``), on today's path (heads trained on torch-fp32
   vectors, served by a torch-fp32 shared encoder) and on the default server (the
   default runtime variant); open loop at half the measured maximum; resident memory
   with 20 and with 2,000 heads loaded.

    .venv/bin/python bench/serving.py --quick --only shared-encoder   # scenario 5 alone

The last line printed is one JSON object (keys: runs, cold_load_ms, rss_mb, ablation,
quantization, soak, settings; shared_encoder with the issue's keys and
shared_encoder_details). ``--smoke``: tiny sizes and 1 s runs, the same keys (make test).

One helper module per scenario: bench/_serving_lstm.py (1-4) and bench/_serving_shared.py
(5), over bench/_serving_servers.py (the two servers, process measures) and
bench/_serving_http_load.py (the aiohttp load process).
"""

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_lstm import lstm_scenario  # noqa: E402
from bench._serving_servers import log  # noqa: E402
from bench._serving_shared import (  # noqa: E402
    SHARED_SIZES,
    SMOKE_SHARED_SIZES,
    shared_encoder_scenario,
)

# The JSON line's keys (tests/test_bench_smoke.py checks them on --smoke): key -> the keys
# expected inside it.
JSON_KEYS = {
    "runs": None, "ablation": None, "quantization": None, "soak": None, "settings": None,
    "cold_load_ms": None, "rss_mb": None, "pps_ratio_c64": None,
    "shared_encoder": ["runtime", "pps_c64", "torch_fp32_pps_c64", "accuracy_change",
                       "baseline_pps_c64", "encoder_limit_pps", "p99_ms_half_load", "errors",
                       "rss_mb_20_heads", "rss_mb_2000_heads"],
    "shared_encoder_details": ["encoder_variants", "ratios", "goals", "runs", "settings"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 5 minutes)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, same JSON keys (make test runs it)"
    )
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument(
        "--runtime",
        default="onnx-int8",
        help="the encoder runtime variant served in the shared-encoder scenario",
    )
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument(
        "--only", choices=("lstm", "shared-encoder"), help="one scenario (default: both)"
    )
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.smoke else 8.0 if args.quick else 20.0)
    warmup = 0.3 if args.smoke else 2.0 if args.quick else 5.0
    if args.smoke:
        args.no_soak = args.no_ablation = True
    sizes: dict[str, Any] = dict(SMOKE_SHARED_SIZES if args.smoke else SHARED_SIZES)
    sizes["all_variants"] = not (args.quick or args.smoke)
    sizes["runtime"] = args.runtime
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fedtext-bench-serving-"))
    try:
        result = (
            lstm_scenario(tmp, args, seconds, warmup, started)
            if args.only != "shared-encoder"
            else {}
        )
        if args.only != "lstm":
            log("shared-encoder scenario ...")
            shared = shared_encoder_scenario(tmp, seconds, warmup, sizes)
            # The keys first; the details beside them.
            result["shared_encoder"] = shared.pop("summary")
            result["shared_encoder_details"] = shared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    # SIGTERM runs the finally blocks too: servers stopped, temporary directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
