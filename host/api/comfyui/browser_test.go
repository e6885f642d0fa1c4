package comfyui_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/arenahost/arenahost/internal/testenv"
)

func required() bool { return os.Getenv("ARENAHOST_REQUIRE_PYTHON") == "1" }

func need(t *testing.T, what, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		if required() {
			t.Fatalf("%s not found at %s: run the tests through `make test`", what, path)
		}
		t.Skipf("%s not found at %s", what, path)
	}
	return path
}

func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		out := filepath.Join(dst, rel)
		if info.IsDir() {
			return os.MkdirAll(out, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(out, b, info.Mode())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// startHost runs bin/arenahost serve with the reference pipeline and the
// ComfyUI frontend, and returns its base URL.
func startHost(t *testing.T, frontend string) string {
	t.Helper()
	bin := testenv.BinDir(t)
	python := testenv.Python(t)
	root := testenv.RepoRoot(t)
	tmp := t.TempDir()
	plugins := filepath.Join(tmp, "plugins")
	for _, p := range []string{"lora-nf4", "preview", "reference_pipeline"} {
		copyDir(t, need(t, "plugin "+p, filepath.Join(bin, "plugins", p)), filepath.Join(plugins, p))
	}
	cmd := exec.Command(filepath.Join(bin, "arenahost"), "serve", "--listen", "127.0.0.1:0", "--data", filepath.Join(tmp, "data"),
		"--plugins", plugins, "--python", python, "--pipeline", "reference-pipeline", "--comfy-frontend", frontend)
	cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(root, "sdk", "python"))
	log, err := os.Create(filepath.Join(tmp, "host.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = log
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		log.Close()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "arenahost console: ") {
		b, _ := os.ReadFile(filepath.Join(tmp, "host.log"))
		t.Fatalf("host did not start: %q %v\n%s", line, err, b)
	}
	base := strings.TrimSuffix(strings.TrimSpace(strings.TrimPrefix(line, "arenahost console: ")), "/")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		resp, err := http.Get(base + "/v1/plugins")
		if err == nil {
			var ps []struct{ Name, State string }
			_ = json.NewDecoder(resp.Body).Decode(&ps)
			resp.Body.Close()
			n := 0
			for _, p := range ps {
				if p.State == "serving" {
					n++
				}
			}
			if n == 3 {
				return base
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(tmp, "host.log"))
			t.Fatalf("plugins not serving:\n%s", b)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// graph is the API-format graph the page queues: ComfyUI's core nodes
// with one LoRA, saved by SaveImage.
const graph = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux-sample-nf4.safetensors"}},
 "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "flux-sample-kohya-lora.safetensors", "strength_model": 0.7}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
 "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": 5, "steps": 40, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
       "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "frontend"}}
}`

// TestFrontendInChromium loads ComfyUI's own frontend from arenahost in a
// real headless Chromium, loads a graph, queues it, and checks that type-4
// previews reached the sampler node, that the saved image is displayed,
// and that the page logged no error.
func TestFrontendInChromium(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a host and a browser")
	}
	root := testenv.RepoRoot(t)
	fe := os.Getenv("ARENAHOST_COMFY_FRONTEND")
	if fe == "" {
		fe = filepath.Join(root, ".cache", "comfy-frontend", "static")
	}
	need(t, "ComfyUI frontend (make comfy-frontend)", filepath.Join(fe, "index.html"))
	chrome := os.Getenv("ARENAHOST_CHROMIUM")
	if chrome == "" {
		chrome = "/usr/bin/chromium"
	}
	need(t, "Chromium (apt-get install chromium)", chrome)
	base := startHost(t, fe)

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	actx, acancel := chromedp.NewExecAllocator(ctx, chromedp.ExecPath(chrome), chromedp.Flag("headless", true), chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true), chromedp.Flag("disable-dev-shm-usage", true), chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true), chromedp.UserDataDir(filepath.Join(t.TempDir(), "profile")), chromedp.WindowSize(1400, 1000))
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()
	var mu sync.Mutex
	var problems []string
	messages := chromedp.Console(bctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.Type == chromedp.ConsoleException {
				mu.Lock()
				problems = append(problems, fmt.Sprintf("%s %s (%s:%d)", m.Type, m.Text, m.URL, m.Line))
				mu.Unlock()
			}
		}
	}()
	step := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, actions...); err != nil {
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("%s: %v\nproblems so far: %v", what, err, problems)
		}
	}
	step("open the frontend", chromedp.Navigate(base+"/comfy/"),
		chromedp.Poll[chromedp.Void](`!!(window.app && window.app.graph && window.app.api && window.app.api.clientId)`, chromedp.WithPollingTimeout(60*time.Second)))
	if _, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`(async () => {
		window.__previews = 0; window.__executed = 0; window.__previewDrawn = false;
		// A type-4 frame becomes the KSampler node's preview image (a blob
		// URL in the app's node previews); it must decode as an image.
		app.api.addEventListener("b_preview_with_metadata", (e) => {
			window.__previews++;
			if (e.detail.nodeId !== "3") return;
			setTimeout(() => {
				const urls = (app.nodePreviewImages || {})["3"];
				if (!urls || !urls[0]) return;
				const im = new Image();
				im.onload = () => { if (im.naturalWidth > 0) window.__previewDrawn = true; };
				im.src = urls[0];
			}, 0);
		});
		app.api.addEventListener("executed", () => { window.__executed++; });
		await app.loadApiJson(`+graph+`, "arenahost.json");
		await app.queuePrompt(0, 1);
		return true;
	})()`, chromedp.EvalAwaitPromise)); err != nil {
		t.Fatalf("load and queue the graph: %v (problems: %v)", err, problems)
	}
	step("a type-4 preview draws on the sampler node", chromedp.Poll[chromedp.Void](`window.__previews > 0 && window.__previewDrawn`, chromedp.WithPollingTimeout(60*time.Second)))
	step("the saved image is displayed", chromedp.Poll[chromedp.Void](`window.__executed > 0 && Array.from(document.images).some(i => i.src.includes("/api/view") && i.src.includes("frontend_") && i.complete && i.naturalWidth === 256)`,
		chromedp.WithPollingTimeout(90*time.Second)))
	resp, err := http.Get(base + "/history?max_items=1")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), `"status_str":"success"`) {
		t.Fatalf("history %s", b)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(problems) > 0 {
		t.Fatalf("the page logged %d errors:\n%s", len(problems), strings.Join(problems, "\n"))
	}
}
