"""Tests of the lade Helm chart and of the image the chart runs.

The chart is rendered and linted with Helm's own Go SDK (helm-python-sdk, no helm binary), and
every rendered object is validated against the Kubernetes JSON schemas (kubernetes-validate,
strict: unknown fields fail). The Dockerfile is parsed and checked against the workspace it
builds: the binaries the final stage copies are the ones the build stage produces.

Run with `scripts/test-chart`.
"""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lade"
RELEASE = "lade"
NAMESPACE = "lade-system"

K3S_SOCKET = "/run/k3s/containerd/containerd.sock"  # k3s and rke2
MICROK8S_SOCKET = "/var/snap/microk8s/common/run/containerd.sock"

# The values sets every generic test (lint, schema validation) runs over.
VALUES_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "docker": {"runtime": "docker"},
    "k3s": {"containerd": {"socket": K3S_SOCKET}},
    "existing-secret": {"auth": {"existingSecret": "my-lade-token", "existingSecretKey": "tok"}},
    "auth-disabled": {"auth": {"enabled": False}},
    "monitoring-and-policy": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
        "networkPolicy": {"enabled": True, "allowedCIDRs": ["10.6.0.5/32", "192.0.2.0/24"]},
    },
    "tls": {"tls": {"existingSecret": "lade-tls"}},
    "tls-peer-name": {"tls": {"existingSecret": "lade-tls", "peerServerName": "lade.lade-system.svc"}},
    "peer-cidrs": {"peerCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"]},
    "policy-without-relay": {"networkPolicy": {"enabled": True, "allowedCIDRs": ["10.6.0.5/32"], "relay": False}},
    "host-network": {"hostNetwork": True},
    "keep-off": {"keep": {"interval": "0", "peersFromService": False}},
    "everything-set": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/owner": "platform"},
        "podLabels": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux", "lade": "yes"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "lade/skip", "operator": "DoesNotExist"}]}
                    ]
                }
            }
        },
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "extraArgs": ["--lease-ttl=12h"],
        "serviceAccount": {"annotations": {"example.com/a": "b"}},
        "service": {"annotations": {"example.com/c": "d"}},
        "updateStrategy": {"maxUnavailable": "10%"},
    },
}

# Kinds that are CRDs: no schema ships with kubernetes-validate for them.
CRD_KINDS = {"ServiceMonitor"}


# ----------------------------------------------------------------------------------------------
# Rendering helpers


@dataclass
class Rendered:
    objects: list[dict[str, Any]]
    notes: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("DaemonSet")["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def args(self) -> list[str]:
        return self.container["args"]

    def flag(self, name: str) -> str | None:
        """Value of `--name=value` in the agent's args (None when absent)."""
        values = [a.split("=", 1)[1] for a in self.args if a.startswith(f"--{name}=")]
        assert len(values) <= 1, f"--{name} given {len(values)} times"
        return values[0] if values else None

    def volume(self, name: str) -> dict[str, Any] | None:
        return next((v for v in self.pod.get("volumes", []) if v["name"] == name), None)

    def mount(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.container.get("volumeMounts", []) if m["name"] == name), None)

    def host_paths(self) -> dict[str, dict[str, Any]]:
        """hostPath volumes by host path, each with its volume name and mount."""
        result = {}
        for v in self.pod.get("volumes", []):
            if "hostPath" in v:
                result[v["hostPath"]["path"]] = {
                    "type": v["hostPath"].get("type"),
                    "name": v["name"],
                    "mount": self.mount(v["name"]),
                }
        return result

    def container_port(self, port: int | str) -> int:
        """A probe's port, resolving a port name through the container's ports."""
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == port)


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> Rendered:
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(objects, notes)


def chart_metadata() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def workspace() -> dict[str, Any]:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())


def min_kube_version() -> str:
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", chart_metadata()["kubeVersion"])
    assert match, "kubeVersion should be a plain lower bound"
    return match.group(1) + ".0"


KUBE_VERSIONS = [min_kube_version(), kubernetes_validate.latest_version()]


# ----------------------------------------------------------------------------------------------
# Generic: lint and schemas, for every values set


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_lint_reports_no_errors_or_warnings(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_every_object_validates_against_kubernetes_schemas(values: dict[str, Any], kube_version: str) -> None:
    rendered = render(values)
    assert rendered.objects
    for obj in rendered.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} invalid for {kube_version}: {e.message}")


