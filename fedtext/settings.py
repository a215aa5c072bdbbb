"""One validated settings object per process (env prefix ``FEDTEXT_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # PKCS#11 and the key providers load only where a key is used
    from tenancy.hsm import Pkcs11Config

# How to make an operator token, in the messages that refuse one.
TOKEN_HINT = (
    "export FEDTEXT_OPERATOR_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
)
_PLACEHOLDER_TOKENS = {"", "changeme", "change-me", "secret", "operator"}


# models/runtimes.RUNTIMES, spelled out so that settings import no torch (a test checks they agree).
EncoderRuntimeName = Literal[
    "torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-static", "openvino-int8-static"
]


class Settings(BaseSettings):
    """Platform settings, read from the environment (``FEDTEXT_*``) or a ``.env`` file."""

    model_config = SettingsConfigDict(env_prefix="FEDTEXT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("./var"), description="Where blobs, keys and the DB live.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is a SQLite file in data_dir."
    )
    key_provider: str = Field(
        default="file",
        description="'pkcs11' (an HSM: use it in production), 'file' or 'env' (development).",
    )
    kek_file: Path | None = Field(default=None, description="Default: data_dir/keys/kek.key.")
    kek_env: str = Field(default="FEDTEXT_KEK", description="Env var holding a base64 KEK.")
    pkcs11_module: str | None = Field(
        default=None,
        description="The HSM vendor's PKCS#11 library (SoftHSM2: "
        "/usr/lib/softhsm/libsofthsm2.so), for key_provider 'pkcs11'.",
    )
    pkcs11_token: str | None = Field(default=None, description="The token's label.")
    pkcs11_pin: SecretStr | None = Field(default=None, description="The token's user PIN.")
    pkcs11_key_label: str = Field(
        default="fedtext-kek", description="Label prefix of the KEKs in the token."
    )
    operator_token: str | None = None
    dev_mode: bool = Field(default=False, description="Allows a generated operator token.")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_predict_inputs: int = 64
    max_input_chars: int = 2000
    serve_cache_models: int = Field(default=32, description="Decrypted models kept in memory.")
    serve_cache_mb: int = Field(default=512, description="Bytes bound of that cache, in MiB.")
    serve_max_batch: int = Field(default=64, description="Inputs per forward; 1: no batching.")
    serve_max_wait_ms: float = Field(default=2.0, description="Longest wait to fill a batch.")
    serve_inference_threads: int | None = Field(
        default=None, description="Forward-pass threads; default half the cores."
    )
    serve_torch_threads: int = Field(default=1, description="torch intra-op threads.")
    serve_lookup_ttl_s: float = Field(
        default=1.0,
        ge=0,
        description="Seconds the predict path reuses a key's and a deployment's database answer "
        "(changes through the API apply at once; from other processes within this); 0: off.",
    )
    serve_shared_encoder: bool = Field(
        default=True,
        description="encoder-head models share one encoder per process, batched across "
        "tenants; false serves them per model.",
    )
    serve_encoder_runtime: EncoderRuntimeName = Field(
        default="torch-fp32",
        description="Shared encoder: the runtime variant that computes sentence vectors "
        "(models/runtimes.py; a variant that failed the accuracy gate is refused). A head "
        "is served only on the variant it was trained on.",
    )
    serve_encoder_precision: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32",
        description="Shared encoder on the torch-fp32 runtime only: fp32 (exact), bf16, or "
        "int8 (CPU), approximations of torch-fp32's vectors.",
    )
    serve_encoder_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Shared encoder: auto (CUDA when present), cpu or cuda."
    )
    blob_store: Literal["file", "database"] = Field(
        default="file",
        description="Where encrypted blobs live: file (data_dir/blobs) or database "
        "(PostgreSQL; replicas of the API need no shared disk).",
    )
    max_budget_epsilon: float = Field(
        default=100.0,
        gt=0,
        allow_inf_nan=False,
        description="The largest epsilon budget a tenant (or the operator) may set; larger "
        "values are refused naming this bound.",
    )
    max_keys_per_tenant: int = Field(
        default=100,
        ge=1,
        description="Live (unrevoked, unexpired) API keys one tenant may hold; creating "
        "another is refused (409) until one is revoked.",
    )
    log_level: str = "INFO"
    max_body_bytes: int = Field(default=1 << 20, description="Larger request bodies get 413.")
    rate_limit_per_second: float | None = Field(
        default=100.0, description="Requests per second per API key (429 beyond); off: no limit."
    )
    rate_limit_burst: int = Field(default=200, description="Requests a key may send at once.")
    failed_auth_per_second: float | None = Field(
        default=1.0,
        description="Failed authentications (401) per second per client address; beyond it "
        "unknown credentials from that address get 429 without a database lookup. off: no limit.",
    )
    failed_auth_burst: int = Field(default=20, description="Failures an address may make at once.")
    max_header_bytes: int = Field(
        default=16 * 1024, description="Largest request line plus headers (431 beyond)."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request's headers (408)."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send a request's body (408)."
    )
    max_connections: int = Field(
        default=1000, ge=1, description="Open connections per API process (503 beyond)."
    )
    forwarded_allow_ips: str = Field(
        default="",
        description="Comma-separated addresses or networks of reverse proxies whose "
        "X-Forwarded-For/-Proto are trusted (the client address for the per-address limits "
        "then comes from them); empty: none, the connection's own address is used. '*' "
        "trusts every peer: only behind a proxy that is the sole way in.",
    )
    superlink: str | None = Field(
        default=None,
        description="host:port of a SuperLink: `POST /v1/runs` then runs on that federation "
        "instead of a local simulation.",
    )
    superlink_ca: Path | None = Field(
        default=None, description="The CA certificate of that SuperLink's TLS certificate."
    )

    @field_validator("rate_limit_per_second", "failed_auth_per_second", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """``off``, ``none`` or an empty value turn a rate limit off."""
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        """Each entry an IP address, a network (10.0.0.0/8) or '*'; named when it is not."""
        import ipaddress

        for part in (p.strip() for p in value.split(",")):
            if not part or part == "*":
                continue
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(
                    f"FEDTEXT_FORWARDED_ALLOW_IPS: {part!r} is not an IP address or network."
                ) from None
        return value

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        token = self.operator_token
        if token is not None and token.strip().lower() in _PLACEHOLDER_TOKENS:
            raise ValueError(
                "FEDTEXT_OPERATOR_TOKEN is a placeholder; set a random value of 32+ characters: "
                + TOKEN_HINT
            )
        if token is not None and len(token) < 32 and not self.dev_mode:
            raise ValueError(
                f"FEDTEXT_OPERATOR_TOKEN must be at least 32 characters outside dev mode "
                f"(it has {len(token)}): {TOKEN_HINT}"
            )
        if self.key_provider == "pkcs11":
            self.pkcs11_config()  # a missing module, token label or PIN, named now
        if self.superlink and self.superlink_ca is None:
            raise ValueError(
                "FEDTEXT_SUPERLINK needs FEDTEXT_SUPERLINK_CA (the federation's ca.crt): "
                "the SuperLink only speaks TLS."
            )
        return self

    def pkcs11_config(self) -> Pkcs11Config | None:
        """The token settings of key_provider 'pkcs11' (None for the other providers)."""
        if self.key_provider != "pkcs11":
            return None
        from tenancy.hsm import Pkcs11Config

        return Pkcs11Config(
            module=self.pkcs11_module or "",
            token_label=self.pkcs11_token or "",
            pin=self.pkcs11_pin.get_secret_value() if self.pkcs11_pin else "",
            key_label=self.pkcs11_key_label,
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fedtext.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def resolved_kek_file(self) -> Path:
        return self.kek_file or (self.data_dir / "keys" / "kek.key")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
