package console_test

import (
	"bufio"

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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"

	"github.com/arenahost/arenahost/internal/testenv"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "write the console screenshots into docs/ (as ARENAHOST_SCREENSHOTS=docs does)")

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

// TestConsoleInChromium drives the console of a real `arenahost serve`
// (started with --token) in headless Chromium as an operator would: it
// loads, selects and unloads a model through the directory picker; applies
// two LoRAs and moves a strength slider, which rebinds live; starts jobs,
// cancels a running and a queued one and sees a finished one in the list
// and the gallery with its preview worded for people; SIGKILLs a plugin and
// sees its state, restart and error; reads a plugin's log tail; sees the
// memory plot and the breakdown by owner; and checks that the page is
// usable at phone width and wrote nothing to the browser console's error
// level. With ARENAHOST_SCREENSHOTS=DIR (relative to the repository root,
// e.g. docs) it writes the screenshots there.
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
	const tok = "console-test-token"
	url := serve(t, bin, filepath.Join(tmp, "data"), plugins, "--python", python, "--token", tok)

	artifacts := os.Getenv("ARENAHOST_ARTIFACTS")
	if artifacts == "" {
		artifacts = filepath.Join(os.TempDir(), "arenahost-artifacts")
	}
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	shots := os.Getenv("ARENAHOST_SCREENSHOTS")
	if shots != "" && !filepath.IsAbs(shots) {
		shots = filepath.Join(root, shots)
	}
	if shots == "" && *updateScreenshot {
		shots = filepath.Join(root, "docs")
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
		chromedp.Flag("hide-scrollbars", true),
		chromedp.UserDataDir(filepath.Join(tmp, "chromium-profile")),
		chromedp.WindowSize(1280, 800),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()

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
	eval := func(js string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Evaluate[string](js))
		must("evaluate "+js, err)
		return s
	}
	// step runs actions within d.
	step := func(name string, d time.Duration, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(bctx, d)
		defer scancel()
		if err := chromedp.Do(sctx, actions...); err != nil {
			html, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.querySelector("main").innerText.slice(0, 3000)`))
			t.Fatalf("%s (console at %s): %v\npage text:\n%s", name, url, err, html)
		}
	}
	// until polls a JavaScript condition.
	until := func(step, cond string, d time.Duration) {
		t.Helper()
		must(step, chromedp.Do(bctx, chromedp.Poll[chromedp.Void](cond, chromedp.WithPollingTimeout(d))))
	}
	// noError fails when the section's error box shows something.
	noError := func(id string) {
		t.Helper()
		if e := eval(`document.getElementById("` + id + `").hidden ? "" : document.getElementById("` + id + `").textContent`); e != "" {
			t.Fatalf("console shows %s: %q", id, e)
		}
	}
	// shoot saves a screenshot among the artifacts and, for the pictures
	// the docs show (docs true), in the screenshots directory.
	shoot := func(name string, full, docs bool) {
		t.Helper()
		var png []byte
		var err error
		if full {
			png, err = chromedp.Run(bctx, chromedp.FullScreenshot(100))
		} else {
			png, err = chromedp.Run(bctx, chromedp.CaptureScreenshot())
		}
		must("screenshot "+name, err)
		for _, dir := range []string{artifacts, shots} {
			if dir == "" || (dir == shots && !docs) {
				continue
			}
			if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("screenshot %s: %d bytes", name, len(png))
	}

	// Collect what the page writes to the console from the first page on.
	must("start the browser", chromedp.Do(bctx, chromedp.EmulateViewport(1280, 800), chromedp.Navigate("about:blank")))
	var consoleMu sync.Mutex
	var consoleErrs []string
	cctx, ccancel := context.WithCancel(bctx)
	defer ccancel()
	msgs := chromedp.Console(cctx)
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.IsException() {
				consoleMu.Lock()
				consoleErrs = append(consoleErrs, m.String()+" ("+m.URL+")")
				consoleMu.Unlock()
			}
		}
	}()

	// The page renders from the API: the sample model, the plugins, the
	// arena. The token goes in first; every action after needs it.
	must("open the console", chromedp.Do(bctx,
		chromedp.Navigate(url),
		chromedp.WaitVisible(`#models-body tr[data-model="sample"]`),
		chromedp.WaitVisible(`#plugins-body tr[data-plugin="go-hello"] td.generation`),
		chromedp.SetValue(`#token`, tok),
		chromedp.Click(`#token-form button`),
	))
	until("token saved", `document.getElementById("token-result").textContent === "saved for this tab"`, 5*time.Second)
	until("arena text", `document.getElementById("arena-text").textContent.includes("allocated")`, 20*time.Second)
	if s := text(`#models-body tr[data-model="sample"] td.format`); !strings.Contains(s, "bnb-nf4") || !strings.Contains(s, "flux-bfl") {
		t.Fatalf("sample row %q: want its format and layout", s)
	}
	until("sample digest", `document.querySelector('#models-body tr[data-model="sample"] td.digest code') !== null`, 30*time.Second)
	var dg struct {
		SHA256 string `json:"sha256"`
	}
	getJSON(t, url+"v1/models/sample/digest", &dg)
	if s := text(`#models-body tr[data-model="sample"] td.digest`); !strings.HasPrefix(dg.SHA256, strings.TrimSuffix(s, "…")) {
		t.Fatalf("digest cell %q, API %s", s, dg.SHA256)
	}

	// Load the sample file again under another name from the picker; a
	// name the model list already has is refused beside the field first.
	must("pick a model file", chromedp.Do(bctx,
		chromedp.WaitReady(`#load-file option[value="flux-sample-nf4.safetensors"]`),
		chromedp.SetValue(`#load-file`, "flux-sample-nf4.safetensors"),
		chromedp.SetValue(`#load-name`, "sample"),
		chromedp.Click(`#load-btn`),
	))
	until("name conflict shown", `document.getElementById("load-name-err").textContent.includes("is loaded")`, 5*time.Second)
	must("load as second", chromedp.Do(bctx,
		chromedp.SetValue(`#load-name`, "second"),
		chromedp.Click(`#load-btn`),
		chromedp.WaitVisible(`#models-body tr[data-model="second"]`),
	))
	until("load result", `document.getElementById("models-result").textContent.startsWith("Loaded second")`, 10*time.Second)
	noError("models-error")
	if sel := text(`#lora-model`); sel != "second" {
		t.Fatalf("after loading second the LoRA section shows %q", sel)
	}
	var models []struct{ Name string }
	getJSON(t, url+"v1/models", &models)
	if len(models) != 2 {
		t.Fatalf("models after the console's load: %+v", models)
	}
	step("select sample", 10*time.Second,
		chromedp.Click(`#models-body tr[data-model="sample"] button.select`),
		chromedp.Poll[chromedp.Void](`document.getElementById("lora-model").textContent === "sample"`, chromedp.WithPollingTimeout(5*time.Second)),
	)
	step("unload second", 20*time.Second,
		chromedp.Click(`#models-body tr[data-model="second"] button.unload`),
		chromedp.WaitNotPresent(`#models-body tr[data-model="second"]`),
	)
	until("unload result", `document.getElementById("models-result").textContent.startsWith("Unloaded second")`, 10*time.Second)
	getJSON(t, url+"v1/models", &models)
	if len(models) != 1 || models[0].Name != "sample" {
		t.Fatalf("models after the console's unload: %+v", models)
	}

	// Fuse a LoRA into sample: the page shows the retention and the
	// journal, and the digest changes; Remove all restores the file's
	// bytes, and the digest shows it.
	kohya, peft := "flux-sample-kohya-lora", "flux-sample-peft-lora"
	digestCell := `#models-body tr[data-model="sample"] td.digest`
	original := text(digestCell)
	step("fuse a LoRA", 60*time.Second,
		chromedp.SetValue(`#lora-file`, kohya),
		chromedp.SetValue(`#lora-mode`, "fuse"),
		chromedp.Click(`#lora-apply`),
		chromedp.WaitVisible(`#applied-body tr[data-lora="`+kohya+`"]`),
		chromedp.Poll[chromedp.Void](`document.getElementById("lora-summary").dataset.mode === "fuse"`, chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.Poll[chromedp.Void](`(() => { const c = document.querySelector('`+digestCell+` code'); return c !== null; })()`, chromedp.WithPollingTimeout(30*time.Second)),
	)
	noError("lora-error")
	if s := text(`#lora-summary`); !strings.Contains(s, "mode fuse") || !strings.Contains(s, "retention") || !strings.Contains(s, "journal") {
		t.Fatalf("fuse summary %q: want mode, retention and journal", s)
	}
	if fused := text(digestCell); fused == original {
		t.Fatalf("the digest %q did not change with a fused LoRA", fused)
	}
	step("remove all", 60*time.Second,
		chromedp.Click(`#lora-remove-all`),
		chromedp.Poll[chromedp.Void](`document.getElementById("lora-summary").textContent.startsWith("no LoRA applied")`, chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.Poll[chromedp.Void](`(() => { const c = document.querySelector('`+digestCell+` code'); return c !== null; })()`, chromedp.WithPollingTimeout(30*time.Second)),
	)
	if restored := text(digestCell); restored != original {
		t.Fatalf("after Remove all the digest is %q, the file's was %q", restored, original)
	}
	if s := text(`#lora-result`); !strings.Contains(s, "removed") {
		t.Fatalf("remove result %q", s)
	}

	// Apply two LoRAs to sample in side mode, one after the other; a bad
	// strength is refused beside its field.
	must("side mode", chromedp.Do(bctx, chromedp.SetValue(`#lora-mode`, "side")))
	must("bad strength", chromedp.Do(bctx,
		chromedp.SetValue(`#lora-file`, kohya),
		chromedp.SetValue(`#lora-strength`, "strong"),
		chromedp.Click(`#lora-apply`),
	))
	until("strength error shown", `document.getElementById("lora-strength-err").textContent.includes("not a number")`, 5*time.Second)
	must("apply two LoRAs", chromedp.Do(bctx,
		chromedp.SetValue(`#lora-strength`, "0.8"),
		chromedp.Click(`#lora-apply`),
		chromedp.WaitVisible(`#applied-body tr[data-lora="`+kohya+`"]`),
		chromedp.Poll[chromedp.Void](`!document.getElementById("lora-apply").disabled`, chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.SetValue(`#lora-file`, peft),
		chromedp.SetValue(`#lora-strength`, "0.5"),
		chromedp.Click(`#lora-apply`),
		chromedp.WaitVisible(`#applied-body tr[data-lora="`+peft+`"]`),
	))
	noError("lora-error")
	type loraState struct {
		Mode  string `json:"mode"`
		LoRAs []struct {
			Name     string  `json:"name"`
			Strength float64 `json:"strength"`
		} `json:"loras"`
		BindingGeneration uint64 `json:"binding_generation"`
	}
	var st loraState
	getJSON(t, url+"v1/loras/state?model=sample", &st)
	if st.Mode != "side" || len(st.LoRAs) != 2 || st.LoRAs[0].Name != kohya || st.LoRAs[0].Strength != 0.8 || st.LoRAs[1].Name != peft || st.LoRAs[1].Strength != 0.5 {
		t.Fatalf("LoRA state after two applies: %+v", st)
	}
	if s := text(`#lora-summary`); !strings.Contains(s, "mode side") || !strings.Contains(s, "journal") {
		t.Fatalf("LoRA summary %q", s)
	}
	if s := text(`#models-body tr[data-model="sample"] td.loras`); !strings.Contains(s, kohya+" 0.80") || !strings.Contains(s, peft+" 0.50") {
		t.Fatalf("models row LoRAs %q", s)
	}

	// Move kohya's slider down two notches with the keyboard: the strengths
	// rebind live (set_strengths, a new binding generation).
	slider := `#applied-body tr[data-lora="` + kohya + `"] input.strength`
	must("move a strength slider", chromedp.Do(bctx,
		chromedp.Focus(slider),
		chromedp.KeyEvent(kb.ArrowLeft+kb.ArrowLeft),
	))
	until("rebind", `document.getElementById("lora-result").dataset.path === "set_strengths" && document.getElementById("lora-result").textContent.includes("0.70")`, 30*time.Second)
	noError("lora-error")
	before := st.BindingGeneration
	deadline := time.Now().Add(10 * time.Second)
	for getJSON(t, url+"v1/loras/state?model=sample", &st); st.LoRAs[0].Strength != 0.7 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		getJSON(t, url+"v1/loras/state?model=sample", &st)
	}
	if len(st.LoRAs) != 2 || st.LoRAs[0].Strength != 0.7 || st.LoRAs[1].Strength != 0.5 || st.BindingGeneration <= before {
		t.Fatalf("after the slider: %+v (binding generation before %d)", st, before)
	}
	if s := text(`#lora-result`); !strings.Contains(s, "rebound live") {
		t.Fatalf("rebind result %q", s)
	}
	shoot("console-loras.png", false, false)

	// Jobs: a bad step count is refused beside its field and starts
	// nothing; then two long jobs (one runs, one waits) are cancelled from
	// the list and a short one finishes into the gallery.
	var jobs []map[string]any
	must("bad steps", chromedp.Do(bctx,
		// The server's default is preselected, and diffusers-flux (first by
		// name, but without torch) is offered disabled with its reason.
		chromedp.Poll[chromedp.Void](`document.getElementById("job-pipeline").value === "reference-pipeline" && document.getElementById("job-pipeline-note").textContent === "default: reference-pipeline"`, chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.Poll[chromedp.Void](`Array.from(document.getElementById("job-pipeline").options).some((o) => o.value === "diffusers-flux" && o.disabled && o.text.startsWith("diffusers-flux (unavailable") && o.title.includes("torch"))`,
			chromedp.WithPollingTimeout(30*time.Second)),
		chromedp.SetValue(`#job-steps`, "5000"),
		chromedp.Click(`#job-start`),
	))
	until("steps error shown", `document.getElementById("job-steps-err").textContent.includes("out of range")`, 5*time.Second)
	getJSON(t, url+"v1/jobs", &jobs)
	if len(jobs) != 0 {
		t.Fatalf("an invalid form started %d jobs", len(jobs))
	}
	start := func(steps, side string) string {
		t.Helper()
		n := len(jobs)
		must("start a job", chromedp.Do(bctx,
			chromedp.SetValue(`#job-pipeline`, "reference-pipeline"),
			chromedp.SetValue(`#job-steps`, steps),
			chromedp.SetValue(`#job-width`, side),
			chromedp.SetValue(`#job-height`, side),
			chromedp.Click(`#job-start`),
		))
		until("job started", fmt.Sprintf(`document.querySelectorAll("#jobs-body tr[data-job]").length === %d && document.getElementById("job-result").textContent.startsWith("Started")`, n+1), 20*time.Second)
		noError("job-error")
		getJSON(t, url+"v1/jobs", &jobs)
		if len(jobs) != n+1 {
			t.Fatalf("jobs: %d, want %d", len(jobs), n+1)
		}
		id := jobs[len(jobs)-1]["id"].(string)
		if jobs[len(jobs)-1]["origin"] != "console" {
			t.Fatalf("job %s origin %v, want console", id, jobs[len(jobs)-1]["origin"])
		}
		return id
	}
	row := func(id string) string { return `#jobs-body tr[data-job="` + id + `"]` }
	long := start("1000", "1024")
	queued := start("1000", "1024")
	until("one running, one queued", fmt.Sprintf(`document.querySelector('%s').dataset.state === "running" && document.querySelector('%s').dataset.state === "queued"`, row(long), row(queued)), 60*time.Second)
	if s := text(row(queued) + ` td.origin`); s != "console" {
		t.Fatalf("origin cell %q", s)
	}
	until("live preview", `document.getElementById("job-preview").dataset.src.endsWith(".mjpeg") || document.getElementById("job-frames").textContent.includes("step")`, 60*time.Second)
	shoot("console-jobs-running.png", false, false)
	must("cancel the queued job, then the running one", chromedp.Do(bctx,
		chromedp.Click(row(queued)+` button.cancel`),
		chromedp.Poll[chromedp.Void](fmt.Sprintf(`document.querySelector('%s').dataset.state === "cancelled"`, row(queued)), chromedp.WithPollingTimeout(20*time.Second)),
		chromedp.Click(row(long)+` button.cancel`),
		chromedp.Poll[chromedp.Void](fmt.Sprintf(`document.querySelector('%s').dataset.state === "cancelled"`, row(long)), chromedp.WithPollingTimeout(20*time.Second)),
	))
	if eval(fmt.Sprintf(`String(document.querySelectorAll('%s button.cancel, %s button.cancel').length)`, row(long), row(queued))) != "0" {
		t.Fatal("cancelled jobs still offer Cancel")
	}
	short := start("24", "128")
	until("short job done", fmt.Sprintf(`document.querySelector('%s').dataset.state === "done"`, row(short)), 90*time.Second)
	until("in the gallery", `document.querySelector('#gallery figure[data-job="`+short+`"] img') !== null && document.querySelector('#gallery figure[data-job="`+short+`"] img').complete && document.querySelector('#gallery figure[data-job="`+short+`"] img').naturalWidth > 0`, 20*time.Second)
	until("two frames seen", `Number(document.getElementById("job-frames").dataset.frames) >= 2`, 20*time.Second)
	frames := text(`#job-frames`)
	if !strings.Contains(frames, "step") || strings.Contains(frames, "dropped") {
		t.Fatalf("preview words %q: want steps in words, never \"dropped\"", frames)
	}
	if s := text(`#job-status`); !strings.Contains(s, "done") {
		t.Fatalf("job status %q", s)
	}
	if n := eval(`String(document.querySelectorAll("#gallery figure").length)`); n != "1" {
		t.Fatalf("gallery holds %s pictures, want the one finished job", n)
	}

	// A job a script starts with a size the pipeline refuses fails: the
	// list says so and who started it, and the pipeline's row, still
	// serving, says its calls fail and why.
	bad := postJSON(t, url+"v1/jobs", tok, `{"pipeline": "reference-pipeline", "params": {"steps": 4, "width": 20, "height": 16}}`)
	until("failed job listed", fmt.Sprintf(`(() => { const r = document.querySelector('%s'); return r && r.dataset.state === "failed"; })()`, row(bad)), 30*time.Second)
	if s := text(row(bad) + ` td.origin`); s != "API" {
		t.Fatalf("origin of a job started through the API: %q", s)
	}
	if s := eval(`document.querySelector('` + row(bad) + ` td.state').title`); !strings.Contains(s, "width") {
		t.Fatalf("failed job's state explains %q, want the pipeline's complaint about the width", s)
	}
	rp := `#plugins-body tr[data-plugin="reference-pipeline"]`
	until("failing calls shown", `document.querySelector('`+rp+` td.state').textContent.includes("recent calls fail")`, 10*time.Second)
	if s := text(rp + ` td.last-error`); !strings.Contains(s, "failed call") || !strings.Contains(s, "width") {
		t.Fatalf("reference-pipeline last error %q: want the failed call and its reason", s)
	}

	// Kill a plugin: its row shows the crash, the restart and the error
	// with its time.
	var ps []struct {
		Name string `json:"name"`
		PID  int    `json:"pid"`
	}
	getJSON(t, url+"v1/plugins", &ps)
	pid := 0
	for _, p := range ps {
		if p.Name == "go-hello" {
			pid = p.PID
		}
	}
	if pid == 0 {
		t.Fatalf("go-hello has no pid: %+v", ps)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	prow := `#plugins-body tr[data-plugin="go-hello"]`
	until("crash shown", fmt.Sprintf(`document.querySelector('%s td.restarts').dataset.restarts === "1" && document.querySelector('%s td.last-error').textContent.includes("signal: killed")`, prow, prow), 30*time.Second)
	if s := text(prow + ` td.restarts`); !strings.Contains(s, "fails after 5 crashes in 60 s (1 so far)") {
		t.Fatalf("restarts cell %q: want the restart budget", s)
	}
	if s := text(prow + ` td.last-error`); !strings.Contains(s, "ago") || !strings.Contains(s, "exited unexpectedly") {
		t.Fatalf("last error cell %q: want the error with its time", s)
	}
	until("serving again", fmt.Sprintf(`document.querySelector('%s td.state').dataset.state === "serving" && document.querySelector('%s td.generation').dataset.generation === "2"`, prow, prow), 30*time.Second)
	must("open the log, reload", chromedp.Do(bctx,
		chromedp.Click(prow+` button.log`),
		chromedp.Poll[chromedp.Void](`(() => { const p = document.querySelector('pre.log[data-plugin="go-hello"]'); return p && p.textContent.includes("g2"); })()`, chromedp.WithPollingTimeout(10*time.Second)),
		chromedp.Click(prow+` button.reload`),
		chromedp.Poll[chromedp.Void](fmt.Sprintf(`document.querySelector('%s td.generation').dataset.generation === "3"`, prow), chromedp.WithPollingTimeout(30*time.Second)),
	))
	until("reload result", `document.getElementById("plugins-result").textContent.startsWith("Reloaded go-hello: generation 3")`, 5*time.Second)
	noError("plugins-error")

	// Memory: the plot has samples and the breakdown names the model and
	// the LoRA factors.
	until("plot samples", `Number(document.getElementById("mem-plot").dataset.samples) >= 3`, 20*time.Second)
	until("breakdown", `document.querySelector('#usage-body tr[data-owner="model:sample"]') !== null && document.querySelector('#usage-body tr[data-purpose="LoRA factors"]') !== null`, 10*time.Second)
	if s := text(`#mem-legend`); !strings.Contains(s, "allocated") || !strings.Contains(s, "peak") || !strings.Contains(s, "fragmentation") {
		t.Fatalf("memory legend %q", s)
	}
	noError("arena-error")

	// At 1280×800 no section needs sideways scrolling.
	wide := `Array.from(document.querySelectorAll("section")).filter(s => s.scrollWidth > s.clientWidth + 1).map(s => s.id).join(" ")`
	if w := eval(wide); w != "" {
		t.Fatalf("at 1280×800 these sections scroll sideways: %s", w)
	}

	// Screenshots: the top of the page at 1280×800 and the whole page.
	must("scroll to the top", chromedp.Do(bctx, chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`)))
	shoot("console.png", false, true)
	shoot("console-full.png", true, true)

	// Phone width: one column, nothing wider than the screen.
	must("phone width", chromedp.Do(bctx,
		chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2), chromedp.EmulateMobile),
		chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`),
		chromedp.Sleep(500*time.Millisecond),
	))
	if w := eval(`String(document.documentElement.scrollWidth)`); w != "390" {
		t.Fatalf("at phone width the page is %s px wide, want 390 (no sideways scrolling)", w)
	}
	if w := eval(wide); w != "" {
		t.Fatalf("at phone width these sections scroll sideways: %s", w)
	}
	shoot("console-phone.png", false, true)
	shoot("console-phone-full.png", true, false)

	consoleMu.Lock()
	defer consoleMu.Unlock()
	if len(consoleErrs) > 0 {
		t.Fatalf("the browser console has %d errors:\n%s", len(consoleErrs), strings.Join(consoleErrs, "\n"))
	}
}

// postJSON posts body with the token and returns the "id" of the answer.
func postJSON(t *testing.T, url, token, body string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		ID string `json:"id"`
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 || json.Unmarshal(b, &out) != nil || out.ID == "" {
		t.Fatalf("POST %s: %d %s", url, resp.StatusCode, b)
	}
	return out.ID
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
