{{/*
The services' ports: their flags' defaults and the images' EXPOSE lines (deploy/docker). Used as
`$ports := include "gharial.ports" . | fromYaml`.
*/}}
{{- define "gharial.ports" -}}
gateway: 3030
emulator: 50051
emulatorMetrics: 9091
compiler: 50052
compilerMetrics: 9092
license: 50053
licenseMetrics: 9093
transcriber: 50054
transcriberMetrics: 9094
redis: 6379
{{- end -}}

{{/* Each service's settings (its ConfigMap's data; pods carry their checksum to roll on changes). */}}
{{- define "gharial.gateway.settings" -}}
{{- $ports := include "gharial.ports" . | fromYaml -}}
{{- $chart := dict "host" "0.0.0.0" "port" $ports.gateway "default-model" .Values.model.id "log-level" .Values.logLevel -}}
{{- if not .Values.redis.urlSecret.name -}}
{{- $_ := set $chart "redis-url" (include "gharial.redisUrl" .) -}}
{{- end -}}
{{- if .Values.gateway.apiKeys.secretName -}}
{{- $_ := set $chart "api-keys-file" (printf "/etc/gharial/api-keys/%s" .Values.gateway.apiKeys.key) -}}
{{- end -}}
{{- include "gharial.settingsData" (dict "prefix" "GHARIAL_GATEWAY_" "chart" $chart "settings" .Values.gateway.settings) -}}
{{- end -}}

{{- define "gharial.transcriber.settings" -}}
{{- $ports := include "gharial.ports" . | fromYaml -}}
{{- $chart := dict "host" "0.0.0.0" "port" $ports.transcriber "metrics-port" $ports.transcriberMetrics "model-id" .Values.model.id "log-level" .Values.logLevel -}}
{{- if not .Values.redis.urlSecret.name -}}
{{- $_ := set $chart "redis-url" (include "gharial.redisUrl" .) -}}
{{- end -}}
{{- if eq .Values.backend "cpu" -}}
{{- $_ := set $chart "cpu-backend" true -}}
{{- $_ := set $chart "checkpoint" .Values.model.checkpoint -}}
{{- else -}}
{{- $_ := set $chart "emulator" (printf "127.0.0.1:%v" $ports.emulator) -}}
{{- $_ := set $chart "program" "/program/model.prog" -}}
{{- $_ := set $chart "license-service" (printf "%s-license:%v" (include "gharial.fullname" .) $ports.license) -}}
{{- end -}}
{{- include "gharial.settingsData" (dict "prefix" "GHARIAL_TRANSCRIBER_" "chart" $chart "settings" .Values.transcriber.settings) -}}
{{- end -}}

{{- define "gharial.emulator.settings" -}}
{{- $ports := include "gharial.ports" . | fromYaml -}}
{{- $chart := dict "host" "0.0.0.0" "port" $ports.emulator "metrics-port" $ports.emulatorMetrics "log-level" .Values.logLevel -}}
{{- include "gharial.settingsData" (dict "prefix" "GHARIAL_EMULATOR_" "chart" $chart "settings" .Values.emulator.settings) -}}
{{- end -}}

{{- define "gharial.compiler.settings" -}}
{{- $ports := include "gharial.ports" . | fromYaml -}}
{{- $chart := dict "host" "0.0.0.0" "port" $ports.compiler "metrics-port" $ports.compilerMetrics "log-level" .Values.logLevel -}}
{{- include "gharial.settingsData" (dict "prefix" "GHARIAL_COMPILER_" "chart" $chart "settings" .Values.compiler.settings) -}}
{{- end -}}

{{- define "gharial.license.settings" -}}
{{- $ports := include "gharial.ports" . | fromYaml -}}
{{- $chart := dict "host" "0.0.0.0" "port" $ports.license "metrics-port" $ports.licenseMetrics "license-dir" "/licences" "log-level" .Values.logLevel -}}
{{- include "gharial.settingsData" (dict "prefix" "GHARIAL_LICENSE_" "chart" $chart "settings" .Values.license.settings) -}}
{{- end -}}