def test_chart_metadata_matches_the_workspace() -> None:
    meta = chart_metadata()
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "lade"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == workspace()["workspace"]["package"]["version"]


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="runtime must be containerd or docker"):
        render({"runtime": "cri-o"})


# ----------------------------------------------------------------------------------------------
# Default: containerd


def test_default_mounts_the_containerd_socket_and_its_root_for_the_agent_to_unpack() -> None:
    r = render()
    socket = "/run/containerd/containerd.sock"
    root = "/var/lib/containerd"
    assert r.flag("runtime") == "containerd"
    assert r.flag("containerd-socket") == socket
    assert r.flag("namespace") == "k8s.io"
    assert r.flag("snapshotter") == "auto"
    assert r.flag("unpack") == "agent"
    host = r.host_paths()
    assert list(host) == [socket, root], "containerd needs its socket, and its root to unpack into"
    assert host[socket]["type"] == "Socket"
    assert host[socket]["mount"]["mountPath"] == socket
    assert host[socket]["mount"].get("readOnly") is not True
    # The agent writes the snapshots at the paths containerd names: same path, writable.
    assert host[root]["type"] == "Directory"
    assert host[root]["mount"]["mountPath"] == root
    assert host[root]["mount"]["readOnly"] is False
    assert r.flag("docker-socket") is None
    assert r.flag("docker-cache-dir") is None
    assert "docker" not in yaml.safe_dump(r.pod)


def test_containerd_unpacking_mounts_the_root_read_only_and_keeps_no_capability() -> None:
    r = render({"containerd": {"unpack": "containerd"}})
    assert r.flag("unpack") == "containerd"
    host = r.host_paths()
    # The root is only measured (free space), never written.
    assert host["/var/lib/containerd"]["mount"]["readOnly"] is True
    assert r.container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_agent_unpacking_without_a_root_or_with_an_unknown_unpacker_is_refused() -> None:
    with pytest.raises(Exception, match="needs containerd.root"):
        render({"containerd": {"root": ""}})
    with pytest.raises(Exception, match="must be agent or containerd"):
        render({"containerd": {"unpack": "kubelet"}})
    # Without a root, containerd can still unpack (no space check then).
    r = render({"containerd": {"root": "", "unpack": "containerd"}})
    assert list(r.host_paths()) == ["/run/containerd/containerd.sock"]


def test_default_daemonset_runs_on_every_node_and_updates_gradually() -> None:
    r = render()
    ds = r.one("DaemonSet")
    assert {"operator": "Exists"} in r.pod["tolerations"], "must tolerate every taint"
    assert r.pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert r.pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert r.container["image"] == f"lade:{chart_metadata()['appVersion']}"
    env = {e["name"]: e for e in r.container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["RUST_LOG"]["value"] == "info"
    assert r.flag("log-format") == "json"
    assert "hostNetwork" not in r.pod


def test_probes_hit_healthz_and_readyz_on_the_metrics_port() -> None:
    r = render()
    assert r.flag("listen") == "0.0.0.0:7700"
    assert r.flag("metrics-listen") == "0.0.0.0:7701"
    live, ready = r.container["livenessProbe"], r.container["readinessProbe"]
    assert live["httpGet"]["path"] == "/healthz"
    assert ready["httpGet"]["path"] == "/readyz"
    assert r.container_port(live["httpGet"]["port"]) == 7701
    assert r.container_port(ready["httpGet"]["port"]) == 7701
    assert {p["name"]: p["containerPort"] for p in r.container["ports"]} == {"grpc": 7700, "metrics": 7701}


def test_container_is_root_but_otherwise_locked_down() -> None:
    r = render()
    sc = r.container["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Only what writing a layer's files as containerd would takes: owners, modes past the
    # owner, setuid bits, device nodes and whiteouts, file capabilities, overlay xattrs.
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP", "SYS_ADMIN"],
    }
    assert r.pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for key in ("hostPID", "hostIPC", "hostNetwork"):
        assert key not in r.pod
    assert r.container["resources"]["requests"]["memory"]
    assert r.container["resources"]["limits"]["memory"]


def test_agent_has_no_kubernetes_api_access() -> None:
    r = render()
    sa = r.one("ServiceAccount")
    assert r.pod["serviceAccountName"] == sa["metadata"]["name"]
    assert r.pod["automountServiceAccountToken"] is False
    assert sa["automountServiceAccountToken"] is False
    kinds = {o["kind"] for o in r.objects}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def test_headless_service_selects_the_agents_for_discovery() -> None:
    r = render()
    svc = r.one("Service")
    ds = r.one("DaemonSet")
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {"grpc": (7700, "grpc"), "metrics": (7701, "metrics")}
    selector = svc["spec"]["selector"]
    assert selector == ds["spec"]["selector"]["matchLabels"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    # What `lade load --discover --selector app.kubernetes.io/name=lade` looks for.
    assert pod_labels["app.kubernetes.io/name"] == "lade"


def test_generated_token_secret_is_mounted_and_passed() -> None:
    r = render()
    secret = r.one("Secret")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)
    volume = r.volume("auth-token")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]
    mount = r.mount("auth-token")
    assert mount["readOnly"] is True
    assert r.flag("auth-token-file") == f"{mount['mountPath']}/token"
    assert "--insecure-no-auth" not in r.args
    assert "WARNING" not in r.notes


