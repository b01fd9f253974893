{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "kernelflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object's name: the release name, with the chart name unless it has it. */}}
{{- define "kernelflow.fullname" -}}
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

{{- define "kernelflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kernelflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (operator or agent): pass (list $ "operator"). */}}
{{- define "kernelflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kernelflow.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "kernelflow.componentLabels" -}}
{{ include "kernelflow.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "kernelflow.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "kernelflow.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kernelflow.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "kernelflow.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Names the operator's flags and RBAC must agree on. */}}
{{- define "kernelflow.webhook.service" -}}
{{ include "kernelflow.fullname" . }}-webhook
{{- end }}
{{- define "kernelflow.webhook.secret" -}}
{{ include "kernelflow.fullname" . }}-webhook-tls
{{- end }}
{{- define "kernelflow.webhook.configuration" -}}
{{ include "kernelflow.fullname" . }}-validating-webhook
{{- end }}
{{- define "kernelflow.leaseName" -}}
{{ default (printf "%s-operator" (include "kernelflow.fullname" .)) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* image: pass (list $ .Values.operator.image). */}}
{{- define "kernelflow.image" -}}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default (index . 0).Chart.AppVersion $image.tag) }}
{{- end }}
