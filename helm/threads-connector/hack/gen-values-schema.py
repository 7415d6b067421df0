#!/usr/bin/env python3
"""Regenerate values.schema.json: the `config` part from the connector's pydantic settings
(connector/config.py), the rest from the chart's own values. Run it after a settings change
(tests/test_helm.py fails until the schema mirrors the settings):

    .venv/bin/python helm/threads-connector/hack/gen-values-schema.py

The output is JSON Schema draft-07 (what every Helm 3 release validates) with every $ref
inlined, so that helm's messages name the offending value's path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHART.parent.parent))

from connector.config import ConnectorSettings  # noqa: E402

Schema = dict[str, Any]

# Settings the chart sets itself or takes from a Secret: not accepted under `config`.
EXCLUDED = {
    ("api", "api_key"),  # secret: secrets.apiKey or secrets.existingSecret
    ("kafka", "sasl_password"),  # secret: secrets.saslPassword or secrets.existingSecret
    ("api", "api_key_file"),  # the mounted Secret
    ("kafka", "sasl_password_file"),  # the mounted Secret
    ("kafka", "ssl_key_password"),  # secret: secrets.sslKeyPassword or secrets.existingSecret
    ("kafka", "ssl_key_password_file"),  # the mounted Secret (kafkaTls.clientKeyEncrypted)
    ("kafka", "ssl_certfile"),  # kafkaTls.clientCertSecret, mounted
    ("kafka", "ssl_keyfile"),  # kafkaTls.clientCertSecret, mounted
    ("api", "ca_file"),  # apiTls.caSecret, mounted
    ("api", "proxy_auth_file"),  # apiProxy.authSecret, mounted
    ("kafka", "oauth_client_secret"),  # secret: secrets.oauthClientSecret or existingSecret
    ("kafka", "oauth_client_secret_file"),  # the mounted Secret
    ("delivery", "instance_id"),  # the pod name
    ("kafka", "group_instance_id"),  # the pod name under a StatefulSet (workloadKind)
    ("kafka", "static_members"),  # the autoscaler's minimum under a StatefulSet
    ("schema_registry", "password"),  # schemaRegistry.existingSecret, mounted
    ("schema_registry", "password_file"),
    ("schema_registry", "bearer_token"),
    ("schema_registry", "bearer_token_file"),
    ("schema_registry", "ca_file"),  # schemaRegistry.caSecret, mounted
}
DROPPED_KEYWORDS = {"title", "format", "writeOnly", "$defs"}


def inline(node: Schema, defs: dict[str, Schema], section: str | None = None) -> Schema:
    """pydantic's 2020-12 schema -> draft-07: $refs inlined, Optional as a null type."""
    if "$ref" in node:
        out = inline(defs[node["$ref"].rsplit("/", 1)[1]], defs, section)
        out.update({k: v for k, v in node.items() if k in ("default", "description")})
        return out
    if "anyOf" in node:
        alternatives = [a for a in node["anyOf"] if a.get("type") != "null"]
        nullable = len(alternatives) != len(node["anyOf"])
        if len(alternatives) != 1:
            out = {"anyOf": [inline(a, defs, section) for a in node["anyOf"]]}
        else:
            out = inline(alternatives[0], defs, section)
            if nullable and isinstance(out.get("type"), str):
                out["type"] = [out["type"], "null"]
                if "enum" in out:
                    out["enum"] = [*out["enum"], None]
        out.update({k: v for k, v in node.items() if k in ("default", "description") and v})
        return out
    out = {}
    for key, value in node.items():
        if key in DROPPED_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {
                name: inline(sub, defs, name if section is None else section)
                for name, sub in value.items()
                if (section, name) not in EXCLUDED
            }
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = inline(value, defs, section)  # a list's items, a mapping's values
        elif key == "required":
            required = [r for r in value if (section, r) not in EXCLUDED]
            if required:
                out[key] = required
        else:
            out[key] = value
    return out


def config_schema() -> Schema:
    source = ConnectorSettings.model_json_schema()
    defs = source.pop("$defs")
    source.pop("title", None)
    source.pop("description", None)
    cfg = inline(source, defs)
    cfg["description"] = (
        "The connector's config file, section by section as in connector/config.py. Secrets "
        "(api.api_key, kafka.sasl_password) are not accepted here: use secrets.apiKey / "
        "secrets.saslPassword or secrets.existingSecret. api.api_key_file, "
        "kafka.sasl_password_file, delivery.instance_id, kafka.group_instance_id and "
        "kafka.static_members are set by the chart."
    )
    kafka = cfg["properties"]["kafka"]
    kafka["if"] = {
        "properties": {"security_protocol": {"enum": ["SASL_PLAINTEXT", "SASL_SSL"]}},
        "required": ["security_protocol"],
    }
    kafka["then"] = {
        "required": ["sasl_mechanism"],
        "properties": {"sasl_mechanism": {"type": "string"}},
        # OAUTHBEARER logs in with an OAuth client; the other mechanisms with a user name
        "if": {"properties": {"sasl_mechanism": {"const": "OAUTHBEARER"}}},
        "then": {
            "required": ["oauth_token_url", "oauth_client_id"],
            "properties": {
                "oauth_token_url": {"type": "string", "minLength": 1},
                "oauth_client_id": {"type": "string", "minLength": 1},
            },
        },
        "else": {
            "required": ["sasl_username"],
            "properties": {"sasl_username": {"type": "string", "minLength": 1}},
        },
    }
    port = cfg["properties"]["server"]["properties"]["port"]
    port.update(minimum=1, description="the container's metrics and health port")
    return cfg