def test_two_renders_generate_different_tokens() -> None:
    """`helm template` has no cluster to look the old Secret up in: each render is fresh."""
    first = render().one("Secret")["data"]["token"]
    second = render().one("Secret")["data"]["token"]
    assert first != second


def test_existing_token_is_kept_on_upgrade(tmp_path: Path) -> None:
    """The helper the Secret uses keeps a token `lookup` found, and makes one otherwise.

    `lookup` answers nothing offline, so the helper is called from a probe template added to a
    copy of the chart, with the Secret `lookup` would return on an upgrade.
    """
    secret_template = (CHART / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in secret_template
    assert 'include "lade.authTokenB64" (dict "existing" $existing)' in secret_template

    chart = tmp_path / "lade"
    shutil.copytree(CHART, chart)
    kept = base64.b64encode(b"x" * 48).decode()
    (chart / "templates" / "probe.yaml").write_text(
        "kept: {{ include \"lade.authTokenB64\" (dict \"existing\" (dict \"data\" (dict \"token\" %s))) }}\n"
        "fresh: {{ include \"lade.authTokenB64\" (dict \"existing\" dict) }}\n"
        "absent: {{ include \"lade.authTokenB64\" (dict) }}\n" % _quote(kept)
    )
    with helm.Chart.load(chart) as loaded:
        probe = yaml.safe_load(loaded.render({}, name=RELEASE, namespace=NAMESPACE)["lade/templates/probe.yaml"])
    assert probe["kept"] == kept
    for key in ("fresh", "absent"):
        assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(probe[key]).decode()), key


def _quote(s: str) -> str:
    return '"' + s + '"'


def test_optional_objects_are_off_by_default() -> None:
    kinds = {o["kind"] for o in render().objects}
    assert kinds == {"DaemonSet", "Service", "ServiceAccount", "Secret"}


# ----------------------------------------------------------------------------------------------
# Docker


def test_docker_mounts_the_docker_socket_cache_and_root_only() -> None:
    r = render(VALUES_SETS["docker"])
    assert r.flag("runtime") == "docker"
    assert r.flag("docker-socket") == "/var/run/docker.sock"
    assert r.flag("docker-cache-dir") == "/var/lib/lade/blobs"
    host = r.host_paths()
    assert set(host) == {"/var/run/docker.sock", "/var/lib/lade/blobs", "/var/lib/docker"}
    assert host["/var/lib/docker"]["mount"]["readOnly"] is True
    assert host["/var/run/docker.sock"]["type"] == "Socket"
    assert host["/var/run/docker.sock"]["mount"]["mountPath"] == "/var/run/docker.sock"
    assert host["/var/lib/lade/blobs"]["type"] == "DirectoryOrCreate"
    assert host["/var/lib/lade/blobs"]["mount"]["mountPath"] == "/var/lib/lade/blobs"
    assert host["/var/lib/lade/blobs"]["mount"].get("readOnly") is not True
    for flag in ("containerd-socket", "namespace", "snapshotter"):
        assert r.flag(flag) is None, flag
    assert "containerd" not in yaml.safe_dump(r.pod)


