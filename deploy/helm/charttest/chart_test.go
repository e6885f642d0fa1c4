// Package charttest renders deploy/helm/arenahost with Helm's Go library
// for the values files under testdata/, decodes every manifest strictly
// into the Kubernetes API types (an unknown field fails), and checks what
// the chart promises: one GPU per pod, probes on /v1/health, the token from
// a Secret, a read-only model volume, a Service per model group, a
// ServiceMonitor for /metrics, a NetworkPolicy admitting only the UI's
// namespace, memory requests matching the arena, a draining preStop, and a
// non-root, read-only, unprivileged container. It also checks the image
// recipe, deploy/image/Containerfile, against its checklist. It is its own
// Go module, so Helm and the Kubernetes types stay out of arenahost's
// go.mod; `make test-deploy` runs it.
package charttest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

const (
	chartDir  = "../arenahost"
	release   = "ah"
	namespace = "gpu"
)

// serviceMonitor is the part of prometheus-operator's ServiceMonitor
// (monitoring.coreos.com/v1) the chart writes, decoded as strictly as the
// k8s.io/api types: that type lives in prometheus-operator's module, which
// this test does not pull in for one struct.
type serviceMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// rendered is one render's manifests, by kind.
type rendered struct {
	deployments     []appsv1.Deployment
	services        []corev1.Service
	secrets         []corev1.Secret
	networkPolicies []networkingv1.NetworkPolicy
	serviceMonitors []serviceMonitor
}

