"""The PKCS#11 key provider against a real SoftHSM2 token: the KEK is made in the token and
never leaves it; a platform on it trains, serves and rotates; a copy of its data directory
decrypts nothing (issue 16, finding 6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from tenancy.db import session_scope
from tenancy.errors import DecryptionError, KeyProviderError
from tenancy.hsm import SOFTHSM2_MODULE, Pkcs11Config, Pkcs11KeyProvider
from tenancy.platform import Platform
from tenancy.registry import read_model_weights
from tenancy.rotation import rotate_dek, rotate_kek
from tenancy.tables import DataKey, ModelVersion, Tenant
from tests.factories import make_tenant, store_tiny_model

HAVE_SOFTHSM = os.path.exists(SOFTHSM2_MODULE) and shutil.which("softhsm2-util") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_SOFTHSM and not os.environ.get("CI"),
    reason="SoftHSM2 is not installed (apt-get install softhsm2; .ci/run installs it)",
)
PIN = "4711-user"


@dataclass(frozen=True)
class Token:
    conf: Path
    label: str

    def config(self, key_label: str | None = None) -> Pkcs11Config:
        return Pkcs11Config(
            SOFTHSM2_MODULE, self.label, PIN, key_label or f"kek-{uuid.uuid4().hex[:8]}"
        )

    def settings(self, data_dir: Path, key_label: str) -> Settings:
        return Settings(
            data_dir=data_dir,
            key_provider="pkcs11",
            pkcs11_module=SOFTHSM2_MODULE,
            pkcs11_token=self.label,
            pkcs11_pin=PIN,
            pkcs11_key_label=key_label,
        )


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """One SoftHSM2 token for the module (the module loads the library once per process);
    tests keep apart by key label."""
    assert HAVE_SOFTHSM, f"CI needs SoftHSM2 ({SOFTHSM2_MODULE}, softhsm2-util)"
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    label = f"fedtext-{uuid.uuid4().hex[:6]}"
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--pin", PIN, "--so-pin", "4711-so"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield Token(conf, label)
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def test_the_kek_is_generated_in_the_token_and_never_leaves_it(token: Token) -> None:
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    provider = Pkcs11KeyProvider(token.config())
    assert provider.current_version() == 1  # generated in the token on first use
    with provider._lock:
        kek = provider._find(1)
        assert kek[Attribute.SENSITIVE] and not kek[Attribute.EXTRACTABLE]
        assert kek[Attribute.TOKEN]
        with pytest.raises(AttributeSensitive):
            kek[Attribute.VALUE]
    with pytest.raises(KeyProviderError, match="never leaves"):
        provider.get_kek(1)
    # Wrapping happens in the token, with associated data: a key moved to another tenant's
    # row (other associated data) or altered does not unwrap.
    wrapped = provider.wrap_key(1, b"k" * 32, b"fedtext:dek:acme:kek-v1")
    assert b"k" * 32 not in wrapped
    assert provider.unwrap_key(1, wrapped, b"fedtext:dek:acme:kek-v1") == b"k" * 32
    with pytest.raises(DecryptionError):
        provider.unwrap_key(1, wrapped, b"fedtext:dek:globex:kek-v1")
    with pytest.raises(DecryptionError):
        provider.unwrap_key(1, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), b"fedtext:dek:acme:kek-v1")
    # A session the token dropped (an HSM restart) is reopened, not reported as a bad key.
    provider._session.close()
    assert provider.unwrap_key(1, wrapped, b"fedtext:dek:acme:kek-v1") == b"k" * 32
    # Derived platform keys are stable and differ per purpose.
    assert provider.derive_key(1, "a") == provider.derive_key(1, "a") != provider.derive_key(1, "b")


def test_rotation_in_the_token_rewraps_and_retires(token: Token, tmp_path: Path) -> None:
    platform = Platform.create(
        database_url=f"sqlite:///{tmp_path / 'fedtext.db'}",
        blob_dir=tmp_path / "blobs",
        key_provider="pkcs11",
        kek_file=tmp_path / "unused.key",
        pkcs11=token.config(),
    )
    upgrade_schema(platform)
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    row = store_tiny_model(platform, acme.tenant)
    store_tiny_model(platform, globex.tenant)
    with Session(platform.engine) as session:
        before = read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )
    result = rotate_kek(platform.engine, platform.keyring, grace_seconds=0)
    assert (result.new_version, result.rewrapped, result.retired) == (2, 2, [1])
    provider = platform.keyring.provider
    assert provider.versions() == [2]
    with pytest.raises(KeyProviderError):  # version 1 is destroyed in the token
        provider.unwrap_key(1, b"FTX1" + b"\0" * 44, b"")
    assert rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
    with Session(platform.engine) as session:
        assert {k.kek_version for k in session.exec(select(DataKey))} == {2}
        row2 = session.exec(
            select(ModelVersion).where(ModelVersion.tenant_id == acme.tenant.id)
        ).one()
        assert (
            read_model_weights(
                session=session, keyring=platform.keyring, store=platform.store, row=row2
            )
            == before
        )
        # A wrapped data key moved to another tenant's row does not unwrap in the token.
        keys = {k.tenant_id: k for k in session.exec(select(DataKey))}
        with pytest.raises(DecryptionError):
            provider.unwrap_key(
                2, keys[acme.tenant.id].wrapped, f"fedtext:dek:{globex.tenant.id}:kek-v2".encode()
            )


@pytest.mark.slow
def test_an_hsm_platform_trains_serves_rotates_and_its_copy_decrypts_nothing(
    token: Token, tmp_path: Path
) -> None:
    from orchestration.simulation import SimulationConfig, simulate
    from serving.app import create_app
    from serving.config import ServingConfig
    from tenancy.tenants import Scope, create_api_key, create_tenant

    data = tmp_path / "data"
    settings = token.settings(data, key_label=f"prod-{uuid.uuid4().hex[:6]}")
    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    with session_scope(platform.engine) as session:
        for name in ("acme", "globex"):
            tenant = create_tenant(session=session, keyring=platform.keyring, name=name)
            if name == "acme":
                _, key = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
    config = SimulationConfig(
        tenants=["acme", "globex"],
        rounds=1,
        epsilon=3.0,
        model="lstm",
        partitioning="iid",
        batch_size=16,
        local_epochs=1,
        max_train_examples=32,
        max_test_examples=16,
        personalize_epochs=1,
        min_nodes=2,
        secure_mode=False,
        model_config={"proj_dim": 8, "hidden_dim": 8, "dropout": 0.0},
    )
    simulate(platform, config)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"inputs": ["the flight was late again"]}

    def predict() -> int:
        with TestClient(create_app(platform, ServingConfig())) as client:
            r = client.post("/v1/models/lstm/predict", json=body, headers=headers)
            assert r.status_code == 200, r.text
            return len(r.json()["predictions"][0])

    assert predict() >= 1
    rotation = rotate_kek(platform.engine, platform.keyring, grace_seconds=0)
    assert rotation.new_version == 2 and rotation.rewrapped == 2
    assert predict() >= 1  # a fresh API unwraps under the new KEK, in the token
    # Nothing in the data directory is a key: no key file, no KEK bytes anywhere.
    assert not (data / "keys").exists()
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    platform.engine.dispose()
    with Session(platform.engine) as session:
        acme = session.exec(select(Tenant).where(Tenant.name == "acme")).one()
        blob_key = session.exec(
            select(ModelVersion.blob_key).where(ModelVersion.tenant_id == acme.id)
        ).first()
    assert blob_key is not None and (copy / "blobs" / blob_key).exists()
    # The copy, without the token: no provider can unwrap its data keys.
    script = (
        "import sys\n"
        "from sqlmodel import Session, select\n"
        "from fedtext.bootstrap import platform_from_settings\n"
        "from fedtext.settings import Settings\n"
        "from tenancy.registry import read_model_weights\n"
        "from tenancy.tables import ModelVersion\n"
        "p = platform_from_settings(Settings())\n"
        "with Session(p.engine) as s:\n"
        "    row = s.exec(select(ModelVersion)).first()\n"
        "    try:\n"
        "        read_model_weights(session=s, keyring=p.keyring, store=p.store, row=row)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc); sys.exit(3)\n"
        "print('DECRYPTED'); sys.exit(0)\n"
    )
    empty = tmp_path / "other-hsm"
    (empty / "tokens").mkdir(parents=True)
    (empty / "softhsm2.conf").write_text(f"directories.tokendir = {empty / 'tokens'}\n")
    attempts = {
        # The same settings on another machine, whose HSM lacks the token.
        "pkcs11 without the token": {
            "FEDTEXT_KEY_PROVIDER": "pkcs11",
            "FEDTEXT_PKCS11_MODULE": SOFTHSM2_MODULE,
            "FEDTEXT_PKCS11_TOKEN": token.label,
            "FEDTEXT_PKCS11_PIN": PIN,
            "FEDTEXT_PKCS11_KEY_LABEL": settings.pkcs11_key_label,
            "SOFTHSM2_CONF": str(empty / "softhsm2.conf"),
        },
        # The development default: the key file it makes anew in the copy holds no KEK of
        # the token's (the data keys are wrapped under version 2, after the rotation).
        "file provider": {"FEDTEXT_KEY_PROVIDER": "file"},
    }
    expected = {
        "pkcs11 without the token": f"KeyProviderError No PKCS#11 token labelled '{token.label}'",
        "file provider": "KeyProviderError KEK version 2 is not in",
    }
    for what, extra in attempts.items():
        env = {**os.environ, "FEDTEXT_DATA_DIR": str(copy), **extra}
        env.pop("FEDTEXT_DATABASE_URL", None)
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 3 and "DECRYPTED" not in r.stdout, (what, r.stdout, r.stderr)
        assert r.stdout.startswith(expected[what]), (what, r.stdout)