def test_docker_containerd_store_mounts_its_containerd_only_when_set() -> None:
    store = {"socket": "/run/containerd/containerd.sock", "root": "/var/lib/containerd"}
    r = render({"runtime": "docker", "docker": {"containerdStore": store}})
    host = r.host_paths()
    assert host["/run/containerd/containerd.sock"]["type"] == "Socket"
    assert host["/var/lib/containerd"]["mount"].get("readOnly") is not True
    assert r.flag("containerd-socket") == "/run/containerd/containerd.sock"
    assert r.flag("unpack") == "agent"
    assert "SYS_ADMIN" in r.pod["containers"][0]["securityContext"]["capabilities"]["add"]

    r = render({"runtime": "docker", "docker": {"containerdStore": {"socket": store["socket"]}}})
    assert "/var/lib/containerd" not in r.host_paths()
    assert r.flag("unpack") == "containerd"
    assert "add" not in r.pod["containers"][0]["securityContext"]["capabilities"]

    # The default (a graph-driver node) mounts none of it; a root without a socket neither.
    r = render({"runtime": "docker", "docker": {"containerdStore": {"root": "/var/lib/containerd"}}})
    assert "/var/lib/containerd" not in r.host_paths() and r.flag("containerd-socket") is None


def test_docker_paths_are_configurable() -> None:
    r = render({"runtime": "docker", "docker": {"socket": "/run/docker.sock", "cacheDir": "/data/lade", "root": ""}})
    assert set(r.host_paths()) == {"/run/docker.sock", "/data/lade"}
    assert r.flag("docker-socket") == "/run/docker.sock"
    assert r.flag("docker-cache-dir") == "/data/lade"


# ----------------------------------------------------------------------------------------------
# Other distributions' containerd


@pytest.mark.parametrize("socket", [K3S_SOCKET, MICROK8S_SOCKET], ids=["k3s-rke2", "microk8s"])
def test_containerd_socket_path_follows_values(socket: str) -> None:
    r = render({"containerd": {"socket": socket, "root": "", "unpack": "containerd"}})
    host = r.host_paths()
    assert list(host) == [socket], "an empty root mounts nothing but the socket"
    assert host[socket]["type"] == "Socket"
    assert host[socket]["mount"]["mountPath"] == socket
    assert r.flag("containerd-socket") == socket


def test_values_document_the_distribution_socket_paths() -> None:
    text = (CHART / "values.yaml").read_text()
    for distribution, path in [("k3s", K3S_SOCKET), ("rke2", K3S_SOCKET), ("microk8s", MICROK8S_SOCKET)]:
        assert distribution in text and path in text, distribution


# ----------------------------------------------------------------------------------------------
# Auth variants


def test_existing_secret_is_used_and_none_is_generated() -> None:
    r = render(VALUES_SETS["existing-secret"])
    assert r.all("Secret") == []
    volume = r.volume("auth-token")
    assert volume["secret"]["secretName"] == "my-lade-token"
    assert volume["secret"]["items"] == [{"key": "tok", "path": "token"}]
    assert r.flag("auth-token-file") == f"{r.mount('auth-token')['mountPath']}/token"
    assert "secret my-lade-token -o jsonpath='{.data.tok}'" in r.notes


def test_auth_disabled_runs_insecure_and_warns() -> None:
    r = render(VALUES_SETS["auth-disabled"])
    assert "--insecure-no-auth" in r.args
    assert r.flag("auth-token-file") is None
    assert r.volume("auth-token") is None
    assert r.mount("auth-token") is None
    assert r.all("Secret") == []
    assert "WARNING" in r.notes and "--insecure-no-auth" in r.notes
    assert "--auth-token-file" not in r.notes


