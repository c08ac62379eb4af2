{{/* The chart's name, truncated to the 63 characters of a label value. */}}
{{- define "layerlb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object this chart creates. */}}
{{- define "layerlb.fullname" -}}
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

{{- define "layerlb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release; `helm uninstall` and the e2e orphan check rely on them. */}}
{{- define "layerlb.labels" -}}
helm.sh/chart: {{ include "layerlb.chart" . }}
{{ include "layerlb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator pods' identity. The component keeps them apart from the forwarding pods the operator
creates, which are also app.kubernetes.io/name=layerlb. */}}
{{- define "layerlb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layerlb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "layerlb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "layerlb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "layerlb.leaseName" -}}
{{- .Values.operator.leaseName }}
{{- end }}

{{- define "layerlb.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The forwarding pods' image: dataplane.image, each part defaulting to the operator's. */}}
{{- define "layerlb.dataplaneImage" -}}
{{- $repository := .Values.dataplane.image.repository | default .Values.image.repository }}
{{- $tag := .Values.dataplane.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* The speaker pods' identity: component speaker, apart from the operator and the forwarding pods. */}}
{{- define "layerlb.speakerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "layerlb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: speaker
{{- end }}

{{- define "layerlb.speakerLabels" -}}
helm.sh/chart: {{ include "layerlb.chart" . }}
{{ include "layerlb.speakerSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
