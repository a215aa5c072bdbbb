"""`fedtext serve`: the HTTP API (predictions, keys, models, privacy, training runs)."""

from __future__ import annotations

import gc
import secrets
from pathlib import Path
from typing import Annotated

import typer

from fedtext.cli.console import UserError, console, open_platform, settings

DEFAULT_GRPC_PORT = 8081


def forwarded_headers(allow_ips: str) -> dict[str, object]:
    """uvicorn's proxy options for FEDTEXT_FORWARDED_ALLOW_IPS: off unless proxies are named."""
    trusted = [part.strip() for part in allow_ips.split(",") if part.strip()]
    if not trusted:
        return {"proxy_headers": False, "forwarded_allow_ips": []}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted}


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Bind address. Default: FEDTEXT_API_HOST, else 127.0.0.1."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port. Default: FEDTEXT_API_PORT, else 8000.")
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the Open Inference Protocol over gRPC (same host); 0: off. "
            f"Default {DEFAULT_GRPC_PORT}, skipped with a warning if taken.",
            show_default=False,
        ),
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM) for HTTP and gRPC.")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
) -> None:
    """Serve the HTTP API (predictions, keys, models, privacy, training runs).

    Runs started over HTTP are simulated on this machine, or run on the federation of
    FEDTEXT_SUPERLINK (with FEDTEXT_SUPERLINK_CA) when it is set.
    """
    import uvicorn

    from serving.app import create_app
    from serving.config import ServingConfig, default_inference_threads
    from serving.connections import server_config
    from serving.logs import configure_json_logging
    from serving.protocols.oip.server import GrpcEndpoint
    from serving.runtime.memory import tune_allocator

    config = settings()
    if config.operator_token is None:
        if not config.dev_mode:
            raise UserError(
                "Set FEDTEXT_OPERATOR_TOKEN (32+ random characters), or FEDTEXT_DEV_MODE=1."
            )
        token = secrets.token_urlsafe(32)
        console.print(f"dev mode: operator token for this process: {token}")
    else:
        token = config.operator_token
    configure_json_logging(config.log_level)
    tune_allocator()  # before the server's threads start: resident memory tracks what is held
    kek = config.resolved_kek_file.resolve()
    if config.key_provider == "file" and kek.is_relative_to(config.data_dir.resolve()):
        # Insecure modes are loud: a copy of the data directory then decrypts every model.
        console.print(
            f"warning: the key-encryption key is a file inside the data directory ({kek}); "
            "a copy of the directory decrypts every tenant's models. In production use "
            "FEDTEXT_KEY_PROVIDER=pkcs11 (an HSM; docs/SECURITY.md)."
        )
    from fedtext.log_file import keep_in_file

    keep_in_file()  # Alembic's migrations and the libraries' warnings: the log file only
    from orchestration.federation import FederationRunLauncher
    from orchestration.flower import FlowerError
    from orchestration.worker import LocalRunLauncher
    from serving.launcher import RunLauncher
    from serving.limits import Limits

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise UserError("TLS needs both --ssl-certfile and --ssl-keyfile.")
    bind = host or config.api_host
    try:
        limits = Limits(
            max_body_bytes=config.max_body_bytes,
            rate_per_second=config.rate_limit_per_second,
            burst=config.rate_limit_burst,
            failed_auth_per_second=config.failed_auth_per_second,
            failed_auth_burst=config.failed_auth_burst,
            max_header_bytes=config.max_header_bytes,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            max_connections=config.max_connections,
        )
    except ValueError as exc:
        raise UserError(f"FEDTEXT_* limits: {exc}") from None
    grpc = (
        GrpcEndpoint(
            DEFAULT_GRPC_PORT if grpc_port is None else grpc_port,
            bind,
            ssl_certfile,
            ssl_keyfile,
            max_message_bytes=config.max_body_bytes,
            required=grpc_port is not None,
            limits=limits,  # the per-key rate limits hold on gRPC too
        )
        if grpc_port != 0
        else None
    )
    platform = open_platform(config)
    launcher: RunLauncher
    if config.superlink:
        try:
            launcher = FederationRunLauncher(
                platform, config.data_dir / "runs", config.superlink, config.superlink_ca
            )
        except (FlowerError, ValueError) as exc:  # a bad address or CA certificate
            raise UserError(f"FEDTEXT_SUPERLINK: {exc}") from None
        console.print(f"training runs go to the SuperLink at {config.superlink}")
    else:
        # Runs' scratch files (vectors of tenants' text) live in data_dir/scratch/RUN (0700).
        launcher = LocalRunLauncher(platform, config.data_dir / "runs", config.data_dir / "scratch")
    app_ = create_app(
        platform,
        ServingConfig(
            operator_token=token,
            max_predict_inputs=config.max_predict_inputs,
            max_input_chars=config.max_input_chars,
            cache_models=config.serve_cache_models,
            cache_bytes=config.serve_cache_mb * 2**20,
            max_batch=config.serve_max_batch,
            max_wait_ms=config.serve_max_wait_ms,
            inference_threads=config.serve_inference_threads or default_inference_threads(),
            torch_threads=config.serve_torch_threads,
            lookup_ttl_s=config.serve_lookup_ttl_s,
            max_budget_epsilon=config.max_budget_epsilon,
            max_keys_per_tenant=config.max_keys_per_tenant,
            shared_encoder=config.serve_shared_encoder,
            encoder_runtime=config.serve_encoder_runtime,
            encoder_precision=config.serve_encoder_precision,
            encoder_device=config.serve_encoder_device,
        ),
        limits=limits,
        run_launcher=launcher,
        grpc=grpc,
    )
    from fedtext.handoff import console_url, print_serving_console

    bound_port = port or config.api_port
    url = console_url(bind, bound_port, tls=ssl_certfile is not None)
    print_serving_console(console, platform, url)
    # The startup heap (torch, tokenizer, routes) never becomes garbage: out of the cyclic
    # collector's sight, its full collections stop adding tens of ms to tail latency.
    gc.collect()
    gc.freeze()
    # Our middleware writes one JSON line per request; uvicorn's own access log would repeat
    # it. The protocol adds head-size, timeout and connection limits (serving/connections.py).
    server = server_config(
        app_,
        host=bind,
        port=bound_port,
        limits=limits,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: then anyone
        # on this host (or a local proxy that passes the header through) picks the address
        # the failed-authentication limit counts. Only configured proxies are believed.
        **forwarded_headers(config.forwarded_allow_ips),
    )
    running = uvicorn.Server(server)
    running.run()
    if not running.started:  # startup failed (a port taken, ...): the log says why
        raise UserError("The server did not start; the log above says why.")
