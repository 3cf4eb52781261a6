{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "flowcraft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or the release name when it already contains the chart name.
*/}}
{{- define "flowcraft.fullname" -}}
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
The helm.sh/chart label value: "<chart>-<version>".
*/}}
{{- define "flowcraft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "flowcraft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowcraft.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Standard labels (Helm chart best practices) for every object. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "flowcraft.labels" -}}
helm.sh/chart: {{ include "flowcraft.chart" .ctx }}
{{ include "flowcraft.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: flowcraft
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "flowcraft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowcraft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The worker ServiceAccount name (pools set it in spec.serviceAccountName).
*/}}
{{- define "flowcraft.workerServiceAccountName" -}}
{{- default (printf "%s-worker" (include "flowcraft.fullname" .)) .Values.worker.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespaces the worker ServiceAccount is created in, as a list.
*/}}
{{- define "flowcraft.workerNamespaces" -}}
{{- if .Values.worker.serviceAccount.namespaces }}
{{- toJson (uniq .Values.worker.serviceAccount.namespaces) }}
{{- else if .Values.watchNamespace }}
{{- toJson (list .Values.watchNamespace) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is set, else repository:tag (tag defaults to appVersion).
*/}}
{{- define "flowcraft.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the connection Secret the chart creates for pools in the release namespace.
*/}}
{{- define "flowcraft.connectionSecretName" -}}
{{- printf "%s-connection" (include "flowcraft.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Whether the chart creates the connection Secret ("true" or "").
*/}}
{{- define "flowcraft.createConnectionSecret" -}}
{{- if .Values.connection.create }}true{{ end }}
{{- end }}
