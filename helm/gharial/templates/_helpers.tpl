{{/* Names: "<release>" when the release name contains the chart name, else "<release>-gharial". */}}
{{- define "gharial.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gharial.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gharial.labels" -}}
{{ include "gharial.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "gharial.componentLabels" -}}
{{ include "gharial.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gharial.componentSelector" -}}
{{ include "gharial.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gharial.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gharial.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.gateway.image). */}}
{{- define "gharial.image" -}}
{{- $registry := .root.Values.image.registry -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Every container runs as the images' user 10001 with nothing it does not need; /tmp is an emptyDir. */}}
{{- define "gharial.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gharial.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod spec fields every component shares: (dict "root" $ "values" .Values.gateway). */}}
{{- define "gharial.podCommon" -}}
serviceAccountName: {{ include "gharial.serviceAccountName" .root }}
automountServiceAccountToken: false
securityContext:
  {{- include "gharial.podSecurityContext" . | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Prometheus annotations: (dict "root" $ "port" 9092). */}}
{{- define "gharial.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/*
A service's GHARIAL_<SERVICE>_<FLAG> variables as ConfigMap data: (dict "prefix" "GHARIAL_GATEWAY_"
"chart" (dict "port" 3030 ...) "settings" .Values.gateway.settings). Flags are the services' own
(`max-streams` -> GHARIAL_TRANSCRIBER_MAX_STREAMS); the chart's own keys win over settings.
*/}}
{{- define "gharial.settingsData" -}}
{{- $all := merge (deepCopy .chart) (deepCopy (.settings | default dict)) -}}
{{- range $flag := keys $all | sortAlpha }}
{{- $value := get $all $flag }}
{{- /* values.yaml numbers arrive as float64: write whole ones as integers, not 1.048576e+06 */}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}{{ $value = int64 $value }}{{ end }}
{{ printf "%s%s" $.prefix ($flag | replace "-" "_" | upper) }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}

{{- define "gharial.builtinRedis" -}}
{{- if not (or .Values.redis.url .Values.redis.urlSecret.name) -}}true{{- end -}}
{{- end -}}

{{- define "gharial.redisUrl" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else -}}
{{- printf "redis://%s-redis:6379/0" (include "gharial.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Redis URL as an env entry when it lives in a Secret: (dict "root" $ "name" "GHARIAL_GATEWAY_REDIS_URL"). */}}
{{- define "gharial.redisUrlSecretEnv" -}}
{{- with .root.Values.redis.urlSecret.name -}}
- name: {{ $.name }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.root.Values.redis.urlSecret.key }}
{{- end -}}
{{- end -}}

{{- define "gharial.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "gharial.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}
