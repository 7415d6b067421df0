"""The Helm chart: scripts/check-helm.sh (lint, render, offline schema validation, rejections)
and the properties a deployment relies on, read from the rendered manifests.

Needs the pinned helm binary (scripts/install-helm.sh builds it into .local/bin); without it
these tests fail, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from connector.config import ConnectorSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "threads-connector"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BAD_VALUES = CHART / "ci-invalid" / "bad-values.yaml"
API_KEY_SET = ("--set", "secrets.apiKey=test-api-key")
# Fields of the connector's settings the chart's values schema leaves out on purpose.
CHART_OWNED = {
    ("api", "api_key"),  # secret: secrets.apiKey / existingSecret
    ("kafka", "sasl_password"),  # secret: secrets.saslPassword / existingSecret
    ("api", "api_key_file"),  # set by the chart to the mounted Secret
    ("kafka", "sasl_password_file"),  # idem
    ("delivery", "instance_id"),  # the pod name, from the environment
    ("kafka", "ssl_key_password"),  # secret: secrets.sslKeyPassword / existingSecret
    ("kafka", "ssl_key_password_file"),  # set by the chart (kafkaTls.clientKeyEncrypted)
    ("kafka", "ssl_certfile"),  # set by the chart (kafkaTls.clientCertSecret)
    ("api", "ca_file"),  # set by the chart (apiTls.caSecret)
    ("api", "proxy_auth_file"),  # set by the chart (apiProxy.authSecret)
    ("kafka", "oauth_client_secret"),  # secret: secrets.oauthClientSecret / existingSecret
    ("kafka", "oauth_client_secret_file"),  # set by the chart (OAUTHBEARER)
    ("kafka", "ssl_keyfile"),  # idem
    ("kafka", "group_instance_id"),  # the pod name under a StatefulSet (workloadKind)
    ("kafka", "static_members"),  # the autoscaler's minimum under a StatefulSet
    ("schema_registry", "password"),  # schemaRegistry.existingSecret, mounted
    ("schema_registry", "password_file"),  # set by the chart
    ("schema_registry", "bearer_token"),  # idem
    ("schema_registry", "bearer_token_file"),  # idem
    ("schema_registry", "ca_file"),  # set by the chart (schemaRegistry.caSecret)
}

Manifest = dict[str, Any]


def helm_binary() -> str:
    """The helm binary, or a test failure that says how to install it."""
    for candidate in (os.environ.get("HELM"), str(ROOT / ".local" / "bin" / "helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail("helm is not installed: run scripts/install-helm.sh (builds the pinned helm)")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def render(*args: str, release: str = "rel") -> list[Manifest]:
    """``helm template`` the chart with these arguments; fail the test if helm refuses."""
    proc = helm("template", release, str(CHART), "--namespace", "connectors", *args)
    if proc.returncode != 0:
        pytest.fail(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_case(case: Path | None) -> list[Manifest]:
    """The chart's defaults (plus the required API key) or one ci/ values file."""
    return render(*API_KEY_SET) if case is None else render("-f", str(case))


def pod_mounts(config_text: str, root: Path) -> None:
    """The files a rendered config names under /var/run/secrets (what the pod mounts:
    secrets, CA bundles, the client certificate), made under ``root`` at the same paths,
    each with content check-config can read and load."""
    ca = trustme.CA()
    client = ca.issue_cert("connector.example")
    for path in sorted(set(re.findall(r"/var/run/secrets/[\w./-]+", config_text))):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(("ca.crt", "ca.pem")):
            ca.cert_pem.write_to_path(str(target))
        elif path.endswith("tls.crt"):
            client.cert_chain_pems[0].write_to_path(str(target))
        elif path.endswith("tls.key"):
            client.private_key_pem.write_to_path(str(target))
        elif path.endswith("proxy-auth"):  # one line user:password
            target.write_text("a-user:a-secret-value\n")
        else:
            target.write_text("a-secret-value\n")
        target.chmod(0o644)
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[Manifest]) -> set[str]:
    return {d["kind"] for d in docs}


