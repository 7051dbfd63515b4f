{{/*
Name of the chart: the app.kubernetes.io/name label `lade load --discover` selects on.
*/}}
{{- define "lade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the objects. Truncated at 63 characters (DNS label limit); the release
name alone when it already contains the chart name.
*/}}
{{- define "lade.fullname" -}}
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
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "lade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "lade.labels" -}}
helm.sh/chart: {{ include "lade.chart" . }}
{{ include "lade.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels selecting the agent pods (DaemonSet, Service, NetworkPolicy, discovery).
*/}}
{{- define "lade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Image reference: digest wins over tag; the tag defaults to the chart's appVersion.
*/}}
{{- define "lade.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the auth token: the admin's own, or the one the chart generates.
*/}}
{{- define "lade.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "lade.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Key of the token inside the auth Secret.
*/}}
{{- define "lade.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecretKey }}
{{- else -}}
token
{{- end }}
{{- end }}

{{/*
Base64 token for the generated Secret. Takes (dict "existing" SECRET): the Secret `lookup`
found in the cluster, or an empty map. An existing token is kept, so upgrades never change the
credential the admin already holds; a fresh random one is made otherwise (always with
`helm template` and `--dry-run`, where lookup answers nothing).
*/}}
{{- define "lade.authTokenB64" -}}
{{- $data := (.existing | default dict).data | default dict }}
{{- if index $data "token" }}
{{- index $data "token" }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{/*
Paths inside the container.
*/}}
{{- define "lade.authTokenPath" -}}/etc/lade/auth/token{{- end }}
{{- define "lade.tlsDir" -}}/etc/lade/tls{{- end }}

{{/*
Who unpacks layers on containerd nodes: `agent` or `containerd`. The agent writes into the
snapshots under containerd's root, so it needs that root mounted.
*/}}
{{- define "lade.unpack" -}}
{{- $unpack := .Values.containerd.unpack | default "agent" }}
{{- if not (has $unpack (list "agent" "containerd")) }}
{{- fail (printf "containerd.unpack must be agent or containerd, not %q" $unpack) }}
{{- end }}
{{- if and (eq $unpack "agent") (not .Values.containerd.root) }}
{{- fail "containerd.unpack=agent needs containerd.root: the agent writes the snapshots under it" }}
{{- end }}
{{- $unpack }}
{{- end }}