def obj(props: Schema, required: list[str] | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def typed(name: str | list[str], **extra: Any) -> Schema:
    return {"type": name, **extra}


STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = typed("string", pattern="^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$", description="e.g. 30s")
SECRET_KEY = typed("string", minLength=1, pattern="^[-._a-zA-Z0-9]+$")
LABEL_NAME = "^([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
INT_OR_PERCENT_OR_NULL = {
    "anyOf": [typed("integer", minimum=0), typed("string", pattern="^[0-9]+%$"), typed("null")]
}
PORT = typed("integer", minimum=1, maximum=65535)
CIDR = typed("string", pattern="^[0-9a-fA-F:.]+/[0-9]{1,3}$")
NETPOL_PEER = obj(
    {
        "cidrs": typed("array", items=CIDR, description="empty: any address on these ports"),
        "except": typed("array", items=CIDR),
        "ports": typed("array", items=PORT, minItems=1),
    }
)
PROBE = obj(
    {
        "initialDelaySeconds": typed("integer", minimum=0),
        "periodSeconds": typed("integer", minimum=1),
        "timeoutSeconds": typed("integer", minimum=1),
        "failureThreshold": typed("integer", minimum=1),
        "successThreshold": typed("integer", minimum=1),
    }
)


def values_schema() -> Schema:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "threads-connector chart values",
        "type": "object",
        "additionalProperties": False,
        "required": ["image", "replicaCount", "partitions", "config", "secrets"],
        "properties": {
            "global": typed("object", description="set by parent charts"),
            "image": obj(
                {
                    "repository": typed("string", minLength=1),
                    "tag": typed("string", description="empty: the chart's appVersion"),
                    "digest": typed(
                        "string", pattern="^(sha256:[a-f0-9]{64})?$", description="wins over tag"
                    ),
                    "pullPolicy": typed("string", enum=["Always", "IfNotPresent", "Never"]),
                },
                ["repository"],
            ),
            "imagePullSecrets": typed("array", items=obj({"name": typed("string")}, ["name"])),
            "nameOverride": typed("string", maxLength=63),
            "fullnameOverride": typed("string", maxLength=63),
            "replicaCount": typed(
                "integer", minimum=0, description="consumer group members (not with hpa/keda)"
            ),
            "partitions": typed(
                "integer", minimum=1, description="total input partitions; caps autoscaling"
            ),
            "config": config_schema(),
            "secrets": obj(
                {
                    "existingSecret": typed("string"),
                    "apiKeyKey": SECRET_KEY,
                    "saslPasswordKey": SECRET_KEY,
                    "sslKeyPasswordKey": SECRET_KEY,
                    "oauthClientSecretKey": SECRET_KEY,
                    "apiKey": typed("string"),
                    "saslPassword": typed("string"),
                    "sslKeyPassword": typed("string"),
                    "oauthClientSecret": typed("string"),
                    "rollOnChange": typed("boolean"),
                    "apps": typed(
                        "object",
                        description="each Mindset app's API key, by appUid",
                        propertyNames={"pattern": "^[-._a-zA-Z0-9]+$"},
                        additionalProperties=obj(
                            {
                                "apiKey": typed("string"),
                                "existingSecret": typed("string"),
                                "key": SECRET_KEY,
                            }
                        ),
                    ),
                }
            ),
            "apiTls": obj({"caSecret": typed("string"), "caKey": SECRET_KEY}),
            "schemaRegistry": obj(
                {
                    "existingSecret": typed("string"),
                    "passwordKey": typed("string"),
                    "bearerTokenKey": typed("string"),
                    "caSecret": typed("string"),
                    "caKey": SECRET_KEY,
                }
            ),
            "apiProxy": obj({"authSecret": typed("string"), "authKey": SECRET_KEY}),
            "kafkaTls": obj(
                {
                    "caSecret": typed("string"),
                    "caKey": SECRET_KEY,
                    "clientCertSecret": typed("string", description="mTLS: a kubernetes.io/tls"),
                    "clientCertKey": SECRET_KEY,
                    "clientKeyKey": SECRET_KEY,
                    "clientKeyEncrypted": typed("boolean"),
                }
            ),
            "networkPolicy": obj(
                {
                    "enabled": typed("boolean"),
                    "kafka": NETPOL_PEER,
                    "api": NETPOL_PEER,
                    "dns": obj(
                        {
                            "namespaceSelector": STR_MAP,
                            "podSelector": STR_MAP,
                            "ports": typed("array", items=PORT, minItems=1),
                        }
                    ),
                    "prometheus": obj(
                        {"namespaceSelector": typed(["object", "null"]),
                         "podSelector": typed(["object", "null"])}  # fmt: skip
                    ),
                    "extraEgress": typed("array", items=typed("object")),
                    "extraIngress": typed("array", items=typed("object")),
                }
            ),
            "serviceAccount": obj(
                {
                    "create": typed("boolean"),
                    "name": typed("string"),
                    "annotations": STR_MAP,
                    "automountServiceAccountToken": typed("boolean"),
                }
            ),
            "podAnnotations": STR_MAP,
            "podLabels": STR_MAP,
            "commonLabels": STR_MAP,
            "podSecurityContext": typed("object"),
            "securityContext": typed(
                "object",
                properties={
                    "readOnlyRootFilesystem": {"const": True},
                    "runAsNonRoot": {"const": True},
                    "allowPrivilegeEscalation": {"const": False},
                },
            ),
            "resources": typed("object"),
            "terminationGracePeriodSeconds": typed(
                ["integer", "null"],
                minimum=1,
                description="empty: drain_timeout_s + terminationGraceMarginSeconds",
            ),
            "terminationGraceMarginSeconds": typed("integer", minimum=1),
            "probes": obj({"liveness": PROBE, "readiness": PROBE}),
            "workloadKind": typed(
                "string",
                enum=["Deployment", "StatefulSet"],
                description="StatefulSet: static group membership (stable pod names)",
            ),
            "strategy": typed("object"),
            "extraEnv": typed("array", items=typed("object", required=["name"])),
            "extraVolumes": typed("array", items=typed("object", required=["name"])),
            "extraVolumeMounts": typed(
                "array", items=typed("object", required=["name", "mountPath"])
            ),
            "tmpSizeLimit": typed("string", pattern="^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|k|M|G)?$"),
            "nodeSelector": STR_MAP,
            "tolerations": typed("array"),
            "affinity": typed("object"),
            "topologySpreadConstraints": typed("array"),
            "priorityClassName": typed("string"),
            "service": obj(
                {
                    "type": typed("string", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                    "annotations": STR_MAP,
                }
            ),
            "serviceMonitor": obj(
                {
                    "enabled": typed("boolean"),
                    "labels": STR_MAP,
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "relabelings": typed("array"),
                    "metricRelabelings": typed("array"),
                }
            ),
            "podDisruptionBudget": obj(
                {
                    "enabled": typed("boolean"),
                    "maxUnavailable": INT_OR_PERCENT_OR_NULL,
                    "minAvailable": INT_OR_PERCENT_OR_NULL,
                    "unhealthyPodEvictionPolicy": {
                        "type": ["string", "null"],
                        "enum": ["AlwaysAllow", "IfHealthyBudget", None],
                        "description": "AlwaysAllow: pods that are not ready may be evicted "
                        "whatever the budget (a drain during an outage does not block)",
                    },
                }
            ),
            "hpa": obj(
                {
                    "enabled": typed("boolean"),
                    "minReplicas": typed("integer", minimum=1),
                    "maxReplicas": typed(
                        ["integer", "null"], minimum=1, description="capped at partitions"
                    ),
                    "targetCPUUtilizationPercentage": typed("integer", minimum=1, maximum=100),
                }
            ),
            "keda": obj(
                {
                    "enabled": typed("boolean"),
                    "minReplicaCount": typed("integer", minimum=0),
                    "maxReplicaCount": typed(
                        ["integer", "null"], minimum=1, description="capped at partitions"
                    ),
                    "pollingInterval": typed("integer", minimum=1),
                    "cooldownPeriod": typed("integer", minimum=0),
                    "lagThreshold": typed("integer", minimum=1),
                    "activationLagThreshold": typed("integer", minimum=0),
                    "bootstrapServers": typed("string"),
                    "scaleDownStabilizationWindowSeconds": typed(
                        "integer", minimum=0, maximum=3600
                    ),
                }
            ),
            "grafanaDashboard": obj(
                {
                    "enabled": typed("boolean"),
                    "label": typed("string", pattern=LABEL_NAME),
                    "labelValue": typed("string", maxLength=63),
                    "annotations": STR_MAP,
                    "namespace": typed("string"),
                }
            ),
            "prometheusRule": obj({"enabled": typed("boolean"), "labels": STR_MAP}),
        },
    }


if __name__ == "__main__":
    target = CHART / "values.schema.json"
    target.write_text(json.dumps(values_schema(), indent=2) + "\n")
    sys.stdout.write(f"wrote {target}\n")