func render(t *testing.T, valuesFile string) (*rendered, error) {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	vals, err := chartutil.ReadValuesFile(filepath.Join("testdata", valuesFile))
	if err != nil {
		t.Fatalf("values %s: %v", valuesFile, err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = chartutil.KubeVersion{Version: "v1.31.0", Major: "1", Minor: "31"}
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: release, Namespace: namespace, IsInstall: true, Revision: 1}, caps)
	if err != nil {
		t.Fatalf("render values: %v", err)
	}
	files, err := engine.Engine{Strict: true}.Render(ch, rv)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	r := &rendered{}
	for _, n := range names {
		if strings.HasSuffix(n, ".tpl") || strings.HasSuffix(n, "NOTES.txt") {
			continue
		}
		for i, doc := range splitDocs(files[n]) {
			if err := r.add(doc); err != nil {
				t.Fatalf("%s document %d: %v\n%s", n, i, err, doc)
			}
		}
	}
	return r, nil
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

func splitDocs(s string) []string {
	var out []string
	for _, d := range docSep.Split(s, -1) {
		if strings.TrimSpace(stripComments(d)) != "" {
			out = append(out, d)
		}
	}
	return out
}

func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// strict decodes YAML into v, failing on a field v's type does not have.
func strict(doc string, v any) error {
	j, err := yaml.YAMLToJSON([]byte(doc))
	if err != nil {
		return fmt.Errorf("yaml: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("strict decode into %T: %w", v, err)
	}
	return nil
}

func (r *rendered) add(doc string) error {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
		return err
	}
	switch head.APIVersion + " " + head.Kind {
	case "apps/v1 Deployment":
		var d appsv1.Deployment
		if err := strict(doc, &d); err != nil {
			return err
		}
		r.deployments = append(r.deployments, d)
	case "v1 Service":
		var s corev1.Service
		if err := strict(doc, &s); err != nil {
			return err
		}
		r.services = append(r.services, s)
	case "v1 Secret":
		var s corev1.Secret
		if err := strict(doc, &s); err != nil {
			return err
		}
		r.secrets = append(r.secrets, s)
	case "networking.k8s.io/v1 NetworkPolicy":
		var p networkingv1.NetworkPolicy
		if err := strict(doc, &p); err != nil {
			return err
		}
		r.networkPolicies = append(r.networkPolicies, p)
	case "monitoring.coreos.com/v1 ServiceMonitor":
		var m serviceMonitor
		if err := strict(doc, &m); err != nil {
			return err
		}
		r.serviceMonitors = append(r.serviceMonitors, m)
	default:
		return fmt.Errorf("unexpected manifest %s %s (the test knows every kind the chart renders)", head.APIVersion, head.Kind)
	}
	return nil
}

// group is what a values file says about one model group.
type group struct {
	name      string
	replicas  int32
	gpu       bool
	memoryGiB int64 // the pod's memory request and limit
	arenaGiB  int
	models    string // ARENAHOST_FLEET_MODELS
}

func TestChartRenders(t *testing.T) {
	tests := []struct {
		values        string
		groups        []group
		secret        string // the Secret the token comes from ("" = no token)
		secretKey     string
		chartSecret   bool // the chart renders that Secret
		claim         string
		uiNamespace   string
		monitor       bool
		drainSeconds  int64
		listen        string
		wantGPUMemMiB string // node affinity on nvidia.com/gpu.memory of the first group ("" = none)
	}{
		{values: "minimal.yaml", groups: []group{{name: "flux", replicas: 1, gpu: true, memoryGiB: 8, arenaGiB: 16}},
			secret: "arenahost-token", secretKey: "token", uiNamespace: "ui", monitor: true, drainSeconds: 600, listen: "0.0.0.0:7860", wantGPUMemMiB: "16383"},
		{values: "fleet.yaml", groups: []group{
			{name: "flux-dev", replicas: 4, gpu: true, memoryGiB: 12, arenaGiB: 24, models: "flux1-dev-nf4.safetensors"},
			{name: "flux-schnell", replicas: 2, gpu: true, memoryGiB: 12, arenaGiB: 40, models: "schnell/flux1-schnell-nf4.safetensors"},
		}, secret: release + "-token", secretKey: "token", chartSecret: true, claim: "arenahost-models", uiNamespace: "comfy", monitor: true,
			drainSeconds: 900, listen: "0.0.0.0:7860", wantGPUMemMiB: "24575"},
		{values: "cpu.yaml", groups: []group{{name: "cpu-dev", replicas: 1, gpu: false, memoryGiB: 2 + 4, arenaGiB: 4}},
			secret: "tok", secretKey: "bearer", uiNamespace: "ui", monitor: false, drainSeconds: 600, listen: "0.0.0.0:7860"},
		{values: "loopback.yaml", groups: []group{{name: "solo", replicas: 1, gpu: true, memoryGiB: 8, arenaGiB: 16}},
			uiNamespace: "ui", monitor: true, drainSeconds: 600, listen: "127.0.0.1:7860", wantGPUMemMiB: "16383"},
	}
	for _, tt := range tests {
		t.Run(tt.values, func(t *testing.T) {
			r, err := render(t, tt.values)
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			if len(r.deployments) != len(tt.groups) || len(r.services) != len(tt.groups) {
				t.Fatalf("%d Deployments and %d Services, want one of each per group (%d)", len(r.deployments), len(r.services), len(tt.groups))
			}
			for i, g := range tt.groups {
				checkDeployment(t, r.deployments[i], g, tt.secret, tt.secretKey, tt.claim, tt.drainSeconds, tt.listen, i == 0 && tt.wantGPUMemMiB != "", tt.wantGPUMemMiB)
				checkService(t, r.services[i], r.deployments[i], g)
			}
			if tt.chartSecret {
				if len(r.secrets) != 1 || r.secrets[0].Name != tt.secret || len(r.secrets[0].Data[tt.secretKey]) == 0 {
					t.Fatalf("want the chart's Secret %s with key %s, got %+v", tt.secret, tt.secretKey, r.secrets)
				}
			} else if len(r.secrets) != 0 {
				t.Fatalf("the chart rendered a Secret without token.value: %+v", r.secrets)
			}
			checkNetworkPolicy(t, r.networkPolicies, tt.uiNamespace, tt.monitor)
			if !tt.monitor {
				if len(r.serviceMonitors) != 0 {
					t.Fatal("ServiceMonitor rendered though disabled")
				}
				return
			}
			if len(r.serviceMonitors) != 1 {
				t.Fatalf("%d ServiceMonitors, want 1", len(r.serviceMonitors))
			}
			sm := r.serviceMonitors[0]
			if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Path != "/metrics" || sm.Spec.Endpoints[0].Port != "http" {
				t.Fatalf("ServiceMonitor endpoints %+v, want port http path /metrics", sm.Spec.Endpoints)
			}
			for _, s := range r.services {
				if !subset(sm.Spec.Selector.MatchLabels, s.Labels) {
					t.Fatalf("ServiceMonitor selector %v misses Service %s (labels %v)", sm.Spec.Selector.MatchLabels, s.Name, s.Labels)
				}
			}
		})
	}
}

func env(c corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

func checkDeployment(t *testing.T, d appsv1.Deployment, g group, secret, key, claim string, drain int64, listen string, wantAffinity bool, gpuMemMiB string) {
	t.Helper()
	where := "Deployment " + d.Name
	if d.Name != release+"-"+g.name {
		t.Errorf("%s: want name %s-%s", where, release, g.name)
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != g.replicas {
		t.Errorf("%s: replicas %v, want %d", where, d.Spec.Replicas, g.replicas)
	}
	if !subset(d.Spec.Selector.MatchLabels, d.Spec.Template.Labels) {
		t.Errorf("%s: selector %v does not match the pod labels %v", where, d.Spec.Selector.MatchLabels, d.Spec.Template.Labels)
	}
	ps := d.Spec.Template.Spec
	if ps.SecurityContext == nil || ps.SecurityContext.RunAsNonRoot == nil || !*ps.SecurityContext.RunAsNonRoot ||
		ps.SecurityContext.RunAsUser == nil || *ps.SecurityContext.RunAsUser == 0 {
		t.Errorf("%s: pod securityContext %+v, want runAsNonRoot and a non-zero runAsUser", where, ps.SecurityContext)
	}
	if ps.HostNetwork || ps.HostPID || ps.HostIPC {
		t.Errorf("%s: pod shares a host namespace", where)
	}
	if ps.TerminationGracePeriodSeconds == nil || *ps.TerminationGracePeriodSeconds <= drain {
		t.Errorf("%s: terminationGracePeriodSeconds %v, want more than the drain bound %d", where, ps.TerminationGracePeriodSeconds, drain)
	}
	if len(ps.Containers) != 1 || len(ps.InitContainers) != 0 {
		t.Fatalf("%s: %d containers, %d init containers; want one container", where, len(ps.Containers), len(ps.InitContainers))
	}
	c := ps.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 ||
		sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) != 0 {
		t.Errorf("%s: container securityContext %+v, want unprivileged, no escalation, read-only root, drop ALL", where, sc)
	}
	if sc != nil && ((sc.RunAsUser != nil && *sc.RunAsUser == 0) || (sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot) || (sc.RunAsGroup != nil && *sc.RunAsGroup == 0)) {
		t.Errorf("%s: the container overrides the pod's non-root user: %+v", where, sc)
	}
	// GPU: exactly one per pod on the cuda backend, none otherwise.
	gpu := corev1.ResourceName("nvidia.com/gpu")
	lim, hasLim := c.Resources.Limits[gpu]
	req, hasReq := c.Resources.Requests[gpu]
	if g.gpu && (!hasLim || !hasReq || lim.Value() != 1 || req.Value() != 1) {
		t.Errorf("%s: nvidia.com/gpu limit %v request %v, want 1 and 1", where, lim.String(), req.String())
	}
	if !g.gpu && (hasLim || hasReq) {
		t.Errorf("%s: a %s group asks for a GPU", where, "cpu")
	}
	wantMem := resource.MustParse(fmt.Sprintf("%dGi", g.memoryGiB))
	if m := c.Resources.Requests[corev1.ResourceMemory]; m.Cmp(wantMem) != 0 {
		t.Errorf("%s: memory request %s, want %s", where, m.String(), wantMem.String())
	}
	if m := c.Resources.Limits[corev1.ResourceMemory]; m.Cmp(wantMem) != 0 {
		t.Errorf("%s: memory limit %s, want %s", where, m.String(), wantMem.String())
	}
	if e := env(c, "ARENAHOST_ARENA_CAPACITY"); e == nil || e.Value != fmt.Sprintf("%dGiB", g.arenaGiB) {
		t.Errorf("%s: ARENAHOST_ARENA_CAPACITY %+v, want %dGiB", where, e, g.arenaGiB)
	}
	if e := env(c, "ARENAHOST_ARENA_DEVICE"); e == nil || e.Value != "0" {
		t.Errorf("%s: ARENAHOST_ARENA_DEVICE %+v, want 0 (the pod's one GPU)", where, e)
	}
	if e := env(c, "ARENAHOST_LISTEN"); e == nil || e.Value != listen {
		t.Errorf("%s: ARENAHOST_LISTEN %+v, want %s", where, e, listen)
	}
	if e := env(c, "ARENAHOST_FLEET_MODELS"); e == nil || e.Value != g.models {
		t.Errorf("%s: ARENAHOST_FLEET_MODELS %+v, want %q", where, e, g.models)
	}
	// The token: from the Secret, never a literal.
	tok := env(c, "ARENAHOST_TOKEN")
	switch {
	case secret == "" && tok != nil:
		t.Errorf("%s: ARENAHOST_TOKEN set without a Secret: %+v", where, tok)
	case secret != "" && (tok == nil || tok.Value != "" || tok.ValueFrom == nil || tok.ValueFrom.SecretKeyRef == nil ||
		tok.ValueFrom.SecretKeyRef.Name != secret || tok.ValueFrom.SecretKeyRef.Key != key):
		t.Errorf("%s: ARENAHOST_TOKEN %+v, want secretKeyRef %s/%s", where, tok, secret, key)
	}
	// Probes: all three on GET /v1/health of the named port.
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe, "startup": c.StartupProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/v1/health" || p.HTTPGet.Port.String() != "http" {
			t.Errorf("%s: %s probe %+v, want httpGet /v1/health on port http", where, name, p)
		}
	}
	if len(c.Ports) != 1 || c.Ports[0].Name != "http" {
		t.Errorf("%s: ports %+v, want one named http", where, c.Ports)
	}
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Exec == nil ||
		strings.Join(c.Lifecycle.PreStop.Exec.Command, " ") != "arenahost-fleet drain" {
		t.Errorf("%s: preStop %+v, want exec arenahost-fleet drain", where, c.Lifecycle)
	}
	if e := env(c, "ARENAHOST_FLEET_DRAIN_SECONDS"); e == nil || e.Value != fmt.Sprint(drain) {
		t.Errorf("%s: ARENAHOST_FLEET_DRAIN_SECONDS %+v, want %d", where, e, drain)
	}
	// Volumes: every writable path is a volume (the root is read-only);
	// the models claim is mounted read-only.
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for _, p := range []string{"/data", "/tmp"} {
		if _, ok := mounts[p]; !ok {
			t.Errorf("%s: no volume at %s (the root filesystem is read-only)", where, p)
		}
	}
	var pvc *corev1.PersistentVolumeClaimVolumeSource
	for _, v := range ps.Volumes {
		if v.PersistentVolumeClaim != nil {
			pvc = v.PersistentVolumeClaim
			if m, ok := mounts["/models"]; !ok || m.Name != v.Name || !m.ReadOnly {
				t.Errorf("%s: claim %s not mounted read-only at /models", where, pvc.ClaimName)
			}
		}
		if v.HostPath != nil {
			t.Errorf("%s: hostPath volume %s", where, v.Name)
		}
	}
	switch {
	case claim == "" && pvc != nil:
		t.Errorf("%s: a claim without storage.existingClaim", where)
	case claim != "" && (pvc == nil || pvc.ClaimName != claim || !pvc.ReadOnly):
		t.Errorf("%s: claim %+v, want %s read-only", where, pvc, claim)
	}
	if claim != "" {
		if e := env(c, "ARENAHOST_SAMPLES"); e == nil || e.Value != "false" {
			t.Errorf("%s: samples on over a read-only models volume", where)
		}
	}
	// Placement on a GPU whose memory holds the arena.
	var aff string
	if a := ps.Affinity; a != nil && a.NodeAffinity != nil && a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
			for _, e := range term.MatchExpressions {
				if e.Key == "nvidia.com/gpu.memory" && e.Operator == corev1.NodeSelectorOpGt && len(e.Values) == 1 {
					aff = e.Values[0]
				}
			}
		}
	}
	if wantAffinity && aff != gpuMemMiB {
		t.Errorf("%s: nvidia.com/gpu.memory affinity %q, want Gt %s", where, aff, gpuMemMiB)
	}
	if !g.gpu && aff != "" {
		t.Errorf("%s: GPU memory affinity on a cpu group", where)
	}
}

