package render

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

type fixtureTable struct {
	Rows [][3]float64 `json:"rows"`
	Bias [3]float64   `json:"bias"`
}

func loadFixture(t *testing.T) map[Family]fixtureTable {
	t.Helper()
	b, err := os.ReadFile("testdata/factors.json")
	if err != nil {
		t.Fatal(err)
	}
	var m map[Family]fixtureTable
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("testdata/factors.json: %v", err)
	}
	return m
}

// The full tables against the fixture extracted from the published source.
func TestFactorsMatchFixture(t *testing.T) {
	fx := loadFixture(t)
	if len(fx) != len(Families()) {
		t.Fatalf("fixture has %d families, package %d", len(fx), len(Families()))
	}
	wantCh := map[Family]int{FamilySD15: 4, FamilySDXL: 4, FamilySD3: 16, FamilyFlux: 16, FamilyFlux2: 32}
	for _, fam := range Families() {
		f, err := FactorsFor(fam)
		if err != nil {
			t.Fatal(err)
		}
		want, ok := fx[fam]
		if !ok {
			t.Fatalf("%s: missing from fixture", fam)
		}
		if f.Channels() != wantCh[fam] || len(want.Rows) != wantCh[fam] {
			t.Fatalf("%s: %d rows, fixture %d, want %d", fam, f.Channels(), len(want.Rows), wantCh[fam])
		}
		for c, row := range want.Rows {
			for k, v := range row {
				if f.RGB[c][k] != float32(v) {
					t.Errorf("%s row %d col %d: %v, published %v", fam, c, k, f.RGB[c][k], v)
				}
			}
		}
		for k, v := range want.Bias {
			if f.Bias[k] != float32(v) {
				t.Errorf("%s bias %d: %v, published %v", fam, k, f.Bias[k], v)
			}
		}
		if !strings.Contains(f.Source, "comfy/latent_formats.py") {
			t.Errorf("%s: source %q does not cite latent_formats.py", fam, f.Source)
		}
	}
}

// Entries typed by hand from Comfy-Org/ComfyUI comfy/latent_formats.py.
func TestFactorsSpotCheck(t *testing.T) {
	const bias = -1
	cases := []struct {
		fam      Family
		row, col int // row -1: bias
		want     float32
	}{
		{FamilySD15, 0, 0, 0.3512}, {FamilySD15, 1, 1, 0.4974}, {FamilySD15, 3, 2, -0.7177}, {FamilySD15, bias, 0, 0},
		{FamilySD15, bias, 2, 0},
		{FamilySDXL, 0, 2, 0.4341}, {FamilySDXL, 1, 1, -0.0042}, {FamilySDXL, 3, 0, -0.3165}, {FamilySDXL, bias, 0, 0.1084},
		{FamilySDXL, bias, 2, -0.0011},
		{FamilySD3, 0, 0, -0.0922}, {FamilySD3, 2, 0, 0.1994}, {FamilySD3, 5, 0, -0.0006}, {FamilySD3, 15, 2, -0.1189},
		{FamilySD3, bias, 1, 0.2135},
		{FamilyFlux, 0, 0, -0.0346}, {FamilyFlux, 8, 2, 0.1180}, {FamilyFlux, 9, 0, 0.1008}, {FamilyFlux, 13, 0, -0.1264},
		{FamilyFlux, 15, 2, -0.0778}, {FamilyFlux, bias, 1, -0.0718},
		{FamilyFlux2, 3, 2, 0.3652}, {FamilyFlux2, 8, 0, -0.3527}, {FamilyFlux2, 19, 0, 0.1207}, {FamilyFlux2, 23, 0, 0},
		{FamilyFlux2, 31, 2, -0.0614}, {FamilyFlux2, bias, 2, -0.0851},
	}
	for _, c := range cases {
		f, err := FactorsFor(c.fam)
		if err != nil {
			t.Fatal(err)
		}
		got := f.Bias[c.col]
		if c.row != bias {
			got = f.RGB[c.row][c.col]
		}
		if got != c.want {
			t.Errorf("%s row %d col %d: %v, want %v", c.fam, c.row, c.col, got, c.want)
		}
	}
}

