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
{{- define "threads-connector.clientCertDir" -}}/var/run/secrets/threads-connector-client{{- end }}

{{/*
The Secret holding the API key and the SASL password.
*/}}
{{- define "threads-connector.secretName" -}}
{{- default (include "threads-connector.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "threads-connector.saslEnabled" -}}
{{- $kafka := .Values.config.kafka | default dict }}
{{- if $kafka.sasl_mechanism }}true{{- end }}
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
{{- $_ := set $cfg.api "api_key_file" (printf "%s/api-key" (include "threads-connector.secretDir" .)) }}
{{- if include "threads-connector.saslEnabled" . }}
{{- $_ := set $cfg.kafka "sasl_password_file" (printf "%s/sasl-password" (include "threads-connector.secretDir" .)) }}
{{- end }}
{{- if .Values.apiTls.caSecret }}
{{- $_ := set $cfg.api "ca_file" (printf "%s/ca.crt" (include "threads-connector.apiTlsDir" .)) }}
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
{{- if and (not .Values.secrets.existingSecret) (not .Values.secrets.apiKey) }}
{{- $errors = append $errors "secrets.apiKey is required: set it (helm install --set-file secrets.apiKey=./api-key), or name a Secret you manage in secrets.existingSecret" }}
{{- end }}
{{- if and (include "threads-connector.saslEnabled" .) (not .Values.secrets.existingSecret) (not .Values.secrets.saslPassword) }}
{{- $errors = append $errors "secrets.saslPassword is required when config.kafka.sasl_mechanism is set (or name a Secret you manage in secrets.existingSecret)" }}
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