def test_notes_give_the_next_commands() -> None:
    notes = render().notes
    assert f"kubectl -n {NAMESPACE} get secret lade-auth -o jsonpath='{{.data.token}}' | base64 -d > lade-token" in notes
    assert (
        f"lade load BUNDLE --discover --discover-namespace {NAMESPACE} --selector "
        f"app.kubernetes.io/name=lade,app.kubernetes.io/instance={RELEASE} --auth-token-file lade-token"
    ) in notes
    assert "-o wide" in notes and "--agent" in notes
    assert f"rollout status daemonset/lade" in notes
    # Plain gRPC by default: lade sends the token over it only when told.
    assert notes.count("--auth-token-file lade-token --insecure-plaintext") == 2
    assert "--insecure-plaintext" not in render(VALUES_SETS["tls"]).notes


# ----------------------------------------------------------------------------------------------
# TLS


def test_tls_secret_is_mounted_and_passed() -> None:
    r = render(VALUES_SETS["tls"])
    volume = r.volume("tls")
    assert volume["secret"]["secretName"] == "lade-tls"
    mount = r.mount("tls")
    assert mount["readOnly"] is True
    directory = mount["mountPath"]
    assert r.flag("tls-cert") == f"{directory}/tls.crt"
    assert r.flag("tls-key") == f"{directory}/tls.key"
    assert r.flag("tls-client-ca") == f"{directory}/ca.crt"
    assert r.flag("auth-token-file"), "TLS adds to the token, it does not replace it"


def test_relaying_agents_check_each_other_against_the_peer_server_name() -> None:
    assert render(VALUES_SETS["tls"]).flag("peer-tls-server-name") is None
    r = render(VALUES_SETS["tls-peer-name"])
    assert r.flag("peer-tls-server-name") == "lade.lade-system.svc"
    # Peers are checked against the same CA that admits clients.
    assert r.flag("tls-client-ca").endswith("/ca.crt")
    # Without TLS the name means nothing and is not passed.
    r = render({"tls": {"peerServerName": "lade.lade-system.svc"}})
    assert not [a for a in r.args if a.startswith("--peer-tls")]


def test_peer_cidrs_become_the_agents_relay_allow_list() -> None:
    assert render().flag("peer-cidr") is None
    r = render(VALUES_SETS["peer-cidrs"])
    assert r.flag("peer-cidr") == "10.244.0.0/16,fd00:10:244::/56"


def test_no_tls_flags_without_a_tls_secret() -> None:
    r = render()
    assert not [a for a in r.args if a.startswith("--tls")]
    assert r.volume("tls") is None


# ----------------------------------------------------------------------------------------------
# ServiceMonitor and NetworkPolicy