func checkService(t *testing.T, s corev1.Service, d appsv1.Deployment, g group) {
	t.Helper()
	if s.Name != d.Name {
		t.Errorf("Service %s: want the group's name %s", s.Name, d.Name)
	}
	if len(s.Spec.Selector) == 0 || !subset(s.Spec.Selector, d.Spec.Template.Labels) {
		t.Errorf("Service %s: selector %v does not select group %s's pods %v", s.Name, s.Spec.Selector, g.name, d.Spec.Template.Labels)
	}
	if len(s.Spec.Ports) != 1 || s.Spec.Ports[0].TargetPort.String() != "http" {
		t.Errorf("Service %s: ports %+v, want one to target port http", s.Name, s.Spec.Ports)
	}
}

func checkNetworkPolicy(t *testing.T, nps []networkingv1.NetworkPolicy, ui string, monitor bool) {
	t.Helper()
	if len(nps) != 1 {
		t.Fatalf("%d NetworkPolicies, want 1", len(nps))
	}
	np := nps[0]
	if len(np.Spec.PolicyTypes) != 1 || np.Spec.PolicyTypes[0] != networkingv1.PolicyTypeIngress {
		t.Errorf("NetworkPolicy policyTypes %v, want [Ingress]", np.Spec.PolicyTypes)
	}
	want := []string{ui}
	if monitor {
		want = append(want, "monitoring")
	}
	var got []string
	for _, rule := range np.Spec.Ingress {
		for _, peer := range rule.From {
			if peer.IPBlock != nil || peer.PodSelector != nil || peer.NamespaceSelector == nil || len(peer.NamespaceSelector.MatchExpressions) != 0 {
				t.Errorf("NetworkPolicy peer %+v admits more than a namespace by name", peer)
				continue
			}
			got = append(got, peer.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"])
		}
		if len(rule.From) == 0 {
			t.Errorf("NetworkPolicy rule %+v admits every source", rule)
		}
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("NetworkPolicy admits namespaces %v, want %v", got, want)
	}
}

func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// TestChartRefuses: values the hosts cannot run with fail the render with
// an error naming the value.
func TestChartRefuses(t *testing.T) {
	tests := []struct{ values, want string }{
		{"bad-no-token.yaml", `token: listen "0.0.0.0:7860" is not loopback, so the hosts need a token`},
		{"bad-no-ui.yaml", "ui.namespace: name the namespace of the UI"},
		{"bad-group-name.yaml", `groups[0].name: "Flux_Dev" must be a DNS label`},
		{"bad-model-path.yaml", `groups[0] (flux).models: "../etc/passwd" must be a path inside the models directory`},
		{"bad-models-no-claim.yaml", "groups[0] (flux).models: models need storage.existingClaim"},
		{"bad-backend.yaml", `groups[0] (flux).arenaBackend: "rocm" is not cuda, cpu or cuda-sim`},
		{"bad-duplicate.yaml", `groups[1].name: "flux" is used twice`},
		{"bad-port.yaml", `port: 7860 differs from the port of listen "0.0.0.0:8000"`},
	}
	for _, tt := range tests {
		t.Run(tt.values, func(t *testing.T) {
			_, err := render(t, tt.values)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("render error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
