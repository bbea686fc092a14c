"""deploy/kubernetes/virt-agent.yaml is valid against the Kubernetes API's own schemas
(kubernetes-validate, offline, strict: no unknown field), and says what the agent needs: host
networking, libvirt's socket and the state directory from the host, /healthz and /readyz as
probes, a grace above the agent's, and settings the agent itself accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from agent.settings_load import load
from tests.support import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "virt-agent.yaml"


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_every_object_is_valid_for_the_kubernetes_api() -> None:
    version = kubernetes_validate.latest_version()
    kinds = []
    for doc in docs():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert kinds == ["Namespace", "ConfigMap", "Secret", "DaemonSet"]


def test_the_daemonset_gives_the_agent_what_it_needs(tmp_path: Path) -> None:
    by_kind = {d["kind"]: d for d in docs()}
    pod = by_kind["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (agent,) = pod["containers"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/run/libvirt"]]["hostPath"]["path"] == "/run/libvirt"
    assert volumes[mounts["/var/lib/virt-agent"]]["hostPath"]["path"] == "/var/lib/virt-agent"
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in agent["env"]}
    assert env["VIRT_AGENT_HOST_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The ConfigMap's settings are the agent's own: they load, and the grace covers its
    # shutdown (grace + 2 s overdue margin).
    toml = tmp_path / "agent.toml"
    secrets = tmp_path / "nats"  # the Secret's files, where the pod mounts them
    secrets.mkdir()
    for name in by_kind["Secret"]["stringData"]:
        (secrets / name).write_text("x")
    text = by_kind["ConfigMap"]["data"]["agent.toml"]
    toml.write_text(text.replace("/etc/virt-agent/nats/", f"{secrets}/"))
    s = load(toml, env={"VIRT_AGENT_HOST_ID": "node-1"}).settings
    assert s.nats.stream_replicas == 3
    assert s.http.listen.endswith(":9178")
    assert pod["terminationGracePeriodSeconds"] > s.agent.shutdown_grace_s + 2


def test_every_package_is_in_the_distribution() -> None:
    """pyproject's package list names every package of the agent, the handlers and the lab:
    one left out is missing from the installed agent (the container's entry point)."""
    import tomllib  # noqa: PLC0415

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("agent", "handlers", "lab") for p in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    assert found <= listed, sorted(found - listed)
