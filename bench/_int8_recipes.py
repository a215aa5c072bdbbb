"""Static int8 recipes for onnx-int8-static, tried against the accuracy gate (issue 26).

A helper (not a benchmark run by the smoke test): for each recipe of
``models.onnx_export.StaticRecipe`` below, export the graph (into a scratch cache), then
measure on the gate's tweets (bench/_encoders.py's measure: softmax head, 2,000 training
tweets, 1,000 test tweets, macro-F1 minus torch fp32's): mean/min cosine to torch fp32,
the macro-F1 change, batch independence (a sentence alone vs in its padded group: max
absolute difference), and CPU ms per sentence (process CPU time, one thread, 200 test
tweets in length-sorted groups of 16, every path run ``--rounds`` times interleaved so
that the machine's load moves them alike). Baselines in the same run: torch fp32 (groups
of 16) and onnx-int8 (dynamic, each sentence alone).

    .venv/bin/python bench/_int8_recipes.py [--names a,b] [--train 2000] [--test 1000]
    .venv/bin/python bench/_int8_recipes.py --engines [--timing 200] [--rounds 3]

``--engines``: the shipped runtimes on the same tweets, interleaved: CPU ms per sentence
on one thread (torch fp32, onnx-int8-static, openvino-int8-static), and wall/CPU ms per
sentence of the two int8 engines in their served layout (a run per usable core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = r"/output/dense/"  # attention and feed-forward output projections
FFN_OUT = r"layer\.\d+/output/dense/"  # the feed-forward output projection only


def recipes() -> dict[str, Any]:
    from models.onnx_export import StaticRecipe

    return {
        "minmax": StaticRecipe(),
        "minmax-outputs-fp32": StaticRecipe(keep_fp32=(OUT,)),
        "minmax-ffn-out-fp32": StaticRecipe(keep_fp32=(FFN_OUT,)),
        "percentile": StaticRecipe(calibration="percentile"),
        "percentile-outputs-fp32": StaticRecipe(calibration="percentile", keep_fp32=(OUT,)),
        "entropy": StaticRecipe(calibration="entropy"),
        "minmax-symmetric": StaticRecipe(symmetric_activations=True),
        "minmax-reduce-range": StaticRecipe(reduce_range=True),
    }


def _log(msg: str) -> None:
    print(f"[bench/int8_recipes] {msg}", file=sys.stderr, flush=True)


def cpu_ms(encode: Any, texts: list[str]) -> float:
    started = time.process_time()
    encode(texts)
    return 1000 * (time.process_time() - started) / len(texts)


def layout(texts: list[str], rounds: int) -> dict[str, Any]:
    """The chosen static variant's run layout: group size (padding waste vs per-run
    overhead; groups are length-sorted) by CPU ms per sentence on one thread, and the
    thread layout (groups on one-thread sessions in parallel vs one session with an
    intra-op thread per core) by wall and CPU time, every setting interleaved."""
    from models import load_encoder
    from models.runtimes import OnnxRuntime, usable_cores

    encoder = load_encoder()
    cores = usable_cores()
    sizes = {g: OnnxRuntime(encoder, "onnx-int8-static", workers=1) for g in (1, 8, 16, 32, 64)}
    for group, runtime in sizes.items():
        runtime.group = group
    threads = {
        f"{cores} runs at once x 1 thread": OnnxRuntime(encoder, "onnx-int8-static"),
        f"1 run x {cores} intra-op threads": OnnxRuntime(
            encoder, "onnx-int8-static", workers=1, threads=cores
        ),
    }
    cpu: dict[str, list[float]] = {f"group {g}": [] for g in sizes}
    wall: dict[str, list[float]] = {k: [] for k in threads}
    wall_cpu: dict[str, list[float]] = {k: [] for k in threads}
    for _ in range(rounds):
        for group, runtime in sizes.items():
            cpu[f"group {group}"].append(cpu_ms(lambda t, r=runtime: r.encode(t, 128), texts))
        for key, runtime in threads.items():
            started, spent = time.perf_counter(), time.process_time()
            runtime.encode(texts, 128)
            wall[key].append(1000 * (time.perf_counter() - started) / len(texts))
            wall_cpu[key].append(1000 * (time.process_time() - spent) / len(texts))
    mean = lambda v: round(sum(v) / len(v), 2)  # noqa: E731
    return {
        "cpu_ms_per_sentence_by_group": {k: mean(v) for k, v in cpu.items()},
        "wall_ms_per_sentence_by_threads": {k: mean(v) for k, v in wall.items()},
        "cpu_ms_per_sentence_by_threads": {k: mean(v) for k, v in wall_cpu.items()},
        "sentences": len(texts),
        "cores": cores,
        "load": os.getloadavg(),
    }


def engines(texts: list[str], rounds: int) -> dict[str, Any]:
    """CPU ms per sentence of each runtime on one thread, then the int8 engines' served
    layout by wall and CPU time, every path run ``rounds`` times interleaved."""
    import torch

    from models import load_encoder
    from models.runtimes import OnnxRuntime, OpenVinoRuntime, TorchRuntime, usable_cores

    torch.set_num_threads(1)
    encoder = load_encoder()
    one = {
        "torch-fp32": TorchRuntime(encoder),
        "onnx-int8-static": OnnxRuntime(encoder, "onnx-int8-static", workers=1),
        "openvino-int8-static": OpenVinoRuntime(encoder, workers=1),
    }
    served = {
        "onnx-int8-static": OnnxRuntime(encoder, "onnx-int8-static"),
        "openvino-int8-static": OpenVinoRuntime(encoder),
    }
    for runtime in [*one.values(), *served.values()]:
        runtime.encode(texts[:32], 128)  # warm-up
    cpu: dict[str, list[float]] = {k: [] for k in one}
    wall: dict[str, list[float]] = {k: [] for k in served}
    wall_cpu: dict[str, list[float]] = {k: [] for k in served}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for key, runtime in one.items():
            cpu[key].append(cpu_ms(lambda t, r=runtime: r.encode(t, 128), texts))
        for key, runtime in served.items():
            started, spent = time.perf_counter(), time.process_time()
            runtime.encode(texts, 128)
            wall[key].append(1000 * (time.perf_counter() - started) / len(texts))
            wall_cpu[key].append(1000 * (time.process_time() - spent) / len(texts))
    mean = lambda v: round(sum(v) / len(v), 2)  # noqa: E731
    one_thread = {k: mean(v) for k, v in cpu.items()}
    return {
        "cpu_ms_per_sentence_one_thread": one_thread,
        "cpu_ms_per_sentence_runs": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "vs_torch_fp32": {k: round(one_thread["torch-fp32"] / v, 2) for k, v in one_thread.items()},
        "served_layout_wall_ms_per_sentence": {k: mean(v) for k, v in wall.items()},
        "served_layout_cpu_ms_per_sentence": {k: mean(v) for k, v in wall_cpu.items()},
        "sentences": len(texts),
        "rounds": rounds,
        "cores": usable_cores(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", default="", help="comma-separated recipe names (all)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--timing", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fedtext-int8"))
    parser.add_argument("--layout", action="store_true", help="group sizes and threads only")
    parser.add_argument("--engines", action="store_true", help="the shipped int8 engines only")
    args = parser.parse_args()
    if args.engines:
        from clients.data import load_demo_corpus, train_test_split

        _, test = train_test_split(load_demo_corpus(), test_fraction=0.1, seed=0)
        print(json.dumps(engines(list(test.texts[: args.timing]), args.rounds)))
        return
    if args.layout:
        from clients.data import load_demo_corpus, train_test_split

        _, test = train_test_split(load_demo_corpus(), test_fraction=0.1, seed=0)
        print(json.dumps(layout(list(test.texts[: args.timing * 2]), args.rounds)))
        return

    import torch

    from bench._encoders import macro_f1, train_head
    from clients.data import load_demo_corpus, train_test_split
    from models import load_encoder
    from models.runtimes import OnnxRuntime, load_runtime

    torch.set_num_threads(1)
    train, test = train_test_split(load_demo_corpus(), test_fraction=0.1, seed=0)
    tr_x, tr_y = list(train.texts[: args.train]), list(train.labels[: args.train])
    te_x, te_y = list(test.texts[: args.test]), list(test.labels[: args.test])
    encoder = load_encoder()
    chosen = recipes()
    if args.names:
        chosen = {k: chosen[k] for k in args.names.split(",")}
    cache = Path(args.cache)

    def gate(encode: Any, variant: str) -> dict[str, Any]:
        vectors_train, vectors_test = encode(tr_x), encode(te_x)
        spec, head = train_head(vectors_train, tr_y, variant)
        with torch.no_grad():
            predicted = head(vectors_test).argmax(-1).tolist()
        return {"f1": macro_f1(predicted, te_y, len(spec.labels)), "test": vectors_test}

    reference = load_runtime(variant="torch-fp32")
    ref_path = cache / f"torch-{encoder.sha256[:12]}-{args.train}-{args.test}.pt"
    if ref_path.is_file():
        base = torch.load(ref_path)
    else:
        base = gate(lambda t: reference.encode(t, 128), "torch-fp32")
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(base, ref_path)
    _log(f"torch-fp32 macro-F1 {base['f1']:.4f}")

    paths: dict[str, Any] = {"torch-fp32": lambda t: reference.encode(t, 128)}
    dynamic = OnnxRuntime(encoder, "onnx-int8", directory=cache, workers=1)
    paths["onnx-int8 (dynamic, alone)"] = lambda t: dynamic.encode(t, 128)
    rows: dict[str, dict[str, Any]] = {}
    for name, recipe in chosen.items():
        started = time.perf_counter()
        runtime = OnnxRuntime(
            encoder, "onnx-int8-static", directory=cache / name, workers=1, recipe=recipe
        )
        export_s = time.perf_counter() - started
        found = gate(lambda t, r=runtime: r.encode(t, 128), "onnx-int8-static")
        cosine = torch.nn.functional.cosine_similarity(found["test"], base["test"])
        few = te_x[:64]
        alone = torch.cat([runtime.encode([s], 128) for s in few])
        rows[name] = {
            "recipe": json.loads(recipe.tag()),
            "mean_cosine": round(cosine.mean().item(), 4),
            "min_cosine": round(cosine.min().item(), 4),
            "accuracy_change": round(found["f1"] - base["f1"], 4),
            "alone_vs_group_max_abs": float((alone - found["test"][:64]).abs().max()),
            "export_s": round(export_s, 1),
        }
        paths[name] = lambda t, r=runtime: r.encode(t, 128)
        _log(f"{name}: {rows[name]}")

    timing = te_x[: args.timing]
    spent: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.rounds):
        for key, encode in paths.items():
            spent[key].append(cpu_ms(encode, timing))
    cpu = {k: round(sum(v) / len(v), 2) for k, v in spent.items()}
    for name in rows:
        rows[name]["cpu_ms_per_sentence"] = cpu[name]
        rows[name]["vs_torch_fp32"] = round(cpu["torch-fp32"] / cpu[name], 2)
    print(json.dumps({"torch_fp32_macro_f1": round(base["f1"], 4), "cpu_ms": cpu,
                      "recipes": rows, "load": os.getloadavg()}))  # fmt: skip


if __name__ == "__main__":
    main()
