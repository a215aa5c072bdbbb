"""`fedtext federation ...` without a running federation: credentials and user mistakes."""

from __future__ import annotations

import socket
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedtext.cli import app
from orchestration.flower import FlowerError, build_run_config, parse_address, write_connection
from tenancy.certificates import CredentialLayout, CredentialsError, create_credentials

runner = CliRunner()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_are_private_and_what_flower_expects(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    result = runner.invoke(
        app,
        [
            "federation",
            "credentials",
            "--out",
            str(out),
            "--host",
            "coordinator.example.org",
            "--host",
            "10.0.0.5",
            "--tenant",
            "acme",
            "--tenant",
            "globex",
        ],
    )
    assert result.exit_code == 0, result.output
    layout = CredentialLayout(out)
    for directory in (out, out / "ca", layout.superlink_dir, out / "nodes", out / "nodes" / "acme"):
        assert _mode(directory) == 0o700, directory
    for key in (layout.ca_key, layout.server_key, layout.node("acme").private_key):
        assert _mode(key) == 0o600, key

    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    node = layout.node("globex")
    private = serialization.load_ssh_private_key(node.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(node.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert node.ca_cert.read_bytes() == layout.ca_cert.read_bytes()
    assert not (node.directory / "ca.key").exists()


def test_credentials_keep_existing_keys_and_refuse_a_cert_without_the_host(tmp_path: Path) -> None:
    first = create_credentials(tmp_path, hosts=["127.0.0.1"], tenants=["acme"])
    key = first.layout.node("acme").private_key.read_bytes()
    again = create_credentials(tmp_path, hosts=["127.0.0.1"], tenants=["acme", "globex"])
    assert first.layout.node("acme").private_key.read_bytes() == key
    assert first.layout.node("acme").private_key in again.kept
    with pytest.raises(CredentialsError, match=r"does not name link\.example\.org"):
        create_credentials(tmp_path, hosts=["127.0.0.1", "link.example.org"], tenants=[])
    renewed = create_credentials(
        tmp_path, hosts=["link.example.org"], tenants=[], renew_server_cert=True
    )
    assert renewed.layout.server_cert in renewed.created


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "bad host!"], "neither a host name nor an IP"),
        (["--host", "127.0.0.1", "--tenant", "../etc"], "not a usable tenant node name"),
    ],
)
def test_credentials_user_mistakes_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["federation", "credentials", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_refuses_missing_files_and_an_unreachable_superlink(tmp_path: Path) -> None:
    creds = create_credentials(tmp_path / "creds", hosts=["127.0.0.1"], tenants=["acme"]).layout
    data = tmp_path / "acme.csv"
    data.write_text(
        "text,label\n"
        + "".join(f"row {i},{'negative' if i % 2 else 'positive'}\n" for i in range(8))
    )
    base = ["federation", "node", "--tenant", "acme", "--superlink"]
    closed = f"127.0.0.1:{_free_port()}"
    bundle = str(creds.node("acme").directory)
    cases = [
        (
            [*base, closed, "--data", str(tmp_path / "nope.csv"), "--credentials", bundle],
            "not found",
        ),
        ([*base, closed, "--data", str(data), "--key", str(tmp_path / "x.key")], "does not exist"),
        ([*base, closed, "--data", str(data), "--credentials", bundle], "unreachable"),
        ([*base, "no-port", "--data", str(data), "--credentials", bundle], "host:port"),
        (
            [*base, closed, "--data", str(data), "--credentials", bundle, "--device", "cuda:7"],
            "Device",
        ),
    ]
    for args, message in cases:
        if "cuda:7" in args:
            import torch

            if torch.cuda.device_count() > 7:
                continue
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output


def test_node_refuses_a_public_key_in_place_of_its_private_key(tmp_path: Path) -> None:
    creds = create_credentials(tmp_path, hosts=["127.0.0.1"], tenants=["acme"]).layout
    data = tmp_path / "acme.jsonl"
    data.write_text('{"text": "a", "label": "neutral"}\n{"text": "b", "label": "neutral"}\n')
    result = runner.invoke(
        app,
        [
            "federation",
            "node",
            "--tenant",
            "acme",
            "--superlink",
            "127.0.0.1:1",
            "--data",
            str(data),
            "--key",
            str(creds.node("acme").public_key),
            "--ca",
            str(creds.ca_cert),
        ],
    )
    assert result.exit_code == 2 and "not an unencrypted OpenSSH private key" in result.output


def test_coordinator_refuses_to_start_without_its_certificate(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["federation", "coordinator", "--credentials", str(tmp_path), "--no-api"]
    )
    assert result.exit_code == 2
    assert "SuperLink certificate" in result.output and "does not exist" in result.output


def test_run_config_is_checked_against_the_app_keys() -> None:
    known = {"rounds": 2, "epsilon": 3.0, "secure-mode": True, "model-config": "{}"}
    got = build_run_config(
        known, {"rounds": 3, "epsilon": None}, ["epsilon=2", "secure-mode=false"]
    )
    assert got == {"rounds": 3, "epsilon": 2.0, "secure-mode": False}
    with pytest.raises(FlowerError, match="Unknown run configuration key"):
        build_run_config(known, {}, ["epochs=3"])
    with pytest.raises(FlowerError, match=r"expected int \(like 2\)"):
        build_run_config(known, {}, ["rounds=three"])


def test_run_refuses_unknown_keys_and_bad_values_before_contacting_anyone(tmp_path: Path) -> None:
    base = ["federation", "run", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt")]
    for extra, message in [
        (["-c", "epochs=3"], "Unknown run configuration key"),
        (["--epsilon", "-1"], "epsilon should be a positive value"),
        (["--model-config", "[1]"], "not a JSON object"),
        ([], "does not exist"),  # the CA certificate
    ]:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_connection_is_written_privately_and_keeps_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    path = write_connection("one", "127.0.0.1:9092", ca)
    write_connection("two", "link.example.org:9092", ca)
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "one"
    assert config["superlink"]["two"] == {
        "address": "link.example.org:9092",
        "root-certificates": str(ca.resolve()),
    }
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert parse_address("[::1]:9092") == ("::1", 9092)
