{{/* Names: RELEASE-GROUP, cut to 63 characters. */}}
{{- define "arenahost.groupName" -}}
{{- printf "%s-%s" .root.Release.Name .group.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "arenahost.labels" -}}
app.kubernetes.io/name: arenahost
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "arenahost.selector" -}}
app.kubernetes.io/name: arenahost
app.kubernetes.io/instance: {{ .root.Release.Name }}
arenahost.io/group: {{ .group.name }}
{{- end -}}

{{/* The Secret holding the token: the operator's, or the chart's. */}}
{{- define "arenahost.tokenSecret" -}}
{{- if .Values.token.existingSecret -}}
{{- .Values.token.existingSecret -}}
{{- else -}}
{{- printf "%s-token" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* true when listen is a loopback address (127.x, localhost, [::1]). */}}
{{- define "arenahost.loopback" -}}
{{- $l := toString .Values.listen -}}
{{- if or (hasPrefix "127." $l) (hasPrefix "localhost:" $l) (hasPrefix "[::1]:" $l) -}}true{{- end -}}
{{- end -}}

{{/*
Checks every value the templates rely on, failing the render with the
value's name: a mistake stops at `helm install`, not in a crash loop.
*/}}
{{- define "arenahost.validate" -}}
{{- if not (regexMatch "^([0-9.]+|localhost|\\[[0-9a-fA-F:]+\\])?:[0-9]+$" (toString .Values.listen)) -}}
{{- fail (printf "listen: %q is not HOST:PORT" (toString .Values.listen)) -}}
{{- end -}}
{{- if ne (last (splitList ":" (toString .Values.listen))) (toString (int .Values.port)) -}}
{{- fail (printf "port: %v differs from the port of listen %q (the probes, the Service and the host must agree)" .Values.port (toString .Values.listen)) -}}
{{- end -}}
{{- if not (include "arenahost.loopback" .) -}}
{{- if and (not .Values.token.existingSecret) (not .Values.token.value) -}}
{{- fail (printf "token: listen %q is not loopback, so the hosts need a token: set token.existingSecret (a Secret with key %q) or token.value" (toString .Values.listen) .Values.token.key) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.ui.namespace -}}
{{- fail "ui.namespace: name the namespace of the UI whose pods may reach the hosts (the NetworkPolicy admits only it)" -}}
{{- end -}}
{{- if not (kindIs "slice" .Values.groups) -}}
{{- fail "groups: want a list of model groups" -}}
{{- end -}}
{{- if eq (len .Values.groups) 0 -}}
{{- fail "groups: empty; name at least one model group" -}}
{{- end -}}
{{- if lt (int .Values.drainSeconds) 0 -}}
{{- fail (printf "drainSeconds: %v must be >= 0" .Values.drainSeconds) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $g := .Values.groups -}}
{{- $c := mergeOverwrite (deepCopy $.Values.defaults) $g -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$" (toString $c.name)) -}}
{{- fail (printf "groups[%d].name: %q must be a DNS label of at most 32 characters (a-z, 0-9, -)" $i (toString $c.name)) -}}
{{- end -}}
{{- if hasKey $seen $c.name -}}
{{- fail (printf "groups[%d].name: %q is used twice" $i $c.name) -}}
{{- end -}}
{{- $_ := set $seen $c.name true -}}
{{- if not (has (toString $c.arenaBackend) (list "cuda" "cpu" "cuda-sim")) -}}
{{- fail (printf "groups[%d] (%s).arenaBackend: %q is not cuda, cpu or cuda-sim" $i $c.name (toString $c.arenaBackend)) -}}
{{- end -}}
{{- if or (lt (int $c.arenaCapacityGiB) 1) (gt (int $c.arenaCapacityGiB) 1024) -}}
{{- fail (printf "groups[%d] (%s).arenaCapacityGiB: %v must be a whole number in 1..1024" $i $c.name $c.arenaCapacityGiB) -}}
{{- end -}}
{{- if or (lt (int $c.hostMemoryGiB) 1) (gt (int $c.hostMemoryGiB) 1024) -}}
{{- fail (printf "groups[%d] (%s).hostMemoryGiB: %v must be a whole number in 1..1024" $i $c.name $c.hostMemoryGiB) -}}
{{- end -}}
{{- if lt (int $c.replicas) 0 -}}
{{- fail (printf "groups[%d] (%s).replicas: %v must be >= 0" $i $c.name $c.replicas) -}}
{{- end -}}
{{- range $m := $c.models -}}
{{- if or (not (regexMatch "^[A-Za-z0-9_][A-Za-z0-9_./-]*$" (toString $m))) (contains ".." (toString $m)) -}}
{{- fail (printf "groups[%d] (%s).models: %q must be a path inside the models directory (no .., no leading /)" $i $c.name (toString $m)) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (len $c.models) 0) (not $.Values.storage.existingClaim) -}}
{{- fail (printf "groups[%d] (%s).models: models need storage.existingClaim (the volume holding them)" $i $c.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