def config_map(docs: list[Manifest]) -> Manifest:
    """The ConfigMap holding connector.yaml (not the dashboard's)."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and "connector.yaml" in d["data"]]
    assert len(found) == 1
    return found[0]


def connector_config(docs: list[Manifest]) -> dict[str, Any]:
    data = config_map(docs)["data"]["connector.yaml"]
    loaded = yaml.safe_load(data)
    assert isinstance(loaded, dict)
    return loaded


def workload(docs: list[Manifest]) -> Manifest:
    """The Deployment, or the StatefulSet (``workloadKind``)."""
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, f"expected one workload, got {len(found)}"
    return found[0]


def container(docs: list[Manifest]) -> dict[str, Any]:
    pod = workload(docs)["spec"]["template"]["spec"]
    (main,) = [c for c in pod["containers"] if c["name"] == "connector"]
    return typing.cast(dict[str, Any], main)


CASES = [None, *CI_VALUES]
CASE_IDS = ["defaults", *[p.stem for p in CI_VALUES]]


# -- the script CI runs ---------------------------------------------------------------------


def test_check_helm_script_passes(tmp_path: Path) -> None:
    """Lint + template of every values file, schema validation, and the rejections."""
    helm_binary()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check-helm.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OUT_DIR": str(tmp_path / "rendered")},
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for case in CASE_IDS:
        assert f"ok   lint + template  {case}  " in output
    assert "ok   schema-valid manifests:" in output
    for kind in ("Deployment", "ScaledObject", "ServiceMonitor", "PrometheusRule"):
        assert kind in output.split("ok   schema-valid manifests:")[1].splitlines()[0]
    assert "ok   rejected as expected: ci-invalid/bad-values.yaml (values schema)" in output


def test_check_helm_validation_catches_an_invalid_manifest(tmp_path: Path) -> None:
    """The offline validation is not a no-op: a misspelt field and a non-string KEDA value fail."""
    docs = render("-f", str(CHART / "ci" / "keda-values.yaml"))
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    scaled = one(docs, "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 200
    (tmp_path / "broken-k1.36.0.yaml").write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check-helm.sh"), "--validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "'terminationGracePeriodSecond' was unexpected" in proc.stdout
    assert "lagThreshold: 200 is not of type 'string'" in proc.stdout


# -- the Deployment ---------------------------------------------------------------------------


def test_api_ca_secret_is_mounted_and_named_in_the_config() -> None:
    docs = render("-f", str(CHART / "ci" / "mtls-values.yaml"))
    api = connector_config(docs)["api"]
    api_dir = "/var/run/secrets/threads-connector-api-tls"
    assert api["ca_file"] == f"{api_dir}/ca.crt"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["api-ca"]["secret"]
    assert volume["secretName"] == "api-gateway-ca"
    assert volume["items"] == [{"key": "gateway.pem", "path": "ca.crt"}]
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["api-ca"]["mountPath"] == api_dir
    assert mounts["api-ca"]["readOnly"] is True
    # without the value: no mount and no ca_file (the system's trust store)
    default = render(*API_KEY_SET)
    assert "ca_file" not in connector_config(default)["api"]
    assert "api-ca" not in {m["name"] for m in container(default)["volumeMounts"]}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deployment_probes_and_port(case: Path | None) -> None:
    docs = render_case(case)
    main = container(docs)
    port = connector_config(docs)["server"]["port"]
    assert main["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deployment_security_context(case: Path | None) -> None:
    docs = render_case(case)
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # the read-only root filesystem needs a writable /tmp
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grace_period_exceeds_drain_timeout(case: Path | None) -> None:
    docs = render_case(case)
    drain_s = connector_config(docs).get("delivery", {}).get("drain_timeout_s", 70)
    grace = workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_s


def test_grace_period_follows_the_drain_timeout() -> None:
    # --set would make 120.5 a string; --set-json keeps it a number
    docs = render(*API_KEY_SET, "--set-json", "config.delivery.drain_timeout_s=120.5")
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 121 + 30
    proc = helm(
        "template", "rel", str(CHART), *API_KEY_SET, "--set", "terminationGracePeriodSeconds=20"
    )
    assert proc.returncode != 0
    assert "terminationGracePeriodSeconds (20) must be greater than" in proc.stderr


def test_instance_id_is_the_pod_name() -> None:
    env = {e["name"]: e for e in container(render(*API_KEY_SET))["env"]}
    assert env["THREADS_CONNECTOR_DELIVERY__INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }


def test_a_deployment_has_no_static_membership() -> None:
    env = {e["name"] for e in container(render(*API_KEY_SET))["env"]}
    assert "THREADS_CONNECTOR_KAFKA__GROUP_INSTANCE_ID" not in env


@pytest.mark.parametrize(
    ("scaler", "static"),
    [
        ((), None),  # fixed replicas: every pod is static
        (("--set", "hpa.enabled=true", "--set", "hpa.minReplicas=2"), "2"),
        (("--set", "keda.enabled=true", "--set", "keda.minReplicaCount=3"), "3"),
    ],
)
def test_a_statefulset_joins_under_its_stable_pod_names(
    scaler: tuple[str, ...], static: str | None
) -> None:
    """Static group membership from the StatefulSet's pod names; the pods an autoscaler
    may remove join as dynamic members (they leave the group on SIGTERM)."""
    docs = render(*API_KEY_SET, "--set", "workloadKind=StatefulSet", *scaler)
    assert "Deployment" not in kinds(docs)
    workload = one(docs, "StatefulSet")
    spec = workload["spec"]
    assert spec["serviceName"] == workload["metadata"]["name"]
    assert spec["podManagementPolicy"] == "Parallel" and "strategy" not in spec
    (main,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "connector"]
    env = {e["name"]: e for e in main["env"]}
    assert env["THREADS_CONNECTOR_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert env.get("THREADS_CONNECTOR_KAFKA__STATIC_MEMBERS", {}).get("value") == static
    if scaler:
        target = next(d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"))
        assert target["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def test_config_checksum_rolls_pods_on_config_change_only() -> None:
    def checksum(*args: str) -> str:
        docs = render(*API_KEY_SET, *args)
        annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return typing.cast(str, annotations["checksum/config"])

    base = checksum()
    assert len(base) == 64
    assert checksum("--set", "config.api.rate_limit_per_s=99") != base
    assert checksum("--set", "replicaCount=5") == base
    # the API key is re-read from the mounted file: changing it must not roll the pods
    assert checksum("--set", "secrets.apiKey=rotated") == base


# -- configuration and secrets ----------------------------------------------------------------


def test_api_key_is_a_mounted_file_never_in_config_or_env() -> None:
    docs = render(*API_KEY_SET)
    config = connector_config(docs)
    assert "api_key" not in config["api"]
    assert config["api"]["api_key_file"] == "/var/run/secrets/threads-connector/api-key"
    assert "test-api-key" not in config_map(docs)["data"]["connector.yaml"]
    secret = one(docs, "Secret")
    assert secret["data"]["api-key"] == "dGVzdC1hcGkta2V5"  # base64 of test-api-key
    main = container(docs)
    assert all("API_KEY" not in e["name"] for e in main["env"])
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "secrets"]
    assert mount["mountPath"] == "/var/run/secrets/threads-connector"
    assert "subPath" not in mount  # a subPath mount would never see a rotated Secret


def test_sasl_ssl_values() -> None:
    docs = render("-f", str(CHART / "ci" / "sasl-ssl-values.yaml"))
    kafka = connector_config(docs)["kafka"]
    assert kafka["security_protocol"] == "SASL_SSL"
    assert kafka["sasl_password_file"] == "/var/run/secrets/threads-connector/sasl-password"
    assert kafka["ssl_cafile"] == "/var/run/secrets/threads-connector-tls/ca.crt"
    assert "sasl_password" not in kafka
    assert set(one(docs, "Secret")["data"]) == {"api-key", "sasl-password"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kafka-ca"]["secret"]["secretName"] == "kafka-cluster-ca"
    assert "PodDisruptionBudget" in kinds(docs)


def test_existing_secret_values() -> None:
    docs = render("-f", str(CHART / "ci" / "existing-secret-values.yaml"))
    assert "Secret" not in kinds(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    secret_volume = {v["name"]: v for v in pod["volumes"]}["secrets"]["secret"]
    assert secret_volume["secretName"] == "threads-connector-credentials"
    assert secret_volume["items"] == [
        {"key": "THREADS_API_KEY", "path": "api-key"},
        {"key": "KAFKA_PASSWORD", "path": "sasl-password"},
    ]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_missing_api_key_is_rejected_with_a_message() -> None:
    proc = helm("template", "rel", str(CHART))
    assert proc.returncode != 0
    assert "secrets.apiKey is required" in proc.stderr


def test_values_schema_mirrors_the_connector_settings() -> None:
    """Every connector setting is accepted by the chart's schema (except the chart-owned
    ones), and nothing else: a new setting or a renamed one fails here."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"]["config"]
    sections = {
        name: field.annotation
        for name, field in ConnectorSettings.model_fields.items()
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
    }
    for name, model in sections.items():
        expected = {f for f in model.model_fields if (name, f) not in CHART_OWNED}
        got = set(config_schema["properties"][name]["properties"])
        assert got == expected, (
            f"config.{name}: schema {sorted(got)} != settings {sorted(expected)}; regenerate "
            "with .venv/bin/python helm/threads-connector/hack/gen-values-schema.py"
        )
        assert config_schema["properties"][name]["additionalProperties"] is False
    top = {n for n in ConnectorSettings.model_fields}
    assert set(config_schema["properties"]) == top
    assert config_schema["additionalProperties"] is False


