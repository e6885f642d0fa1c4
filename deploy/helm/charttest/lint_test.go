package charttest

import (
	"path/filepath"
	"testing"

	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
)

// TestChartLint runs `helm lint`'s checks (Helm's Go library) on the chart
// with each good values file: no error and no warning.
func TestChartLint(t *testing.T) {
	for _, f := range []string{"minimal.yaml", "fleet.yaml", "cpu.yaml", "loopback.yaml"} {
		t.Run(f, func(t *testing.T) {
			vals, err := chartutil.ReadValuesFile(filepath.Join("testdata", f))
			if err != nil {
				t.Fatal(err)
			}
			kv := &chartutil.KubeVersion{Version: "v1.31.0", Major: "1", Minor: "31"}
			l := lint.AllWithKubeVersion(chartDir, vals, namespace, kv)
			for _, m := range l.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				} else {
					t.Logf("helm lint: %s", m)
				}
			}
		})
	}
}
