{{/*
The chart name, or nameOverride.
*/}}
{{- define "snapcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: fullnameOverride, else "<release>-<name>", or just
"<release>" when the release name already contains the chart name.
*/}}
{{- define "snapcache.fullname" -}}
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
"snapcache-0.1.0", for the helm.sh/chart label.
*/}}
{{- define "snapcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "snapcache.labels" -}}
helm.sh/chart: {{ include "snapcache.chart" . }}
{{ include "snapcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: snapcache
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator's pods (immutable in the Deployment's selector).
*/}}
{{- define "snapcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "snapcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "snapcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "snapcache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image, tag defaulting to appVersion.
*/}}
{{- define "snapcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The default sidecar image (SNAPCACHE_SIDECAR_IMAGE), tag defaulting to appVersion.
*/}}
{{- define "snapcache.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/*
The leader-election Lease.
*/}}
{{- define "snapcache.leaseName" -}}
{{- default (include "snapcache.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Labels added to every alert of the PrometheusRule: severity, then additionalAlertLabels.
Call with (dict "severity" ... "root" $).
*/}}
{{- define "snapcache.alertLabels" -}}
severity: {{ .severity | quote }}
{{- range $key, $value := .root.Values.prometheusRule.additionalAlertLabels }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end }}

{{/*
The webhook entry the MutatingWebhookConfiguration starts with, and the template of the
per-SnapshotCache entries the operator keeps there (every defaulted field spelt out, so
the operator's copies read back unchanged). The API server does not call it for
opted-out namespaces and pods, nor for kube-system and the operator's own namespace
(on Kubernetes 1.21+, where namespaces carry kubernetes.io/metadata.name).
*/}}
{{- define "snapcache.webhookEntry" -}}
name: pods.snapcache.io
admissionReviewVersions: ["v1"]
sideEffects: None
timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
failurePolicy: {{ .Values.webhook.failurePolicy }}
matchPolicy: Equivalent
reinvocationPolicy: IfNeeded
clientConfig:
  service:
    name: {{ include "snapcache.fullname" . }}-webhook
    namespace: {{ .Release.Namespace }}
    path: /mutate
    port: 443
rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
    scope: Namespaced
namespaceSelector:
  matchExpressions:
    - key: snapcache.io/inject
      operator: NotIn
      values: ["false"]
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values: ["kube-system", {{ .Release.Namespace | quote }}]
objectSelector:
  matchExpressions:
    - key: snapcache.io/inject
      operator: NotIn
      values: ["false"]
{{- end }}