func TestFactorsForReturnsACopy(t *testing.T) {
	f, _ := FactorsFor(FamilySD15)
	f.RGB[0][0] = 42
	g, _ := FactorsFor(FamilySD15)
	if g.RGB[0][0] != 0.3512 {
		t.Fatalf("table changed through a returned copy: %v", g.RGB[0][0])
	}
	if _, err := FactorsFor("sd2"); err == nil || !strings.Contains(err.Error(), `"sd2"`) {
		t.Fatalf("unknown family: %v", err)
	}
}

func TestDetect(t *testing.T) {
	cases := []struct {
		ch      int
		layout  Layout
		want    Family
		packed  bool
		errWant string
	}{
		{4, ChannelMajor, "", false, "ambiguous between sd15 and sdxl"},
		{16, ChannelMajor, "", false, "ambiguous between sd3 and flux"},
		{32, ChannelMajor, FamilyFlux2, false, ""},
		{64, ChannelMajor, FamilyFlux, true, ""},
		{128, ChannelMajor, FamilyFlux2, true, ""},
		{64, TokenMajor, FamilyFlux, true, ""},
		{128, TokenMajor, FamilyFlux2, true, ""},
		{16, TokenMajor, "", false, "token-major latent with 16 features"},
		{3, ChannelMajor, "", false, "3 channels: no known family"},
	}
	for _, c := range cases {
		fam, packed, err := Detect(c.ch, c.layout)
		if c.errWant != "" {
			if err == nil || !strings.Contains(err.Error(), c.errWant) {
				t.Errorf("Detect(%d, %v): err %v, want %q", c.ch, c.layout, err, c.errWant)
			}
			continue
		}
		if err != nil || fam != c.want || packed != c.packed {
			t.Errorf("Detect(%d, %v) = %s, %v, %v; want %s, %v", c.ch, c.layout, fam, packed, err, c.want, c.packed)
		}
	}
}

func TestResolveNamedFamily(t *testing.T) {
	cases := []struct {
		fam     Family
		ch      int
		layout  Layout
		packed  bool
		errWant string
	}{
		{FamilySD15, 4, ChannelMajor, false, ""},
		{FamilySDXL, 4, ChannelMajor, false, ""},
		{FamilySD3, 16, ChannelMajor, false, ""},
		{FamilyFlux, 16, ChannelMajor, false, ""},
		{FamilyFlux, 64, ChannelMajor, true, ""},
		{FamilyFlux, 64, TokenMajor, true, ""},
		{FamilyFlux2, 32, ChannelMajor, false, ""},
		{FamilyFlux2, 128, ChannelMajor, true, ""},
		{FamilySD3, 64, ChannelMajor, false, "family sd3: 64 channels, want 16"},
		{FamilySDXL, 16, ChannelMajor, false, "family sdxl: 16 channels, want 4"},
		{FamilyFlux, 32, ChannelMajor, false, "want 16 (or 64 packed 2×2)"},
		{FamilyFlux, 16, TokenMajor, false, "want 64 (packed 2×2)"},
		{FamilySD15, 16, TokenMajor, false, "family sd15: token-major"},
		{"sd2", 4, ChannelMajor, false, `family "sd2": unknown`},
	}
	for _, c := range cases {
		f, packed, err := resolve(c.fam, c.ch, c.layout)
		if c.errWant != "" {
			if err == nil || !strings.Contains(err.Error(), c.errWant) {
				t.Errorf("resolve(%s, %d, %v): err %v, want %q", c.fam, c.ch, c.layout, err, c.errWant)
			}
			continue
		}
		if err != nil || f.Family != c.fam || packed != c.packed {
			t.Errorf("resolve(%s, %d, %v) = %s, %v, %v", c.fam, c.ch, c.layout, f.Family, packed, err)
		}
	}
}
