"""deploy/kubernetes/: the relay tier's manifests (issue 15), checked offline: each one
against the Kubernetes API schema (kubernetes-validate, strict: unknown fields fail),
the TOML they carry against tunnelgate's own config loader, and the wiring between
them (mounts, ports, selectors, probes) against what the gateway actually does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import parse_config
from tests.gateways import keygen

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest still-supported minor release we target


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((MANIFESTS / name).read_text())
    return data


def _resources() -> list[str]:
    listed: list[str] = _load("kustomization.yaml")["resources"]
    return listed


def test_the_kustomization_lists_every_manifest() -> None:
    on_disk = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(_resources()) == on_disk


@pytest.mark.parametrize("name", _resources())
def test_each_manifest_is_valid_against_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(_load(name), KUBERNETES_VERSION, strict=True)


def test_the_tier_config_loads_and_matches_the_deployment(tmp_path: Path) -> None:
    config_map = _load("configmap.yaml")
    deployment = _load("deployment.yaml")
    service = _load("service.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    # The TOML loads with tunnelgate's own loader (paths moved into a scratch folder
    # holding real generated keys and certificates).
    for name in ("hub", "edge", "dc"):
        keygen(tmp_path, name)
    text = config_map["data"]["hub.toml"]
    for folder in ("/var/lib/tunnelgate/", "/etc/tunnelgate/peers/"):
        text = text.replace(folder, f"{tmp_path}/")
    config = parse_config(text, "hub.toml", tmp_path)
    assert config.gateway.name == "hub" and config.gateway.resume_timeout > 0

    # Where the config points is where the pod puts things.
    toml = config_map["data"]["hub.toml"]
    assert mounts["/etc/tunnelgate/hub.toml"]["subPath"] == "hub.toml"
    assert 'key = "/var/lib/tunnelgate/hub.key"' in toml and "/var/lib/tunnelgate" in mounts
    for cert in ("edge.crt", "dc.crt"):
        assert f"/etc/tunnelgate/peers/{cert}" in toml and cert in config_map["data"]
    assert container["args"][:2] == ["run", "/etc/tunnelgate/hub.toml"]

    # The carrier port: listened on, exposed, and what the Service sends to.
    (address,) = config.gateway.listen
    (port,) = container["ports"]
    assert port["containerPort"] == address.port and address.host == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"] == labels == deployment["spec"]["selector"]["matchLabels"]
    assert _load("pdb.yaml")["spec"]["selector"]["matchLabels"] == labels

    # A tier of three; a drain that ends before Kubernetes kills the pod.
    assert deployment["spec"]["replicas"] == 3
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.gateway.drain_timeout
    # Probes read the file `run --ready-file` writes once every listener is bound.
    ready = container["args"][container["args"].index("--ready-file") + 1]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][-1] == ready
    assert any(ready.startswith(path) for path in mounts)
    # The key is made owner-only (the gateway refuses a group-readable key).
    (init,) = pod["spec"]["initContainers"]
    assert "install -m 0600" in init["command"][-1]