def test_service_monitor_scrapes_the_metrics_port() -> None:
    r = render(VALUES_SETS["monitoring-and-policy"])
    sm = r.one("ServiceMonitor")
    svc = r.one("Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"


def test_network_policy_admits_only_the_admin_the_agents_and_prometheus() -> None:
    r = render(VALUES_SETS["monitoring-and-policy"])
    policy = r.one("NetworkPolicy")["spec"]
    agent_labels = r.one("DaemonSet")["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"] == {"matchLabels": agent_labels}
    assert policy["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {(7700,), (7701,)}
    grpc_peers = rules[(7700,)]
    assert [p["ipBlock"]["cidr"] for p in grpc_peers if "ipBlock" in p] == ["10.6.0.5/32", "192.0.2.0/24"]
    assert {"podSelector": {"matchLabels": agent_labels}} in grpc_peers
    assert len(grpc_peers) == 3
    [metrics_peer] = rules[(7701,)]
    assert metrics_peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


def test_network_policy_admits_agents_to_each_other_only_for_relay() -> None:
    r = render(VALUES_SETS["policy-without-relay"])
    policy = r.one("NetworkPolicy")["spec"]
    agent_labels = r.one("DaemonSet")["spec"]["selector"]["matchLabels"]
    [grpc] = [rule for rule in policy["ingress"] if rule["ports"][0]["port"] == 7700]
    assert grpc["from"] == [{"ipBlock": {"cidr": "10.6.0.5/32"}}]
    assert {"podSelector": {"matchLabels": agent_labels}} not in grpc["from"]


def test_network_policy_without_admin_cidrs_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="allowedCIDRs"):
        render({"networkPolicy": {"enabled": True}})


# ----------------------------------------------------------------------------------------------
# Other values


def test_agents_keep_held_bundles_and_find_each_other_through_the_headless_service() -> None:
    r = render()
    assert r.flag("keep-interval") == "5m"
    service = r.one("Service")
    assert service["spec"]["clusterIP"] == "None"
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    assert r.flag("peers-dns") == f"{name}.{NAMESPACE}.svc:{port}"
    r = render({"keep": {"interval": "30s"}, "ports": {"grpc": 7800}})
    assert r.flag("keep-interval") == "30s"
    assert r.flag("peers-dns") == f"{name}.{NAMESPACE}.svc:7800"


def test_the_keep_loop_and_peer_discovery_can_be_turned_off() -> None:
    r = render(VALUES_SETS["keep-off"])
    assert r.flag("keep-interval") == "0"
    assert r.flag("peers-dns") is None


def test_host_network() -> None:
    r = render(VALUES_SETS["host-network"])
    assert r.pod["hostNetwork"] is True
    assert r.pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_every_scheduling_and_image_value_reaches_the_pod() -> None:
    values = VALUES_SETS["everything-set"]
    r = render(values)
    ds = r.one("DaemonSet")
    assert r.container["image"] == f"lade@{values['image']['digest']}"
    assert r.pod["imagePullSecrets"] == values["imagePullSecrets"]
    assert ds["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]
    assert ds["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    assert r.pod["nodeSelector"] == values["nodeSelector"]
    assert r.pod["affinity"] == values["affinity"]
    assert r.pod["tolerations"] == values["tolerations"]
    assert r.args[-1] == "--lease-ttl=12h"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"
    assert r.one("ServiceAccount")["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    assert r.one("Service")["metadata"]["annotations"] == values["service"]["annotations"]


def test_image_tag_overrides_app_version() -> None:
    r = render({"image": {"repository": "10.16.10.111/lade/lade", "tag": "dev", "pullPolicy": "Always"}})
    assert r.container["image"] == "10.16.10.111/lade/lade:dev"
    assert r.container["imagePullPolicy"] == "Always"


# ----------------------------------------------------------------------------------------------
# values.yaml documentation


def _values_keys() -> list[tuple[tuple[str, ...], bool, bool]]:
    """(path, documented, is_leaf) for every mapping key of values.yaml, from its text.

    A key is documented by a `# --` comment block right above it (helm-docs style); list items
    and everything under a documented key belong to that key.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    entries: list[tuple[int, tuple[str, ...], bool]] = []
    stack: list[tuple[int, str]] = []
    doc_pending = False
    for line in lines:
        stripped = line.strip()
        if not stripped:
            doc_pending = False
            continue
        if stripped.startswith("#"):
            if stripped.startswith("# --"):
                doc_pending = True
            continue
        indent = len(line) - len(line.lstrip())
        match = re.match(r"([A-Za-z0-9_.\-/]+):(\s|$)", stripped)
        if stripped.startswith("-") or not match:
            doc_pending = False
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(1)))
        entries.append((indent, tuple(k for _, k in stack), doc_pending))
        doc_pending = False
    result = []
    for i, (indent, path, documented) in enumerate(entries):
        following = entries[i + 1] if i + 1 < len(entries) else None
        is_leaf = not (following and following[1][: len(path)] == path and len(following[1]) > len(path))
        result.append((path, documented, is_leaf))
    return result


def test_every_values_key_is_documented() -> None:
    keys = _values_keys()
    documented = {path for path, doc, _ in keys if doc}
    undocumented = [
        ".".join(path)
        for path, _, is_leaf in keys
        if is_leaf and not any(path[:n] in documented for n in range(1, len(path) + 1))
    ]
    assert keys and undocumented == []


def test_every_values_key_is_used_by_a_template() -> None:
    templates = "\n".join(p.read_text() for p in (CHART / "templates").iterdir())
    documented = {path for path, doc, _ in _values_keys() if doc}
    unused = []
    for path in documented:
        references = [".Values." + ".".join(path[:n]) for n in range(1, len(path) + 1)]
        # A key counts as used when it, or a subtree containing it, is referenced as a whole.
        if not any(re.search(re.escape(ref) + r"(?![\w.])", templates) for ref in references):
            unused.append(".".join(path))
    assert sorted(unused) == []


def test_values_parse_and_match_the_documented_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as loaded:
        assert loaded.values == values
    assert values["runtime"] == "containerd"
    assert values["auth"]["enabled"] is True


# ----------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]]

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def dockerfile_stages() -> list[Stage]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0], []))
        elif instruction != "COMMENT" and stages:
            stages[-1].instructions.append((instruction, value))
    return stages


def _copy_args(value: str) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(value)
    flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def _bin_names(package_dir: str) -> tuple[str, list[str]]:
    manifest = tomllib.loads((ROOT / package_dir / "Cargo.toml").read_text())
    return manifest["package"]["name"], [b["name"] for b in manifest.get("bin", [])]


def test_dockerfile_final_stage_copies_what_the_build_stage_produces() -> None:
    build, final = dockerfile_stages()
    assert build.name and build.base.startswith("rust:") and build.base.endswith("-bookworm")
    assert final.base == "gcr.io/distroless/cc-debian12"

    [workdir] = build.values("WORKDIR")
    [cargo] = [v for v in build.values("RUN") if "cargo build" in v]
    cargo_words = shlex.split(cargo)
    assert "--release" in cargo_words and "--locked" in cargo_words
    assert "--target-dir" not in cargo and "CARGO_TARGET_DIR" not in " ".join(build.values("ENV"))
    built_packages = {cargo_words[i + 1] for i, w in enumerate(cargo_words) if w == "-p"}
    release_dir = f"{workdir.rstrip('/')}/target/release"

    produced = {}
    for package_dir in ("agent", "coordinator"):
        package, bins = _bin_names(package_dir)
        assert package in built_packages, f"{package} is not built"
        produced.update({f"{release_dir}/{b}": b for b in bins})
    assert set(produced.values()) == {"lade-agent", "lade"}

    copied = {}
    for value in final.values("COPY"):
        flags, sources, dest = _copy_args(value)
        assert flags.get("from") == build.name
        for source in sources:
            assert source in produced, f"{source} is not produced by `cargo build` in {workdir}"
            copied[produced[source]] = dest
    assert copied == {"lade-agent": "/usr/local/bin/lade-agent", "lade": "/usr/local/bin/lade"}
    assert final.values("ENTRYPOINT") == ['["/usr/local/bin/lade-agent"]']


def test_dockerfile_builder_copies_the_whole_workspace() -> None:
    build, _ = dockerfile_stages()
    sources = []
    for value in build.values("COPY"):
        flags, paths, _ = _copy_args(value)
        assert "from" not in flags
        sources += [p.rstrip("/") for p in paths]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    members = workspace()["workspace"]["members"]
    assert set(members) | {"Cargo.toml", "Cargo.lock"} <= set(sources)
    # Both build scripts run protoc.
    assert any("protobuf-compiler" in v for v in build.values("RUN"))

    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    assert {"target", ".git"} <= set(ignored)
    for source in sources:
        assert source not in ignored, f"{source} is copied but excluded from the build context"


def test_dockerfile_exposes_the_chart_ports_and_labels_the_image() -> None:
    _, final = dockerfile_stages()
    exposed = {int(p.split("/")[0]) for v in final.values("EXPOSE") for p in v.split()}
    ports = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]
    assert exposed == {ports["grpc"], ports["metrics"]} == {7700, 7701}

    labels = DockerfileParser(path=str(ROOT / "Dockerfile")).labels
    for key in ("source", "title", "description", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.title"] == "lade"
    assert labels["org.opencontainers.image.description"]
    package = workspace()["workspace"]["package"]
    assert labels["org.opencontainers.image.licenses"] == package["license"]
    assert labels["org.opencontainers.image.version"] == package["version"] == chart_metadata()["appVersion"]
    # The agent needs uid 0 for the runtime socket (see the chart's securityContext).
    assert final.values("USER") in ([], ["0:0"], ["root"], ["0"])


def test_priority_class_can_be_left_out() -> None:
    assert "priorityClassName" not in render({"priorityClassName": ""}).pod


def test_values_document_the_distribution_data_directories() -> None:
    text = (CHART / "values.yaml").read_text()
    for path in ["/var/lib/rancher/k3s/agent/containerd", "/var/snap/microk8s/common/var/lib/containerd"]:
        assert path in text, path
    r = render({"containerd": {"root": "/var/lib/rancher/k3s/agent/containerd"}})
    assert "/var/lib/rancher/k3s/agent/containerd" in r.host_paths()
