{{/*
Names and labels.
*/}}
{{- define "threads-connector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "threads-connector.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "threads-connector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "threads-connector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "threads-connector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "threads-connector.labels" -}}
helm.sh/chart: {{ include "threads-connector.chart" . }}
{{ include "threads-connector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: connector
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "threads-connector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "threads-connector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "threads-connector.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Where things are mounted in the container.
*/}}
{{- define "threads-connector.configDir" -}}/etc/threads-connector{{- end }}
{{- define "threads-connector.secretDir" -}}/var/run/secrets/threads-connector{{- end }}
{{- define "threads-connector.tlsDir" -}}/var/run/secrets/threads-connector-tls{{- end }}
{{- define "threads-connector.apiTlsDir" -}}/var/run/secrets/threads-connector-api-tls{{- end }}
{{- define "threads-connector.registryDir" -}}/var/run/secrets/threads-connector-registry{{- end }}
{{- define "threads-connector.registryTlsDir" -}}/var/run/secrets/threads-connector-registry-tls{{- end }}
{{- define "threads-connector.clientCertDir" -}}/var/run/secrets/threads-connector-client{{- end }}
{{- define "threads-connector.appsDir" -}}/var/run/secrets/threads-connector-apps{{- end }}
{{- define "threads-connector.apiProxyDir" -}}/var/run/secrets/threads-connector-api-proxy{{- end }}

{{/*
Is the default API key (secrets.apiKey, or secrets.apiKeyKey in secrets.existingSecret)
mounted and used? Always with an existing Secret; with the chart's Secret only when set
(with secrets.apps, every route's app may have a key of its own).
*/}}
{{- define "threads-connector.defaultApiKey" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.apiKey (not .Values.secrets.apps) }}true{{- end }}
{{- end }}

{{/*
Does the connector's Secret volume mount anything (the default key, the SASL password, the
client key's password)? Not with per-app keys only and no SASL.
*/}}
{{- define "threads-connector.secretVolume" -}}
{{- if or (include "threads-connector.defaultApiKey" .) (include "threads-connector.saslEnabled" .) (include "threads-connector.oauthEnabled" .) .Values.kafkaTls.clientKeyEncrypted }}true{{- end }}
{{- end }}

{{/*
One app's key (secrets.apps.<appUid>): the Secret and the key in it, as "secret/key".
Its own existingSecret (key default api-key), else secrets.existingSecret or the chart's
Secret (key default api-key-<appUid>).
*/}}
{{- define "threads-connector.appKeySource" -}}
{{- $app := index .root.Values.secrets.apps .app | default dict }}
{{- if $app.existingSecret }}
{{- printf "%s/%s" $app.existingSecret ($app.key | default "api-key") }}
{{- else }}
{{- printf "%s/%s" (include "threads-connector.secretName" .root) ($app.key | default (printf "api-key-%s" .app)) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API key and the SASL password.
*/}}
{{- define "threads-connector.secretName" -}}
{{- default (include "threads-connector.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "threads-connector.saslEnabled" -}}
{{- $kafka := .Values.config.kafka | default dict }}
{{- if and $kafka.sasl_mechanism (ne $kafka.sasl_mechanism "OAUTHBEARER") }}true{{- end }}
{{- end }}

{{/* SASL/OAUTHBEARER: a client secret (secrets.oauthClientSecret) instead of a password. */}}
{{- define "threads-connector.oauthEnabled" -}}
{{- $kafka := .Values.config.kafka | default dict }}
{{- if eq ($kafka.sasl_mechanism | default "") "OAUTHBEARER" }}true{{- end }}
{{- end }}

{{- define "threads-connector.tlsEnabled" -}}
{{- $kafka := .Values.config.kafka | default dict }}
{{- if has ($kafka.security_protocol | default "PLAINTEXT") (list "SSL" "SASL_SSL") }}true{{- end }}
{{- end }}

{{- define "threads-connector.metricsPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- int (default 9464 $server.port) }}
{{- end }}

{{- define "threads-connector.drainTimeoutSeconds" -}}
{{- $delivery := .Values.config.delivery | default dict }}
{{- $drain := default 70 $delivery.drain_timeout_s }}
{{- ceil (float64 $drain) | int }}
{{- end }}

{{- define "threads-connector.terminationGracePeriodSeconds" -}}
{{- $drain := include "threads-connector.drainTimeoutSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain (int .Values.terminationGraceMarginSeconds) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The rendered connector.yaml: the config values plus the secret file paths and the CA file.
*/}}
{{- define "threads-connector.configYaml" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if not (hasKey $cfg "api") }}{{- $_ := set $cfg "api" dict }}{{- end }}
{{- if not (hasKey $cfg "kafka") }}{{- $_ := set $cfg "kafka" dict }}{{- end }}
{{- if include "threads-connector.defaultApiKey" . }}
{{- $_ := set $cfg.api "api_key_file" (printf "%s/api-key" (include "threads-connector.secretDir" .)) }}
{{- end }}
{{- range $app := keys (.Values.secrets.apps | default dict) | sortAlpha }}
{{- if not (hasKey $cfg.api "apps") }}{{- $_ := set $cfg.api "apps" dict }}{{- end }}
{{- if not (hasKey $cfg.api.apps $app) }}{{- $_ := set $cfg.api.apps $app dict }}{{- end }}
{{- $_ := set (index $cfg.api.apps $app) "api_key_file" (printf "%s/%s/api-key" (include "threads-connector.appsDir" $) $app) }}
{{- end }}
{{- if include "threads-connector.saslEnabled" . }}
{{- $_ := set $cfg.kafka "sasl_password_file" (printf "%s/sasl-password" (include "threads-connector.secretDir" .)) }}
{{- end }}
{{- if include "threads-connector.oauthEnabled" . }}
{{- $_ := set $cfg.kafka "oauth_client_secret_file" (printf "%s/oauth-client-secret" (include "threads-connector.secretDir" .)) }}
{{- end }}
{{- if .Values.apiTls.caSecret }}
{{- $_ := set $cfg.api "ca_file" (printf "%s/ca.crt" (include "threads-connector.apiTlsDir" .)) }}
{{- end }}
{{- $registry := .Values.schemaRegistry | default dict }}
{{- if or $registry.caSecret (and $registry.existingSecret (or $registry.passwordKey $registry.bearerTokenKey)) }}
{{- if not (hasKey $cfg "schema_registry") }}{{- $_ := set $cfg "schema_registry" dict }}{{- end }}
{{- if and $registry.existingSecret $registry.passwordKey }}
{{- $_ := set $cfg.schema_registry "password_file" (printf "%s/password" (include "threads-connector.registryDir" .)) }}
{{- end }}
{{- if and $registry.existingSecret $registry.bearerTokenKey }}
{{- $_ := set $cfg.schema_registry "bearer_token_file" (printf "%s/bearer-token" (include "threads-connector.registryDir" .)) }}
{{- end }}
{{- if $registry.caSecret }}
{{- $_ := set $cfg.schema_registry "ca_file" (printf "%s/ca.crt" (include "threads-connector.registryTlsDir" .)) }}
{{- end }}
{{- end }}
{{- if .Values.apiProxy.authSecret }}
{{- $_ := set $cfg.api "proxy_auth_file" (printf "%s/proxy-auth" (include "threads-connector.apiProxyDir" .)) }}
{{- end }}
{{- if .Values.kafkaTls.caSecret }}
{{- $_ := set $cfg.kafka "ssl_cafile" (printf "%s/ca.crt" (include "threads-connector.tlsDir" .)) }}
{{- end }}
{{- if .Values.kafkaTls.clientCertSecret }}
{{- $_ := set $cfg.kafka "ssl_certfile" (printf "%s/tls.crt" (include "threads-connector.clientCertDir" .)) }}
{{- $_ := set $cfg.kafka "ssl_keyfile" (printf "%s/tls.key" (include "threads-connector.clientCertDir" .)) }}
{{- if .Values.kafkaTls.clientKeyEncrypted }}
{{- $_ := set $cfg.kafka "ssl_key_password_file" (printf "%s/ssl-key-password" (include "threads-connector.secretDir" .)) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The maximum replica count an autoscaler may reach: its own maximum, capped at the partitions.
*/}}
{{- define "threads-connector.maxReplicas" -}}
{{- $partitions := int .root.Values.partitions }}
{{- if kindIs "invalid" .max }}
{{- $partitions }}
{{- else }}
{{- min (int .max) $partitions }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot express; each fails with what to change.
*/}}
{{- define "threads-connector.validate" -}}
{{- $errors := list }}
{{- if not (include "threads-connector.defaultApiKey" .) }}
{{- range $i, $route := (.Values.config.routes | default list) }}
{{- if not (hasKey $.Values.secrets.apps (toString $route.app_uid)) }}
{{- $errors = append $errors (printf "config.routes[%d] (app_uid %s) has no API key: add secrets.apps.%s, or a default secrets.apiKey" $i $route.app_uid $route.app_uid) }}
{{- end }}
{{- end }}
{{- else if and (not .Values.secrets.existingSecret) (not .Values.secrets.apiKey) }}
{{- $errors = append $errors "secrets.apiKey is required: set it (helm install --set-file secrets.apiKey=./api-key), or name a Secret you manage in secrets.existingSecret" }}
{{- end }}
{{- range $name, $app := (.Values.secrets.apps | default dict) }}
{{- if and (not $app.existingSecret) (not $.Values.secrets.existingSecret) (not $app.apiKey) }}
{{- $errors = append $errors (printf "secrets.apps.%s needs apiKey (a value for the chart's Secret) or existingSecret (a Secret you manage)" $name) }}
{{- end }}
{{- end }}
{{- if and (include "threads-connector.saslEnabled" .) (not .Values.secrets.existingSecret) (not .Values.secrets.saslPassword) }}
{{- $errors = append $errors "secrets.saslPassword is required when config.kafka.sasl_mechanism is set (or name a Secret you manage in secrets.existingSecret)" }}
{{- end }}
{{- if and (include "threads-connector.oauthEnabled" .) (not .Values.secrets.existingSecret) (not .Values.secrets.oauthClientSecret) }}
{{- $errors = append $errors "secrets.oauthClientSecret is required when config.kafka.sasl_mechanism is OAUTHBEARER (or name a Secret you manage in secrets.existingSecret)" }}
{{- end }}
{{- if and (include "threads-connector.oauthEnabled" .) .Values.keda.enabled }}
{{- $errors = append $errors "keda.enabled: the chart's KEDA Kafka trigger logs in with a SASL password; with OAUTHBEARER use hpa (or a TriggerAuthentication of your own)" }}
{{- end }}
{{- if and .Values.kafkaTls.clientCertSecret (not (include "threads-connector.tlsEnabled" .)) }}
{{- $errors = append $errors "kafkaTls.clientCertSecret needs config.kafka.security_protocol SSL or SASL_SSL" }}
{{- end }}
{{- if and .Values.kafkaTls.clientKeyEncrypted (not .Values.kafkaTls.clientCertSecret) }}
{{- $errors = append $errors "kafkaTls.clientKeyEncrypted needs kafkaTls.clientCertSecret" }}
{{- end }}
{{- if and .Values.kafkaTls.clientKeyEncrypted (not .Values.secrets.existingSecret) (not .Values.secrets.sslKeyPassword) }}
{{- $errors = append $errors "secrets.sslKeyPassword is required when kafkaTls.clientKeyEncrypted is true (or name a Secret you manage in secrets.existingSecret)" }}
{{- end }}
{{- $drain := include "threads-connector.drainTimeoutSeconds" . | int }}
{{- $grace := include "threads-connector.terminationGracePeriodSeconds" . | int }}
{{- if le $grace $drain }}
{{- $errors = append $errors (printf "terminationGracePeriodSeconds (%d) must be greater than config.delivery.drain_timeout_s (%d): Kubernetes would kill the pod before it drains and commits" $grace $drain) }}
{{- end }}
{{- if and .Values.hpa.enabled .Values.keda.enabled }}
{{- $errors = append $errors "enable at most one of hpa and keda (KEDA creates its own HorizontalPodAutoscaler)" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.partitions)) }}
{{- $errors = append $errors (printf "keda.minReplicaCount (%d) exceeds partitions (%d): the extra consumers would sit idle" (int .Values.keda.minReplicaCount) (int .Values.partitions)) }}
{{- end }}
{{- if and .Values.hpa.enabled (gt (int .Values.hpa.minReplicas) (int .Values.partitions)) }}
{{- $errors = append $errors (printf "hpa.minReplicas (%d) exceeds partitions (%d): the extra consumers would sit idle" (int .Values.hpa.minReplicas) (int .Values.partitions)) }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- $errors = append $errors "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nthreads-connector: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}

{{/*
How many pods (ordinals 0..n-1) are static group members under a StatefulSet: with an
autoscaler, its minimum (the pods it never removes); empty without one (every pod).
*/}}
{{- define "threads-connector.staticMembers" -}}
{{- if .Values.hpa.enabled }}{{ .Values.hpa.minReplicas }}
{{- else if .Values.keda.enabled }}{{ .Values.keda.minReplicaCount }}
{{- end }}
{{- end }}
