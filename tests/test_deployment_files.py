"""deploy/ checked statically (no Docker engine here): files parse, name real entry points,
options and settings, and the Kubernetes manifests pass a schema validator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from dockerfile_parse import DockerfileParser

from fedtext.cli.federation import federation_app
from fedtext.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _command_options(name: str) -> set[str]:
    command = typer.main.get_command(federation_app)
    sub = command.commands[name]  # type: ignore[attr-defined]
    return {opt for p in sub.params for opt in p.opts}


def _command_envvars(name: str) -> set[str]:
    command = typer.main.get_command(federation_app)
    sub = command.commands[name]  # type: ignore[attr-defined]
    return {p.envvar for p in sub.params if isinstance(p.envvar, str)}


def _setting_envvars() -> set[str]:
    return {f"FEDTEXT_{name.upper()}" for name in Settings.model_fields} | {"FEDTEXT_KEK"}


KNOWN_ENV = (
    _setting_envvars()
    | _command_envvars("node")
    | _command_envvars("run")
    | {
        "FLWR_HOME",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
        "FLWR_TELEMETRY_ENABLED",
        "FLWR_DISABLE_UPDATE_CHECK",
        "HF_HUB_OFFLINE",
    }
)


def test_there_are_coordinator_cpu_and_cuda_node_images() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "coordinator.Dockerfile",
        "node.Dockerfile",
        "node-cuda.Dockerfile",
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_names_real_things(path: Path) -> None:
    parser = DockerfileParser(path=str(path))
    structure = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    instructions = [i["instruction"] for i in structure]
    assert instructions[0] in ("FROM", "ARG") and "ENTRYPOINT" in instructions
    assert "USER" in instructions, "images run as a non-root user"
    for item in structure:
        if item["instruction"] == "COPY":
            for source in item["value"].split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    # Every package the distribution ships is copied in.
    copied = {i["value"].split()[0] for i in structure if i["instruction"] == "COPY"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"{pattern.rstrip('*')} is not copied in"
    entry = yaml.safe_load(structure[instructions.index("ENTRYPOINT")]["value"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts and entry[1] == "federation"
    command = entry[2]
    options = {a.split("=")[0] for a in entry[3:] if a.startswith("--")}
    if "CMD" in instructions:
        cmd = yaml.safe_load(structure[instructions.index("CMD")]["value"])
        options |= {a.split("=")[0] for a in cmd if a.startswith("--")}
    assert options <= _command_options(command), options - _command_options(command)
    for name in parser.envs:
        assert name in KNOWN_ENV or not name.startswith(("FEDTEXT_", "FLWR_")), name
    assert parser.envs.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1"
    if "cuda" in path.name:
        assert re.search(r"whl/cu\d+", parser.content)
    else:
        assert "whl/cpu" in parser.content


def _env_names(env: Any) -> set[str]:
    if isinstance(env, dict):
        return set(env)
    return {item["name"] if isinstance(item, dict) else item.split("=")[0] for item in env}


def test_compose_has_postgres_coordinator_and_nodes_with_real_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    coordinator = services["coordinator"]
    assert coordinator["environment"]["FEDTEXT_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in coordinator["environment"]["FEDTEXT_DATABASE_URL"]
    nodes = [s for n, s in services.items() if n.startswith("node-")]
    assert len(nodes) >= 2
    dockerfiles = set()
    for service in services.values():
        for name in _env_names(service.get("environment", {})):
            assert name in KNOWN_ENV or not name.startswith(("FEDTEXT_", "FLWR_")), name
        if "build" in service:
            dockerfile = DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]
            assert dockerfile.resolve().is_file(), dockerfile
            dockerfiles.add(dockerfile.name)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert ":ro" in volume, f"{volume}: credentials and data mount read-only"
    assert dockerfiles == {p.name for p in DOCKERFILES}
    for node in nodes:
        env = node["environment"]
        assert {"FEDTEXT_SUPERLINK", "FEDTEXT_NODE_TENANT", "FEDTEXT_NODE_DATA"} <= set(env)
        assert env["FEDTEXT_SUPERLINK"].startswith("coordinator:")


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in MANIFESTS:
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_pass_the_schema_validator() -> None:
    import kubernetes_validate

    docs = _documents()
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_kubernetes_manifests_validate_from_the_command_line_too() -> None:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    files = [str(p) for p in MANIFESTS if p.name != "kustomization.yaml"]
    result = subprocess.run(
        [str(exe), "--strict", "-k", "1.33.0", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_has_secrets_for_keys_a_volume_for_blobs_and_real_settings() -> None:
    docs = _documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", "fedtext-coordinator-data") in kinds
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in MANIFESTS if p.name != "kustomization.yaml"
    )
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    coordinator = deployments["fedtext-coordinator"]["spec"]["template"]["spec"]
    (container,) = coordinator["containers"]
    assert {a.split("=")[0] for a in container["args"]} <= _command_options("coordinator")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/fedtext"]["name"] == "data"
    assert mounts["/run/secrets/fedtext"]["readOnly"] is True
    volumes = {v["name"]: v for v in coordinator["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "fedtext-superlink-tls"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fedtext-coordinator-data"
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            assert _env_names(c.get("env", [])) <= KNOWN_ENV, name
            for v in spec["volumes"]:
                if "secret" in v:
                    assert v["secret"]["defaultMode"] & 0o007 == 0, "secrets not world-readable"
    node = deployments["fedtext-node-acme"]["spec"]["template"]["spec"]
    node_secrets = [v["secret"]["secretName"] for v in node["volumes"] if "secret" in v]
    assert node_secrets == ["fedtext-node-acme"]


@pytest.mark.parametrize("script", sorted((DEPLOY / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_valid_bash_and_explain_themselves(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "deploy/scripts/" in usage.stderr


def test_make_credentials_script_creates_a_federation(tmp_path: Path) -> None:
    fedtext = Path(sys.executable).parent / "fedtext"
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "scripts" / "make-credentials.sh"),
            str(tmp_path / "creds"),
            "coordinator,127.0.0.1",
            "acme",
            "globex",
        ],
        env={**os.environ, "FEDTEXT": str(fedtext)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for tenant in ("acme", "globex"):
        assert (tmp_path / "creds" / "nodes" / tenant / "node.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "creds" / "superlink" / "server.crt").is_file()