def test_bad_values_rejected_with_the_schema_messages() -> None:
    proc = helm("template", "rel", str(CHART), "-f", str(BAD_VALUES))
    assert proc.returncode != 0
    for message in (
        "values don't meet the specifications of the schema",
        "at '/replicaCount': got string, want integer",
        "at '/config/kafka/security_protocol': value must be one of",
        "at '/config/api': additional properties 'api_key' not allowed",
        "at '/config/delivery/drain_timeout_s': exclusiveMinimum: got -5, want 0",
    ):
        assert message in proc.stderr, proc.stderr


# -- scaling ----------------------------------------------------------------------------------


def test_keda_scaled_object_capped_at_partitions() -> None:
    values = yaml.safe_load((CHART / "ci" / "keda-values.yaml").read_text())
    docs = render("-f", str(CHART / "ci" / "keda-values.yaml"))
    scaled = one(docs, "ScaledObject")["spec"]
    partitions = values["partitions"]
    assert values["keda"]["maxReplicaCount"] > partitions  # the file asks for more
    assert scaled["maxReplicaCount"] == partitions
    assert "replicas" not in one(docs, "Deployment")["spec"]  # KEDA owns the count
    config = connector_config(docs)["kafka"]
    assert len(scaled["triggers"]) == len(config["input_topics"])
    for trigger, topic in zip(scaled["triggers"], config["input_topics"], strict=True):
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["topic"] == topic
        assert meta["consumerGroup"] == config["group_id"]
        assert meta["bootstrapServers"] == config["bootstrap_servers"]
        assert meta["allowIdleConsumers"] == "false"
        assert meta["sasl"] == "plaintext"
        assert all(isinstance(v, str) for v in meta.values())
        assert (
            trigger["authenticationRef"]["name"]
            == one(docs, "TriggerAuthentication")["metadata"]["name"]
        )


