"""bench/serving.py's servers under test and the measures of their processes.

``Server``: ``fedtext serve`` or the naive baseline (``python bench/_serving_servers.py
DATA_DIR PORT``: per request decrypt + rebuild + one forward), each in its own process on
127.0.0.1. Not a benchmark itself (``make bench`` skips ``_*``).
"""

# No `from __future__ import annotations`: FastAPI reads the baseline route's annotations
# (PredictRequest, imported inside baseline_main) as objects, not strings.
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_http_load import drive, run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (noise-robust on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench/serving] {msg}", file=sys.stderr, flush=True)


class Server:
    """A server process on 127.0.0.1; stopped by its PID."""

    def __init__(self, kind: str, data_dir: Path, log_path: Path, **opts: Any) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, FEDTEXT_DATA_DIR=str(data_dir), FEDTEXT_LOG_LEVEL="INFO")
        env.pop("FEDTEXT_DATABASE_URL", None)
        self.operator = secrets.token_urlsafe(32)  # /metrics is the operator's
        if kind == "fedtext":
            env["FEDTEXT_OPERATOR_TOKEN"] = self.operator
            for name, value in opts.items():
                env[f"FEDTEXT_SERVE_{name.upper()}"] = str(value)
            cmd = [str(Path(sys.executable).parent / "fedtext"), "serve", "--port", str(self.port)]
            self.grpc_port = free_port()  # the Open Inference Protocol's gRPC port
            cmd += ["--grpc-port", str(self.grpc_port)]
        else:
            cmd = [sys.executable, __file__, str(data_dir), str(self.port)]
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log, cwd=ROOT)

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 180  # start-up on a loaded 2-core machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.kind} server did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def drive(self, tmp: Path, keys: list[str], texts: list[str], concurrency: int,
              seconds: float, warmup: float) -> dict[str, Any]:  # fmt: skip
        """One load run; adds the server's CPU milliseconds per prediction served."""
        cpu = cpu_s(self.proc.pid)
        run = drive(tmp, self.url, keys, texts, concurrency, seconds, warmup)
        used = cpu_s(self.proc.pid) - cpu
        run["server_cpu_ms_per_prediction"] = round(1000 * used / max(run.pop("all_inputs"), 1), 3)
        return run

    def drive_open(self, tmp: Path, keys: list[str], texts: list[str], rate: float,
                   seconds: float, warmup: float) -> dict[str, Any]:  # fmt: skip
        """An open-loop run at ``rate`` requests/s; adds the server's CPU ms per prediction."""
        cpu = cpu_s(self.proc.pid)
        run = run_load(tmp, {"mode": "open", "url": self.url, "keys": keys, "texts": texts,
                          "rate": rate, "seconds": seconds, "warmup": warmup})  # fmt: skip
        used = cpu_s(self.proc.pid) - cpu
        run["server_cpu_ms_per_prediction"] = round(1000 * used / max(run["requests"], 1), 3)
        return run

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {"name{labels}": value} (fedtext only)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        scrape = {"Authorization": f"Bearer {self.operator}"}
        text = httpx.get(f"{self.url}/metrics", headers=scrape, timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out


def baseline_main(data_dir: str, port: int) -> None:
    """The naive server: per request decrypt + rebuild (DPLSTM as trained) + one forward."""
    import torch
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException
    from sqlmodel import Session

    from fedtext.bootstrap import platform_from_settings
    from fedtext.settings import Settings
    from models import ModelSpec, build_model, load_tokenizer, load_weights
    from serving.schemas import LabelScore, PredictRequest, PredictResponse
    from tenancy.registry import deployed_version, read_model_weights
    from tenancy.tenants import authenticate

    torch.set_num_threads(1)  # same as the fedtext server's forward threads
    platform = platform_from_settings(Settings(data_dir=Path(data_dir)))
    tok = load_tokenizer()
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse)
    def predict(name: str, body: PredictRequest, authorization: str = Header()) -> Any:
        with Session(platform.engine) as session:
            found = authenticate(session=session, presented=authorization.removeprefix("Bearer "))
            if found is None:
                raise HTTPException(401, "bad key")
            row = deployed_version(session=session, tenant_id=found[1].id, name=name)
            if row is None:
                raise HTTPException(404, "no model")
            weights = read_model_weights(
                session=session, keyring=platform.keyring, store=platform.store, row=row
            )
        spec = ModelSpec.from_json(row.spec_json)
        model = load_weights(build_model(spec), weights).eval()
        enc = tok.encode(body.inputs, spec.max_seq_len)
        with torch.inference_mode():
            probs = torch.softmax(model(enc.input_ids, enc.attention_mask), -1)
        top = probs.topk(min(body.top_k, len(spec.labels)), -1)
        return PredictResponse(
            model=name,
            version=row.version,
            predictions=[
                [LabelScore(label=spec.labels[i], score=s) for s, i in zip(ss, ii, strict=True)]
                for ss, ii in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
        )

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- load


if __name__ == "__main__":
    baseline_main(sys.argv[1], int(sys.argv[2]))
