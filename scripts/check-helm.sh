#!/usr/bin/env bash
# Offline checks of the Helm chart (no cluster needed):
#   1. helm lint --strict and helm template for the chart's defaults and each
#      helm/threads-connector/ci/*.yaml, for every Kubernetes version in KUBE_VERSIONS;
#   2. every rendered manifest validated against the Kubernetes JSON schemas of that version
#      (kubernetes-validate, strict: unknown fields are errors); the CRD kinds the chart can
#      render (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) against
#      minimal schemas below, since kubernetes-validate carries only built-in kinds;
#   3. negative checks: helm/threads-connector/ci-invalid/bad-values.yaml is rejected with the
#      values schema's messages, the defaults without an API key and a grace period not above
#      the drain timeout are rejected with the chart's messages.
# "Defaults" means the chart's values.yaml plus the one value it cannot default:
# secrets.apiKey (--set secrets.apiKey=...).
#
# Needs: helm (scripts/install-helm.sh puts it in .local/bin) and kubernetes-validate in the
# project's Python (same script). Rendered manifests are kept in $OUT_DIR for inspection.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/threads-connector"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.29.0 1.36.0}"
OUT_DIR="${OUT_DIR:-$ROOT/.local/helm-rendered}"
HELM="${HELM:-}"
if [[ -z "$HELM" ]]; then
  if [[ -x "$ROOT/.local/bin/helm" ]]; then HELM="$ROOT/.local/bin/helm"; else HELM="$(command -v helm || true)"; fi
fi
if [[ -z "$HELM" || ! -x "$HELM" ]]; then
  echo "check-helm: helm not found; run scripts/install-helm.sh (builds the pinned helm into .local/bin)" >&2
  exit 1
fi
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  echo "check-helm: kubernetes-validate is missing from $PY; run scripts/install-helm.sh" >&2
  exit 1
fi

validate_dir() {  # dir with <case>-k<kubernetes version>.yaml files
  "$PY" - "$1" <<'PY'
"""Validate every manifest in OUT_DIR/*-k<version>.yaml against that Kubernetes version."""
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
    "labels": STR_MAP, "annotations": STR_MAP}}
DURATION = {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d|w|y))+$"}


def crd(spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"metadata": META, "spec": spec}}


# Minimal schemas for the CRD kinds (the fields this chart renders, typed as the operators'
# CRDs type them); unknown fields are errors, as in kubernetes-validate's strict mode.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): crd({
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"],
                         "properties": {"matchLabels": STR_MAP}},
            "namespaceSelector": {"type": "object", "properties": {
                "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": DURATION, "scrapeTimeout": DURATION,
                               "relabelings": {"type": "array"},
                               "metricRelabelings": {"type": "array"}}}}}}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): crd({
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {
                "name": {"type": "string", "minLength": 1}, "interval": DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["expr"],
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {
                        "alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]}, "for": DURATION,
                        "keep_firing_for": DURATION,
                        "labels": STR_MAP, "annotations": STR_MAP}}}}}}}}),
    ("keda.sh/v1alpha1", "ScaledObject"): crd({
        "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"],
                               "properties": {"name": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
            "advanced": {"type": "object"},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                "properties": {
                    "type": {"type": "string"},
                    "metadata": STR_MAP,  # KEDA rejects non-string metadata values
                    "authenticationRef": {"type": "object", "required": ["name"],
                                          "properties": {"name": {"type": "string"}}}}}}}}),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): crd({
        "type": "object", "additionalProperties": False,
        "properties": {
            "secretTargetRef": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["parameter", "name", "key"],
                "properties": {k: {"type": "string"} for k in ("parameter", "name", "key")}}},
            "env": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["parameter", "name"],
                "properties": {k: {"type": "string"}
                               for k in ("parameter", "name", "containerName")}}}}}),
}

out_dir = Path(sys.argv[1])
errors = 0
kinds: Counter[str] = Counter()
files = sorted(out_dir.glob("*-k*.yaml"))
if not files:
    sys.exit("no rendered manifests to validate")
for path in files:
    version = path.stem.rsplit("-k", 1)[1]
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        try:
            if schema is not None:
                jsonschema.Draft7Validator(schema).validate(doc)
            else:
                kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as exc:
            errors += 1
            at = ".".join(str(p) for p in exc.absolute_path)
            print(f"INVALID {where} against Kubernetes {version}: {at}: {exc.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors += 1
            print(f"NO SCHEMA {where}: {exc.message}")
            continue
        kinds[doc["kind"]] += 1
print("ok   schema-valid manifests: "
      + ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
      + f" ({len(files)} renders)")
sys.exit(1 if errors else 0)
PY
}

