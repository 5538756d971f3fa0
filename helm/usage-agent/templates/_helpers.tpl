{{- define "usage-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* At most 52 characters: pod names add an ordinal, revision labels a hash. */}}
{{- define "usage-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "usage-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usage-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "usage-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "usage-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "usage-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "usage-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the credentials, or nothing when there are none. */}}
{{- define "usage-agent.credentialsSecret" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.values -}}
{{- printf "%s-credentials" (include "usage-agent.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "usage-agent.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The agent's config: the values' `config` with the spool on the pod's volume and the
endpoints on metrics.port. JSON (which is YAML) because toYaml turns large integers
such as spool.max_records into 1e+06.
*/}}
{{- define "usage-agent.config" -}}
{{- if hasKey (default (dict) .Values.config.spool) "path" -}}
{{- fail "config.spool.path is set by the chart (the pod's spool volume): leave it out" -}}
{{- end -}}
{{- if hasKey .Values.config "server" -}}
{{- fail "config.server is set by the chart (listen on metrics.port): leave it out" -}}
{{- end -}}
{{- if not .Values.credentials.existingSecret -}}
{{- $missing := list -}}
{{- range splitList " " (include "usage-agent.credentialKeys" .) -}}
{{- if and . (not (hasKey (default (dict) $.Values.credentials.values) .)) -}}
{{- $missing = append $missing . -}}
{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "config reads %s (as ${VAR} or /run/secrets/usage-agent/<key>), which neither credentials.values nor env sets: add it there, or name a Secret holding it in credentials.existingSecret; without it the pods would exit 2" (join ", " $missing)) -}}
{{- end -}}
{{- end -}}
{{- $config := deepCopy .Values.config -}}
{{- $spool := deepCopy (default (dict) $config.spool) -}}
{{- $_ := set $spool "path" "/var/lib/usage-agent/spool.db" -}}
{{- $_ := set $config "spool" $spool -}}
{{- $_ := set $config "server" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- toPrettyJson $config -}}
{{- end -}}

{{/*
The credential keys the config reads, space-separated and sorted: its ${VAR}s that `env`
does not set ($$ is a literal $), and the files it names under /run/secrets/usage-agent/.
*/}}
{{- define "usage-agent.credentialKeys" -}}
{{- $text := toJson .Values.config | replace "$$" "" -}}
{{- $env := list -}}
{{- range .Values.env -}}
{{- $env = append $env .name -}}
{{- end -}}
{{- $keys := list -}}
{{- range regexFindAll "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" $text -1 -}}
{{- $name := trimSuffix "}" (trimPrefix "${" .) -}}
{{- if not (has $name $env) -}}
{{- $keys = append $keys $name -}}
{{- end -}}
{{- end -}}
{{- range regexFindAll "/run/secrets/usage-agent/[-._A-Za-z0-9]+" $text -1 -}}
{{- $keys = append $keys (trimPrefix "/run/secrets/usage-agent/" .) -}}
{{- end -}}
{{- $keys | uniq | sortAlpha | join " " -}}
{{- end -}}

{{/*
What the config reads of this cluster's API through the pod's own service account, as JSON
{"inCluster": bool, "all": bool, "namespaces": [...], "eks": [...]}: a kubernetes_pod (k8spod)
measurement with neither kubernetes.kubeconfig nor kubernetes.eks_cluster does; "all" when one
of them lists every namespace. "eks": the EKS clusters read through a measurement's AWS role.
*/}}
{{- define "usage-agent.kubernetesReads" -}}
{{- $reads := dict "inCluster" false "all" false "namespaces" (list) "eks" (list) -}}
{{- range .Values.config.measurements -}}
{{- if has (default (get . "resourceType") (get . "resource_type")) (list "kubernetes_pod" "k8spod") -}}
{{- $kube := default (dict) (get . "kubernetes") -}}
{{- if get $kube "eks_cluster" -}}
{{- $_ := set $reads "eks" (append $reads.eks (get $kube "eks_cluster") | uniq | sortAlpha) -}}
{{- end -}}
{{- if not (or (get $kube "kubeconfig") (get $kube "eks_cluster")) -}}
{{- $_ := set $reads "inCluster" true -}}
{{- if get $kube "namespaces" -}}
{{- $_ := set $reads "namespaces" (concat $reads.namespaces (get $kube "namespaces") | uniq | sortAlpha) -}}
{{- else -}}
{{- $_ := set $reads "all" true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $reads -}}
{{- end -}}

{{/* What the agent reads: pods to meter, namespaces for their labels (customer attribution). */}}
{{- define "usage-agent.rbacRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
{{- if .namespaced }}
  # a Role can grant only its own namespace object, and only get
  verbs: [get]
{{- else }}
  verbs: [get, list, watch]
{{- end }}
{{- end -}}
