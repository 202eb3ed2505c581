{{/*
Names, labels, images and the checks every template shares.
*/}}

{{- define "secapi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name. Component suffixes such as "-trivy-server" (13 characters) are
appended to it, so it is cut to 50 characters to keep every object name within 63.
*/}}
{{- define "secapi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "secapi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "root" $ "component" "api").
*/}}
{{- define "secapi.labels" -}}
helm.sh/chart: {{ include "secapi.chart" .root }}
{{ include "secapi.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: secapi
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that select one component's pods; they never change between upgrades.
*/}}
{{- define "secapi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "secapi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}. Call with
(dict "image" .Values.api.image "root" $); an empty tag means the chart's appVersion.
*/}}
{{- define "secapi.image" -}}
{{- $image := .image }}
{{- $reference := $image.repository }}
{{- if $image.registry }}
{{- $reference = printf "%s/%s" (trimSuffix "/" $image.registry) $image.repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $reference $image.digest }}
{{- else }}
{{- printf "%s:%s" $reference (default .root.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "secapi.api.serviceAccountName" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (printf "%s-api" (include "secapi.fullname" .)) .Values.api.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "secapi.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "secapi.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "secapi.scanner.serviceAccountName" -}}
{{- if .Values.scanner.serviceAccount.create }}
{{- default (printf "%s-scanner" (include "secapi.fullname" .)) .Values.scanner.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.scanner.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Trivy server's StatefulSet and Services. A StatefulSet's name goes into its pods'
controller-revision-hash label with an 11-character suffix, and label values stop at 63
characters, so the name is kept to 52.
*/}}
{{- define "secapi.trivyServer.name" -}}
{{- printf "%s-trivy-server" (include "secapi.fullname" . | trunc 39 | trimSuffix "-") }}
{{- end }}

{{- define "secapi.trivyServer.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "secapi.trivyServer.name" .) .Release.Namespace (int .Values.trivyServer.port) }}
{{- end }}

{{/*
Name of the Secret the chart creates for the URLs given inline.
*/}}
{{- define "secapi.secretName" -}}
{{- printf "%s-config" (include "secapi.fullname" .) }}
{{- end }}

{{- define "secapi.secretKeySecretName" -}}
{{- printf "%s-secret-key" (include "secapi.fullname" .) }}
{{- end }}

{{- define "secapi.evaluationSecretName" -}}
{{- printf "%s-evaluation" (include "secapi.fullname" .) }}
{{- end }}

{{/*
The environment variables DATABASE_URL, REDIS_URL and SECRET_KEY of the API and the
operator, each read from the user's existing Secret, the chart's Secret or, in evaluation
mode, composed from the generated passwords with Kubernetes' $(VAR) expansion.
Call with (dict "root" $ "database" true "redis" true "secretKey" true).
*/}}
{{- define "secapi.secretEnv" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $fullname := include "secapi.fullname" $root }}
{{- if .database }}
{{- if $values.evaluation.enabled }}
- name: SECAPI_EVALUATION_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "secapi.evaluationSecretName" $root }}
      key: postgres-password
- name: DATABASE_URL
  value: {{ printf "postgresql://secapi:$(SECAPI_EVALUATION_POSTGRES_PASSWORD)@%s-postgresql:5432/secapi" $fullname | quote }}
{{- else if $values.database.existingSecret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $values.database.existingSecret | quote }}
      key: {{ $values.database.existingSecretKey | quote }}
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "secapi.secretName" $root) }}
      key: DATABASE_URL
{{- end }}
{{- end }}
{{- if .redis }}
{{- if $values.evaluation.enabled }}
- name: SECAPI_EVALUATION_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "secapi.evaluationSecretName" $root }}
      key: redis-password
- name: REDIS_URL
  value: {{ printf "redis://:$(SECAPI_EVALUATION_REDIS_PASSWORD)@%s-redis:6379/0" $fullname | quote }}
{{- else if $values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $values.redis.existingSecret | quote }}
      key: {{ $values.redis.existingSecretKey | quote }}
{{- else if $values.redis.url }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "secapi.secretName" $root }}
      key: REDIS_URL
{{- end }}
{{- end }}
{{- if .secretKey }}
- name: SECRET_KEY
  valueFrom:
    secretKeyRef:
{{- if $values.secretKey.existingSecret }}
      name: {{ $values.secretKey.existingSecret | quote }}
      key: {{ $values.secretKey.existingSecretKey | quote }}
{{- else }}
      name: {{ include "secapi.secretKeySecretName" $root }}
      key: SECRET_KEY
{{- end }}
{{- end }}
{{- end }}

{{/*
A pod's checksum annotations, so that a changed ConfigMap or Secret rolls the pods.
*/}}
{{- define "secapi.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{/*
Checks of value combinations that the schema cannot express. Every template includes
this, so `helm template` and `helm install` stop with one clear message.
*/}}
{{- define "secapi.validate" -}}
{{- $values := .Values }}
{{- if and (not $values.evaluation.enabled) (not $values.database.url) (not $values.database.existingSecret) }}
{{- fail "No PostgreSQL database is configured: set database.url, or database.existingSecret (a Secret with the URL under database.existingSecretKey), or evaluation.enabled=true for a throwaway database inside the release" }}
{{- end }}
{{- if and $values.evaluation.enabled (or $values.database.url $values.database.existingSecret $values.redis.url $values.redis.existingSecret) }}
{{- fail "evaluation.enabled=true runs its own PostgreSQL and Redis, so database.url, database.existingSecret, redis.url and redis.existingSecret must stay empty: unset them, or set evaluation.enabled=false to use your own" }}
{{- end }}
{{- if and $values.secretKey.value (eq $values.environment "production") (lt (len $values.secretKey.value) 32) }}
{{- fail (printf "secretKey.value is %d characters long, and environment=production requires at least 32: generate one with `openssl rand -hex 32`, or leave it empty so the chart generates one" (len $values.secretKey.value)) }}
{{- end }}
{{- end }}