# scripts/check-helm.sh --validate DIR: only validate DIR's <name>-k<version>.yaml files.
if [[ "${1:-}" == "--validate" ]]; then
  validate_dir "${2:?usage: check-helm.sh --validate DIR}"
  exit
fi

echo "check-helm: $("$HELM" version --short), Kubernetes ${KUBE_VERSIONS// /, }"
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# --- 1. lint and render -------------------------------------------------------------------
cases=("defaults")
for f in "$CHART"/ci/*.yaml; do cases+=("$f"); done
for case in "${cases[@]}"; do
  if [[ "$case" == defaults ]]; then
    name=defaults
    args=(--set secrets.apiKey=ci-placeholder-api-key)
  else
    name="$(basename "$case" .yaml)"
    args=(-f "$case")
  fi
  for kv in $KUBE_VERSIONS; do
    if ! lint_out="$("$HELM" lint --strict "$CHART" --kube-version "$kv" "${args[@]}" 2>&1)"; then
      echo "$lint_out" >&2
      fail "helm lint $name (Kubernetes $kv)"
      continue
    fi
    out="$OUT_DIR/$name-k$kv.yaml"
    if ! err="$("$HELM" template ci-release "$CHART" --namespace connectors --kube-version "$kv" \
        "${args[@]}" 2>&1 > "$out")"; then
      echo "$err" >&2
      fail "helm template $name (Kubernetes $kv)"
      continue
    fi
    echo "ok   lint + template  $name  (Kubernetes $kv)"
  done
done

# --- 2. schema validation of every rendered manifest ----------------------------------------
if ! validate_dir "$OUT_DIR"; then
  fail "schema validation of the rendered manifests"
fi

# --- 3. negative checks ----------------------------------------------------------------------
expect_rejected() {  # name, expected message..., -- helm template args...
  local name="$1"; shift
  local expected=()
  while [[ "$1" != "--" ]]; do expected+=("$1"); shift; done
  shift
  local out
  if out="$("$HELM" template ci-release "$CHART" "$@" 2>&1)"; then
    fail "$name: helm template accepted it"
    return
  fi
  local msg
  for msg in "${expected[@]}"; do
    if ! grep -qF -- "$msg" <<< "$out"; then
      echo "$out" >&2
      fail "$name: the error does not say: $msg"
      return
    fi
  done
  echo "ok   rejected as expected: $name"
}

BAD="$CHART/ci-invalid/bad-values.yaml"
expect_rejected "ci-invalid/bad-values.yaml (values schema)" \
  "values don't meet the specifications of the schema" \
  "at '/replicaCount': got string, want integer" \
  "at '/config/kafka/security_protocol': value must be one of 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT', 'SASL_SSL'" \
  "at '/config/api': additional properties 'api_key' not allowed" \
  "at '/config/delivery/drain_timeout_s': exclusiveMinimum: got -5, want 0" \
  -- -f "$BAD"
if "$HELM" lint "$CHART" -f "$BAD" > /dev/null 2>&1; then
  fail "helm lint accepted ci-invalid/bad-values.yaml"
else
  echo "ok   helm lint rejects ci-invalid/bad-values.yaml"
fi
expect_rejected "defaults without secrets.apiKey" \
  "secrets.apiKey is required" -- 
expect_rejected "terminationGracePeriodSeconds not above the drain timeout" \
  "terminationGracePeriodSeconds (30) must be greater than config.delivery.drain_timeout_s (70)" \
  -- --set secrets.apiKey=x --set terminationGracePeriodSeconds=30
expect_rejected "SASL without a password" \
  "secrets.saslPassword is required" \
  -- --set secrets.apiKey=x --set config.kafka.security_protocol=SASL_SSL \
     --set config.kafka.sasl_mechanism=PLAIN --set config.kafka.sasl_username=u
expect_rejected "hpa and keda together" \
  "enable at most one of hpa and keda" \
  -- --set secrets.apiKey=x --set hpa.enabled=true --set keda.enabled=true

if (( failures )); then
  echo "check-helm: $failures check(s) failed" >&2
  exit 1
fi
echo "check-helm: all checks passed (rendered manifests in $OUT_DIR)"
