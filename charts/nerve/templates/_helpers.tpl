{{/*
Name of the chart, overridable.
*/}}
{{- define "nerve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "nerve.fullname" -}}
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

{{/*
Labels on every object.
*/}}
{{- define "nerve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "nerve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nerve
{{- end }}

{{/*
Selector labels of one component (agent or webhook): pass (dict "root" $ "component" "agent").
*/}}
{{- define "nerve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nerve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "nerve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nerve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nerve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The image injected into training pods.
*/}}
{{- define "nerve.sidecarImage" -}}
{{- $repository := default .Values.image.repository .Values.webhook.sidecarImage.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.webhook.sidecarImage.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "nerve.webhookName" -}}
{{- printf "%s-webhook" (include "nerve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Security context of every container the chart runs: non-root, read-only, no capabilities.
65532 is the "nonroot" user of the distroless base image.
*/}}
{{- define "nerve.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Namespaces the webhooks see: the configured selector, else every namespace but kube-system and
the release's own.
*/}}
{{- define "nerve.webhookNamespaceSelector" -}}
{{- if .Values.webhook.namespaceSelector }}
{{- toYaml .Values.webhook.namespaceSelector }}
{{- else -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: ["kube-system", {{ .Release.Namespace | quote }}]
{{- end }}
{{- end }}

{{/*
How the API server reaches the webhook. Takes a dict: root (the chart context), name (the
webhook's Service) and caBundle (empty with cert-manager, which injects it).
*/}}
{{- define "nerve.webhookClientConfig" -}}
service:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  path: /mutate
  port: 443
{{- if not .root.Values.webhook.certManager.enabled }}
caBundle: {{ .caBundle }}
{{- end }}
{{- end }}
