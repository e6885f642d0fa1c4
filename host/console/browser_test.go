package console_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"

	"github.com/arenahost/arenahost/internal/testenv"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "copy the console screenshot to docs/console.png")

// chromium finds a Chromium to drive: ARENAHOST_CHROMIUM, else Debian's
// /usr/bin/chromium. Without one the test skips, except under `make test`
// (ARENAHOST_REQUIRE_PYTHON=1), where it fails.
func chromium(t *testing.T) string {
	t.Helper()
	for _, p := range []string{os.Getenv("ARENAHOST_CHROMIUM"), "/usr/bin/chromium"} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	msg := "no Chromium at $ARENAHOST_CHROMIUM or /usr/bin/chromium: apt-get install -y chromium"
	if os.Getenv("ARENAHOST_REQUIRE_PYTHON") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func TestMain(m *testing.M) { testenv.Main(m) }

// build puts a copy of a Go package of this module (built once per test
// binary) at out.
func build(t *testing.T, _, pkg, out string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := testenv.CopyFile(testenv.GoBinary(t, pkg), out, 0o755); err != nil {
		t.Fatal(err)
	}
}

// serve starts `arenahost serve` on 127.0.0.1:0 and returns the console URL.
func serve(t *testing.T, bin, data, plugins string, extra ...string) string {
	t.Helper()
	args := append([]string{"serve", "--listen", "127.0.0.1:0", "--data", data, "--plugins", plugins, "--arena-capacity", "1GiB"}, extra...)
	cmd := exec.Command(bin, args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "serve.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("arenahost serve log:\n%s", b)
		}
	})
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		re := regexp.MustCompile(`arenahost console: (http://\S+)`)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				urls <- m[1]
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	select {
	case u := <-urls:
		return u
	case <-time.After(60 * time.Second):
		t.Fatal("arenahost serve printed no console URL within 60s")
	}
	return ""
}

