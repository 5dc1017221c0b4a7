{{/* Labels every object carries; the selector stays upstream's (k8s-app), so this Deployment can replace upstream's in place. */}}
{{- define "ckc.labels" -}}
k8s-app: {{ include "ckc.name" . }}
app.kubernetes.io/name: calico-kube-controllers
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ckc.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "ckc.etcd" -}}
{{- if eq .Values.datastore "etcdv3" }}true{{ else if eq .Values.datastore "kubernetes" }}{{ else }}{{ fail (printf "datastore must be kubernetes or etcdv3, not %q" .Values.datastore) }}{{ end -}}
{{- end -}}

{{- define "ckc.enabledControllers" -}}
{{- if .Values.enabledControllers -}}
{{ .Values.enabledControllers }}
{{- else if include "ckc.etcd" . -}}
policy,namespace,serviceaccount,workloadendpoint,node,loadbalancer
{{- else -}}
node,loadbalancer
{{- end -}}
{{- end -}}

{{/* The grace period the alerts assume: the value given, else the configuration's default (15 m). */}}
{{- define "ckc.graceSeconds" -}}
{{- if kindIs "invalid" .Values.gc.leakGracePeriodSeconds }}900{{ else }}{{ int .Values.gc.leakGracePeriodSeconds }}{{ end -}}
{{- end -}}

{{/* The etcd settings as upstream's calico-etcd.yaml passes them (also used by the leak scan). */}}
{{- define "ckc.etcdEnv" -}}
- name: DATASTORE_TYPE
  value: etcdv3
- name: ETCD_ENDPOINTS
  valueFrom:
    configMapKeyRef:
      name: {{ .Values.etcd.configMapName }}
      key: etcd_endpoints
- name: ETCD_CA_CERT_FILE
  valueFrom:
    configMapKeyRef:
      name: {{ .Values.etcd.configMapName }}
      key: etcd_ca
- name: ETCD_KEY_FILE
  valueFrom:
    configMapKeyRef:
      name: {{ .Values.etcd.configMapName }}
      key: etcd_key
- name: ETCD_CERT_FILE
  valueFrom:
    configMapKeyRef:
      name: {{ .Values.etcd.configMapName }}
      key: etcd_cert
{{- end -}}

{{- define "ckc.etcdVolume" -}}
- name: etcd-certs
  secret:
    secretName: {{ .Values.etcd.secretName }}
    defaultMode: 288  # 0440; decimal, since YAML 1.1 and 1.2 read a leading 0 differently
{{- end -}}

{{- define "ckc.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 0
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "ckc.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 0
fsGroup: 0
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The name of every object and the k8s-app label: upstream's, so the chart replaces upstream's
Deployment in place; another (e.g. calico-kube-controllers-dryrun) to run beside it. */}}
{{- define "ckc.name" -}}
{{ default "calico-kube-controllers" .Values.name }}
{{- end -}}