@pytest.mark.parametrize(
    ("partitions", "max_replicas", "expected"),
    [(3, None, 3), (12, 4, 4), (2, 10, 2)],
)
def test_autoscaler_maximum_never_exceeds_partitions(
    partitions: int, max_replicas: int | None, expected: int
) -> None:
    common = (*API_KEY_SET, "--set", f"partitions={partitions}")
    keda_max = ("--set", f"keda.maxReplicaCount={max_replicas}") if max_replicas else ()
    hpa_max = ("--set", f"hpa.maxReplicas={max_replicas}") if max_replicas else ()
    keda = one(render(*common, "--set", "keda.enabled=true", *keda_max), "ScaledObject")
    assert keda["spec"]["maxReplicaCount"] == expected
    hpa = one(render(*common, "--set", "hpa.enabled=true", *hpa_max), "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == expected


def test_keda_min_above_partitions_is_rejected() -> None:
    proc = helm(
        "template", "rel", str(CHART), *API_KEY_SET,
        "--set", "keda.enabled=true", "--set", "keda.minReplicaCount=8", "--set", "partitions=4",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "keda.minReplicaCount (8) exceeds partitions (4)" in proc.stderr


# -- monitoring -------------------------------------------------------------------------------


def test_service_monitor_dashboard_and_rules() -> None:
    docs = render("-f", str(CHART / "ci" / "service-monitor-values.yaml"))
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    service_labels = one(docs, "Service")["metadata"]["labels"]
    assert selector.items() <= service_labels.items()

    dashboards = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "threads-connector.json").read_text()
    assert json.loads(dashboard["data"]["threads-connector.json"]) == json.loads(shipped)

    rule = one(docs, "PrometheusRule")
    # the presence alerts select the release's Service (the job) in its namespace
    job = one(docs, "Service")["metadata"]["name"]
    text = (CHART / "rules" / "alerts.yaml").read_text()
    assert 'job="threads-connector"' in text
    text = text.replace('job="threads-connector"', f'job="{job}", namespace="connectors"')
    assert rule["spec"]["groups"] == yaml.safe_load(text)["groups"]
    exprs = {r.get("alert"): r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert (
        f'absent(up{{job="{job}", namespace="connectors"}} == 1)' in exprs["ThreadsConnectorDown"]
    )


def test_dashboard_label_is_configurable() -> None:
    docs = render(
        *API_KEY_SET,
        "--set", "grafanaDashboard.enabled=true",
        "--set", "grafanaDashboard.label=dashboards",
        "--set", "grafanaDashboard.labelValue=threads",
    )  # fmt: skip
    (dashboard,) = [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["dashboards"] == "threads"
    assert "grafana_dashboard" not in dashboard["metadata"]["labels"]


def test_optional_objects_are_off_by_default() -> None:
    assert kinds(render(*API_KEY_SET)) == {
        "ServiceAccount", "Secret", "ConfigMap", "Service", "Deployment",
    }  # fmt: skip


def test_rendered_config_is_what_the_checksum_hashes() -> None:
    """The checksum covers the rendered connector.yaml (a sanity check of the annotation's
    input: the ConfigMap body minus its two comment lines)."""
    docs = render(*API_KEY_SET)
    body = config_map(docs)["data"]["connector.yaml"]
    config_lines = [line for line in body.splitlines() if not line.startswith("#")]
    digest = hashlib.sha256("\n".join(config_lines).encode()).hexdigest()
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"] == digest


def notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as ``helm install`` would print it (helm template does not render it): a
    copy of the chart with one more template that includes NOTES.txt by its name."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ include "threads-connector/templates/NOTES.txt" . | quote }}\n'
    )
    proc = helm("template", "rel", str(chart), "--show-only", "templates/zz-notes.yaml", *args)
    assert proc.returncode == 0, proc.stderr
    return typing.cast(str, yaml.safe_load(proc.stdout)["data"]["notes"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_notes_render(tmp_path: Path, case: Path | None) -> None:
    text = notes(tmp_path, *(API_KEY_SET if case is None else ("-f", str(case))))
    assert "rollout status deployment/rel-threads-connector" in text
    assert "connector check-config --config /etc/threads-connector/connector.yaml" in text


def test_notes_warn_about_idle_replicas(tmp_path: Path) -> None:
    text = notes(tmp_path, *API_KEY_SET, "--set", "replicaCount=9", "--set", "partitions=6")
    assert "WARNING: replicaCount (9) exceeds partitions (6): 3 replica(s) will sit idle" in text
    keda = notes(tmp_path / "keda", "-f", str(CHART / "ci" / "keda-values.yaml"))
    assert "KEDA on consumer lag, 1..12 replicas (capped at partitions=12)" in keda


# -- mTLS, NetworkPolicy, image digest ---------------------------------------------------------


def test_mtls_values_mount_the_client_certificate() -> None:
    docs = render("-f", str(CHART / "ci" / "mtls-values.yaml"))
    kafka = connector_config(docs)["kafka"]
    client = "/var/run/secrets/threads-connector-client"
    assert (kafka["ssl_certfile"], kafka["ssl_keyfile"]) == (
        f"{client}/tls.crt",
        f"{client}/tls.key",
    )
    assert kafka["ssl_key_password_file"] == "/var/run/secrets/threads-connector/ssl-key-password"
    text = config_map(docs)["data"]["connector.yaml"]
    assert "ci-key-password-not-a-real-one" not in text
    assert set(one(docs, "Secret")["data"]) == {"api-key", "ssl-key-password"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["kafka-client-cert"]["secret"]
    assert volume["secretName"] == "threads-connector-kafka-client"
    assert volume["items"] == [
        {"key": "tls.crt", "path": "tls.crt"},
        {"key": "tls.key", "path": "tls.key"},
    ]
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["kafka-client-cert"]["mountPath"] == client
    assert mounts["kafka-client-cert"]["readOnly"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "kafkaTls.clientCertSecret=c"), "kafkaTls.clientCertSecret needs"),
        (
            ("--set", "kafkaTls.clientCertSecret=c", "--set", "kafkaTls.clientKeyEncrypted=true",
             "--set", "config.kafka.security_protocol=SSL"),
            "secrets.sslKeyPassword is required",
        ),
    ],
)  # fmt: skip
def test_mtls_values_are_checked(args: tuple[str, ...], message: str) -> None:
    proc = helm("template", "rel", str(CHART), *API_KEY_SET, *args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_network_policy_is_off_by_default() -> None:
    assert "NetworkPolicy" not in kinds(render(*API_KEY_SET))


def test_network_policy_values() -> None:
    docs = render("-f", str(CHART / "ci" / "network-policy-values.yaml"))
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "threads-connector",
        "app.kubernetes.io/instance": "rel",
    }
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert ingress["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    egress = policy["egress"]
    by_port = {tuple(p["port"] for p in rule["ports"]): rule for rule in egress}
    kafka = by_port[(9092, 9093)]
    assert kafka["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    api = by_port[(443,)]
    assert api["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert "10.0.0.0/8" in api["to"][0]["ipBlock"]["except"]
    dns = by_port[(53, 53)]
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert len(egress) == 3  # nothing else leaves the pod


def test_ci_values_pin_the_image_by_digest() -> None:
    pinned = [
        c for c in CI_VALUES if (yaml.safe_load(c.read_text()).get("image") or {}).get("digest")
    ]
    assert {c.stem for c in pinned} >= {"network-policy-values", "mtls-values", "sasl-ssl-values"}
    for case in pinned:
        digest = yaml.safe_load(case.read_text())["image"]["digest"]
        image = container(render("-f", str(case)))["image"]
        assert image == f"registry.example.com/platform/threads-connector@{digest}"
        assert ":0.1.0" not in image


def test_the_chart_binds_the_health_server_on_all_pod_addresses() -> None:
    """The connector's own default is loopback; in a pod the kubelet and Prometheus come
    from outside, so the chart sets 0.0.0.0 (and the NetworkPolicy restricts who)."""
    assert connector_config(render(*API_KEY_SET))["server"]["host"] == "0.0.0.0"


# -- several Mindset apps -------------------------------------------------------------------

SEVERAL_APPS = CHART / "ci" / "several-apps-values.yaml"


def test_several_apps_each_key_mounted_as_its_own_file() -> None:
    docs = render("-f", str(SEVERAL_APPS))
    api = connector_config(docs)["api"]
    assert "api_key_file" not in api  # no default key: every route's app has its own
    apps_dir = "/var/run/secrets/threads-connector-apps"
    assert api["apps"] == {
        "app-a": {
            "api_key_file": f"{apps_dir}/app-a/api-key",
            "rate_limit_per_s": 10,
            "max_in_flight": 100,
        },
        "app-b": {"api_key_file": f"{apps_dir}/app-b/api-key", "rate_limit_per_s": 5},
    }
    assert one(docs, "Secret")["data"] == {
        "api-key-app-b": "Y2ktYXBwLWIta2V5LW5vdC1hLXJlYWwtb25l"  # base64 of the value
    }
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert volumes["app-key-0"] == {
        "secretName": "app-a-threads-api",
        "defaultMode": 288,
        "items": [{"key": "api-key", "path": "api-key"}],
    }
    assert volumes["app-key-1"]["secretName"] == "rel-threads-connector"
    assert volumes["app-key-1"]["items"] == [{"key": "api-key-app-b", "path": "api-key"}]
    assert "secrets" not in volumes  # nothing else to mount (no default key, no SASL)
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert "secrets" not in mounts
    assert mounts["app-key-0"]["mountPath"] == f"{apps_dir}/app-a"
    assert mounts["app-key-1"]["mountPath"] == f"{apps_dir}/app-b"
    assert all("subPath" not in m for m in mounts.values())  # rotation reaches the files


def test_several_apps_config_is_valid_for_the_connector(tmp_path: Path) -> None:
    from connector.config import load_settings

    path = tmp_path / "connector.yaml"
    path.write_text(config_map(render("-f", str(SEVERAL_APPS)))["data"]["connector.yaml"])
    settings = load_settings(path)
    assert settings.app_uids() == ["app-a", "app-b"]
    assert settings.api.for_app("app-b").rate_limit_per_s == 5


def test_a_route_whose_app_has_no_key_is_rejected_by_the_chart() -> None:
    proc = helm(
        "template",
        "rel",
        str(CHART),
        "-f",
        str(SEVERAL_APPS),
        "--set",
        "config.routes[1].app_uid=app-c",
    )
    assert proc.returncode != 0
    assert "config.routes[1] (app_uid app-c) has no API key" in proc.stderr


def test_an_app_without_a_key_source_is_rejected() -> None:
    proc = helm("template", "rel", str(CHART), *API_KEY_SET, "--set", "secrets.apps.app-c.key=k")
    assert proc.returncode != 0
    assert "secrets.apps.app-c needs apiKey" in proc.stderr


def test_schema_registry_secrets_are_mounted_and_named_in_the_config(tmp_path: Path) -> None:
    from connector.config import load_settings

    docs = render(
        *API_KEY_SET,
        "--set",
        "config.schema_registry.url=https://registry:8081",
        "--set",
        "config.schema_registry.username=svc",
        "--set",
        "config.input.topics.domain-events.format=avro",
        "--set",
        "schemaRegistry.existingSecret=registry-creds",
        "--set",
        "schemaRegistry.passwordKey=pw",
        "--set",
        "schemaRegistry.caSecret=registry-ca",
    )
    registry = connector_config(docs)["schema_registry"]
    assert registry["password_file"] == "/var/run/secrets/threads-connector-registry/password"
    assert registry["ca_file"] == "/var/run/secrets/threads-connector-registry-tls/ca.crt"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret") for v in pod["volumes"]}
    assert volumes["registry-auth"]["items"] == [{"key": "pw", "path": "password"}]
    assert volumes["registry-ca"]["secretName"] == "registry-ca"
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts["registry-auth"] == "/var/run/secrets/threads-connector-registry"
    path = tmp_path / "connector.yaml"
    path.write_text(config_map(docs)["data"]["connector.yaml"])
    (tmp_path / "pw").write_text("x")
    settings = load_settings(path)
    assert settings.input.topics["domain-events"].format == "avro"
    # without the values: no mounts, no files
    default = render(*API_KEY_SET)
    assert "registry-auth" not in {m["name"] for m in container(default)["volumeMounts"]}
    assert connector_config(default)["schema_registry"] == {"url": None, "username": None}


def test_api_proxy_credentials_are_a_mounted_file_named_in_the_config() -> None:
    docs = render("-f", str(CHART / "ci" / "enterprise-values.yaml"))
    api = connector_config(docs)["api"]
    proxy_dir = "/var/run/secrets/threads-connector-api-proxy"
    assert api["proxy_url"] == "http://egress-proxy.platform.svc:3128"
    assert api["proxy_auth_file"] == f"{proxy_dir}/proxy-auth"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["api-proxy-auth"]["secret"]
    assert volume["secretName"] == "egress-proxy-credentials"
    assert volume["items"] == [{"key": "user-password", "path": "proxy-auth"}]
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["api-proxy-auth"] == {
        "name": "api-proxy-auth",
        "mountPath": proxy_dir,
        "readOnly": True,
    }
    default = render(*API_KEY_SET)
    assert "proxy_auth_file" not in connector_config(default)["api"]


def test_oauthbearer_client_secret_is_a_mounted_file_and_no_sasl_password() -> None:
    docs = render("-f", str(CHART / "ci" / "enterprise-values.yaml"))
    kafka = connector_config(docs)["kafka"]
    assert kafka["sasl_mechanism"] == "OAUTHBEARER"
    secret_dir = "/var/run/secrets/threads-connector"
    assert kafka["oauth_client_secret_file"] == f"{secret_dir}/oauth-client-secret"
    assert "sasl_password_file" not in kafka
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    items = {v["name"]: v for v in pod["volumes"]}["secrets"]["secret"]["items"]
    assert {"key": "oauth-client-secret", "path": "oauth-client-secret"} in items
    assert not [i for i in items if i["path"] == "sasl-password"]
    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"api-key", "oauth-client-secret"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "secrets.oauthClientSecret="), "secrets.oauthClientSecret is required"),
        (("--set", "keda.enabled=true"), "with OAUTHBEARER use hpa"),
    ],
)
def test_oauthbearer_values_are_checked(args: tuple[str, ...], message: str) -> None:
    enterprise = ("-f", str(CHART / "ci" / "enterprise-values.yaml"))
    proc = helm("template", "rel", str(CHART), *enterprise, *args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_tracing_is_off_by_default_and_configured_by_otel_env() -> None:
    assert connector_config(render(*API_KEY_SET))["tracing"] == {"enabled": False}
    docs = render("-f", str(CHART / "ci" / "enterprise-values.yaml"))
    assert connector_config(docs)["tracing"] == {"enabled": True}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
def test_a_drain_during_an_outage_is_not_blocked_by_the_budget() -> None:
    """Readiness is red on every pod during an API or Kafka outage: a budget that only
    lets healthy pods go would block a node drain for the whole outage."""
    docs = render(*API_KEY_SET, "--set", "podDisruptionBudget.enabled=true")
    spec = one(docs, "PodDisruptionBudget")["spec"]
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert spec["maxUnavailable"] == 1
    docs = render(
        *API_KEY_SET,
        "--set", "podDisruptionBudget.enabled=true",
        "--set", "podDisruptionBudget.unhealthyPodEvictionPolicy=IfHealthyBudget",
    )  # fmt: skip
    assert one(docs, "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == (
        "IfHealthyBudget"
    )
    proc = helm(
        "template", "rel", str(CHART), *API_KEY_SET,
        "--set", "podDisruptionBudget.unhealthyPodEvictionPolicy=Sometimes",
    )  # fmt: skip
    assert proc.returncode != 0 and "unhealthyPodEvictionPolicy" in proc.stderr


def test_the_container_runs_the_run_verb() -> None:
    """The image's entrypoint is ``connector`` (any verb): the chart names ``run``."""
    container = one(render(*API_KEY_SET), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "run"
    assert "command" not in container