// TestConsoleInChromium opens the console of a real `arenahost serve` in
// headless Chromium: the arena gauge and the plugins table render, a
// plugin's Reload button raises its generation, and a screenshot is saved.
func TestConsoleInChromium(t *testing.T) {
	chrome := chromium(t)
	root := testenv.RepoRoot(t)
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "arenahost")
	build(t, root, "./host/cmd/arenahost", bin)
	plugins := filepath.Join(tmp, "plugins")
	build(t, root, "./sdk/examples/go-hello", filepath.Join(plugins, "go-hello", "go-hello"))
	build(t, root, "./plugins/lora-nf4", filepath.Join(plugins, "lora-nf4", "lora-nf4"))
	build(t, root, "./plugins/preview", filepath.Join(plugins, "preview", "preview"))
	python := testenv.Python(t) // runs the reference pipeline plugin
	for _, d := range []string{"reference-pipeline", "diffusers-flux"} {
		if err := os.MkdirAll(filepath.Join(plugins, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	refDir := filepath.Join(root, "sdk", "python", "examples", "reference_pipeline")
	// diffusers-flux needs torch, which the core environment lacks: it is
	// listed unavailable, and the console must not pick it although it
	// comes first by name.
	dfDir := filepath.Join(root, "sdk", "python", "examples", "diffusers_flux")
	for _, p := range []struct{ src, dst string }{
		{filepath.Join(root, "plugins", "preview", "plugin.json"), filepath.Join(plugins, "preview", "plugin.json")},
		{filepath.Join(refDir, "plugin.json"), filepath.Join(plugins, "reference-pipeline", "plugin.json")},
		{filepath.Join(refDir, "reference_pipeline.py"), filepath.Join(plugins, "reference-pipeline", "reference_pipeline.py")},
		{filepath.Join(dfDir, "plugin.json"), filepath.Join(plugins, "diffusers-flux", "plugin.json")},
		{filepath.Join(dfDir, "diffusers_flux.py"), filepath.Join(plugins, "diffusers-flux", "diffusers_flux.py")},
		{filepath.Join(root, "sdk", "examples", "go-hello", "plugin.json"), filepath.Join(plugins, "go-hello", "plugin.json")},
		{filepath.Join(root, "plugins", "lora-nf4", "plugin.json"), filepath.Join(plugins, "lora-nf4", "plugin.json")},
	} {
		b, err := os.ReadFile(p.src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p.dst, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	url := serve(t, bin, filepath.Join(tmp, "data"), plugins, "--python", python)

	artifacts := os.Getenv("ARENAHOST_ARTIFACTS")
	if artifacts == "" {
		artifacts = filepath.Join(os.TempDir(), "arenahost-artifacts")
	}
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}

	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chrome),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(filepath.Join(tmp, "chromium-profile")),
		chromedp.WindowSize(1280, 1000),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()

	row := `#plugins-body tr[data-plugin="go-hello"]`
	must := func(step string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s (console at %s): %v", step, url, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Text(sel))
		must("read "+sel, err)
		return s
	}

	// The arena gauge renders from GET /v1/arena: the sample model is loaded.
	must("open the console", chromedp.Do(bctx,
		chromedp.Navigate(url),
		chromedp.WaitVisible(`#arena-gauge`),
		chromedp.Poll[chromedp.Void](`document.getElementById("arena-text").textContent.includes("allocated")`, chromedp.WithPollingTimeout(20*time.Second)),
		// The plugins table renders go-hello.
		chromedp.WaitVisible(row+` td.generation`),
	))
	if s := text(`#arena-text`); !strings.Contains(s, "allocated") || !strings.Contains(s, "fragmentation") {
		t.Fatalf("arena text %q", s)
	}
	gauge, err := chromedp.Run(bctx, chromedp.Evaluate[float64](`document.getElementById("arena-gauge").value`))
	must("read the gauge", err)
	if gauge <= 0 {
		t.Fatalf("arena gauge value %v: the sample model should be allocated", gauge)
	}
	if gen, state := text(row+` td.generation`), text(row+` td.state`); gen != "1" || state != "serving" {
		t.Fatalf("go-hello row: generation %q state %q, want 1 serving", gen, state)
	}

	// Reload with the keyboard: focus the row's button and press Enter.
	must("reload go-hello from the console", chromedp.Do(bctx,
		chromedp.Focus(row+` button`),
		chromedp.KeyEvent("\r"),
		chromedp.Poll[chromedp.Void](fmt.Sprintf(`(() => { const c = document.querySelector('%s td.generation'); return c && c.textContent === "2"; })()`, row),
			chromedp.WithPollingTimeout(30*time.Second)),
	))
	if gen := text(row + ` td.generation`); gen != "2" {
		t.Fatalf("after reload: generation %q, want 2", gen)
	}
	errText, err := chromedp.Run(bctx, chromedp.Evaluate[string](`document.getElementById("plugins-error").hidden ? "" : document.getElementById("plugins-error").textContent`))
	must("read the plugins error", err)
	if errText != "" {
		t.Fatalf("console shows an error after reload: %q", errText)
	}

	// Apply the sample kohya LoRA at 0.80 with the keyboard: tick "use",
	// step the slider down four times from 1.00, press Apply; the report
	// renders and agrees with GET /v1/loras/state. This is lora-nf4's first
	// Host call, long after its start.
	use := `input.lora-use[data-name="flux-sample-kohya-lora"]`
	slider := `fieldset.lora:has(` + use + `) input.lora-strength`
	must("apply a LoRA from the console", chromedp.Do(bctx,
		chromedp.WaitVisible(use),
		chromedp.Focus(use),
		chromedp.KeyEvent(" "),
		chromedp.Focus(slider),
		chromedp.KeyEvent(kb.ArrowLeft+kb.ArrowLeft+kb.ArrowLeft+kb.ArrowLeft),
		chromedp.Focus(`#lora-apply`),
		chromedp.KeyEvent("\r"),
		chromedp.Poll[chromedp.Void](`document.querySelector("#lora-report-table td.matched") !== null || !document.getElementById("lora-error").hidden`,
			chromedp.WithPollingTimeout(30*time.Second)),
	))
	if e := text(`#lora-error`); e != "" {
		t.Fatalf("console shows a LoRA error: %q", e)
	}
	matched, unmatched := text(`#lora-report-table td.matched`), text(`#lora-report-table td.unmatched`)
	var state struct {
		Mode  string `json:"mode"`
		LoRAs []struct {
			Name     string  `json:"name"`
			Strength float64 `json:"strength"`
		} `json:"loras"`
		Report struct {
			LoRAs []struct {
				Matched   int   `json:"matched"`
				Unmatched []any `json:"unmatched"`
			} `json:"loras"`
		} `json:"report"`
	}
	getJSON(t, url+"v1/loras/state?model=sample", &state)
	if state.Mode != "side" || len(state.LoRAs) != 1 || state.LoRAs[0].Name != "flux-sample-kohya-lora" || state.LoRAs[0].Strength != 0.8 {
		t.Fatalf("LoRA state after the console's apply: %+v", state)
	}
	if len(state.Report.LoRAs) != 1 || matched != strconv.Itoa(state.Report.LoRAs[0].Matched) || matched == "0" ||
		!strings.HasPrefix(unmatched, strconv.Itoa(len(state.Report.LoRAs[0].Unmatched))) {
		t.Fatalf("console report matched %q unmatched %q; state %+v", matched, unmatched, state.Report)
	}
	if mode := text(`#lora-report-mode`); mode != "side" {
		t.Fatalf("report mode %q", mode)
	}
	if m := getText(t, url+"metrics"); !strings.Contains(m, `arenahost_lora_apply_duration_seconds_count{mode="side",op="apply",result="ok"} 1`) {
		t.Fatalf("/metrics lacks the apply observation:\n%s", m)
	}

	// Start a job with the keyboard and watch its live preview: the SSE
	// events name at least two different frames, and the MJPEG <img> shows
	// two different pictures.
	must("start a job from the console", chromedp.Do(bctx,
		chromedp.Poll[chromedp.Void](`document.getElementById("job-pipeline").value === "reference-pipeline" && document.getElementById("job-pipeline-note").textContent === "default: reference-pipeline"`, chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.Poll[chromedp.Void](`Array.from(document.getElementById("job-pipeline").options).some((o) => o.value === "diffusers-flux" && o.disabled && o.text === "diffusers-flux (unavailable)" && o.title.includes("torch"))`,
			chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.SetValue(`#job-steps`, "24"),
		chromedp.SetValue(`#job-width`, "128"),
		chromedp.SetValue(`#job-height`, "128"),
		chromedp.Focus(`#job-start`),
		chromedp.KeyEvent("\r"),
		chromedp.Poll[chromedp.Void](`Number(document.getElementById("job-frames").dataset.frames) >= 1 || !document.getElementById("job-error").hidden`,
			chromedp.WithPollingTimeout(60*time.Second)),
	))
	if e := text(`#job-error`); e != "" {
		t.Fatalf("console shows a job error: %q", e)
	}
	first, err := chromedp.Run(bctx, chromedp.Screenshot(`#job-preview`))
	must("screenshot the preview", err)
	var second []byte
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		b, err := chromedp.Run(bctx, chromedp.Screenshot(`#job-preview`))
		must("screenshot the preview", err)
		if !bytes.Equal(b, first) {
			second = b
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if second == nil {
		t.Fatalf("the preview <img> showed one picture only; job status %q, %q", text(`#job-status`), text(`#job-frames`))
	}
	must("see two preview frames", chromedp.Do(bctx,
		chromedp.Poll[chromedp.Void](`Number(document.getElementById("job-frames").dataset.frames) >= 2`, chromedp.WithPollingTimeout(60*time.Second)),
	))
	os.WriteFile(filepath.Join(artifacts, "preview-1.png"), first, 0o644)
	os.WriteFile(filepath.Join(artifacts, "preview-2.png"), second, 0o644)

	png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	must("screenshot", err)
	shot := filepath.Join(artifacts, "console.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes); artifacts in %s", shot, len(png), artifacts)
	if *updateScreenshot {
		if err := os.WriteFile(filepath.Join(root, "docs", "console.png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func getText(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v: %s", url, resp.StatusCode, err, b)
	}
	return string(b)
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	b := []byte(getText(t, url))
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s: %v: %s", url, err, b)
	}
}
