package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// mutating reports whether a method can change state.
func mutating(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return false
	}
	return true
}

// streaming reports whether r asks for a long-lived response (MJPEG
// previews, server-sent events, websockets), which must not get a write
// deadline.
func streaming(r *http.Request) bool {
	p := r.URL.Path
	return strings.HasSuffix(p, ".mjpeg") || strings.HasSuffix(p, "/events") || strings.HasSuffix(p, "/ws") ||
		strings.Contains(r.Header.Get("Accept"), "text/event-stream") ||
		strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
}

// authorize checks a mutating request: it must come from an allowed origin
// (guard.go) when a browser says where it comes from, and carry the token when
// one is configured. Tokens are compared in constant time (over their
// SHA-256, so the length does not leak either).
func (a *API) authorize(r *http.Request) error {
	if err := a.hosts.checkOrigin(r); err != nil {
		return err
	}
	if a.opts.Token == "" {
		return nil
	}
	got := r.Header.Get("X-Arenahost-Token")
	if h := r.Header.Get("Authorization"); got == "" && h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return &StatusError{Status: http.StatusUnauthorized, Code: "unauthorized",
				Err: errors.New("authorization header is not \"Bearer TOKEN\"")}
		}
		got = strings.TrimSpace(tok)
	}
	if got == "" {
		return &StatusError{Status: http.StatusUnauthorized, Code: "unauthorized",
			Err: fmt.Errorf("%s %s needs the server's token: send \"Authorization: Bearer TOKEN\"", r.Method, r.URL.Path)}
	}
	want := sha256.Sum256([]byte(a.opts.Token))
	have := sha256.Sum256([]byte(got))
	if subtle.ConstantTimeCompare(want[:], have[:]) != 1 {
		return &StatusError{Status: http.StatusForbidden, Code: "forbidden",
			Err: fmt.Errorf("%s %s: wrong token", r.Method, r.URL.Path)}
	}
	return nil
}

var (
	// errOutside: a request path leaves its configured directory.
	errOutside = errors.New("path is outside the configured directory")
	// errNoFile: a request path names no file.
	errNoFile = errors.New("no such file")
	// errBadPath: a request path cannot be resolved (symlink loop, name
	// too long, a file in place of a directory) or names something other
	// than a regular file (FIFO, device, socket, directory).
	errBadPath = errors.New("bad path")
)

// maxPathLen bounds a request path (Linux's PATH_MAX).
const maxPathLen = 4096

// confine is the one resolver of a path that came from a request, used for
// model, LoRA and every other request path before anything (the host or a
// plugin) opens it. It resolves p (relative to dir, or absolute) to a real
// path inside dir and rejects "..", absolute paths elsewhere, symlinks that
// lead out of dir (both are resolved with filepath.EvalSymlinks before
// comparing), paths that cannot be resolved (loops, over-long names) and
// anything but a regular file. Stat never blocks, so a FIFO is refused
// without being opened; the opener (safetensors.OpenRegular) checks the
// opened descriptor again, which closes the window of a swap in between.
func confine(dir, p string) (string, error) {
	real, _, err := confinePath(dir, p, false)
	return real, err
}

// confineModel is confine for a model path, which may also be a diffusers
// model or pipeline folder (safetensors.OpenSet then validates what the
// folder holds, and refuses shard names that leave it).
func confineModel(dir, p string) (string, error) {
	real, _, err := confinePath(dir, p, true)
	return real, err
}

// confinePath is confine returning also the resolved path's stat (a
// regular file, or with allowDir a directory).
func confinePath(dir, p string, allowDir bool) (string, fs.FileInfo, error) {
	if p == "" {
		return "", nil, badRequest("empty path")
	}
	if strings.ContainsRune(p, 0) {
		return "", nil, &StatusError{Status: http.StatusBadRequest, Code: "bad_path", Err: fmt.Errorf("path %q contains a NUL byte: %w", p, errBadPath)}
	}
	if len(p) > maxPathLen {
		return "", nil, &StatusError{Status: http.StatusBadRequest, Code: "bad_path", Err: fmt.Errorf("path %.64q… is %d bytes, longer than %d: %w", p, len(p), maxPathLen, errBadPath)}
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return "", nil, fmt.Errorf("directory %s: %w", dir, err)
	}
	root, err := filepath.EvalSymlinks(absDir)
	if err != nil {
		return "", nil, fmt.Errorf("directory %s: %w", dir, err)
	}
	for _, part := range strings.Split(filepath.ToSlash(p), "/") {
		if part == ".." {
			return "", nil, fmt.Errorf("path %q: %w %s (\"..\" is not allowed)", p, errOutside, dir)
		}
	}
	full := filepath.Clean(p)
	if !filepath.IsAbs(p) {
		full = filepath.Join(absDir, p)
	}
	if !within(absDir, full) && !within(root, full) {
		return "", nil, fmt.Errorf("path %q: %w %s", p, errOutside, dir)
	}
	real, err := filepath.EvalSymlinks(full)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil, fmt.Errorf("path %q in %s: %w", p, dir, errNoFile)
	}
	if err != nil {
		// A symlink loop ("too many links"), ENAMETOOLONG, ENOTDIR,
		// EACCES: the path the client named cannot be resolved.
		return "", nil, fmt.Errorf("path %q: %w: %w", p, errBadPath, err)
	}
	if !within(root, real) {
		return "", nil, fmt.Errorf("path %q: %w %s (a symlink leads to %s)", p, errOutside, dir, real)
	}
	st, err := os.Stat(real)
	if err != nil {
		return "", nil, fmt.Errorf("path %q: %w: %w", p, errBadPath, err)
	}
	if !st.Mode().IsRegular() && !(allowDir && st.IsDir()) {
		return "", nil, fmt.Errorf("path %q: %w: %s is a %s, not a regular file", p, errBadPath, real, typeName(st.Mode()))
	}
	return real, st, nil
}

// typeName names a non-regular file's type.
func typeName(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "FIFO (named pipe)"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeDevice != 0:
		return "device"
	case m.IsDir():
		return "directory"
	}
	return "special file (" + m.Type().String() + ")"
}

// within reports whether p is root or below it (both absolute, clean).
func within(root, p string) bool {
	rel, err := filepath.Rel(root, filepath.Clean(p))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel)
}

// Limits are the connection-level timeouts of HTTPServer.
type Limits struct {
	ReadHeaderTimeout time.Duration
	ReadTimeout       time.Duration
	IdleTimeout       time.Duration
}

// HTTPServer returns an http.Server for h that times out slow clients
// (headers and whole request) and idle connections. It sets no
// WriteTimeout: the API sets a write deadline per request instead, so that
// streaming routes (MJPEG, SSE) can run for as long as their client reads.
func HTTPServer(h http.Handler, l Limits) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		ReadTimeout:       l.ReadTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
	}
}

// walkConfined calls fn for every regular file under root whose name match
// accepts, with its path relative to root, its resolved path and its
// stat. Symlinks are followed only where they stay inside root (confine);
// an unreadable subfolder is skipped, an unreadable root is the error. fn
// may return filepath.SkipAll to stop.
func walkConfined(root string, match func(name string) bool, fn func(rel, real string, st fs.FileInfo) error) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == root {
				return err
			}
			return nil
		}
		if d.IsDir() || !match(d.Name()) {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return nil
		}
		real, st, err := confinePath(root, rel, false)
		if err != nil {
			return nil // a symlink out of the directory, or not a regular file: not listed
		}
		return fn(rel, real, st)
	})
}

// isSafetensors matches *.safetensors file names.
func isSafetensors(name string) bool { return strings.HasSuffix(name, ".safetensors") }

// maxTreeEntries bounds confineTree's walk of a folder a plugin reads.
const maxTreeEntries = 20000

// confineTree checks a folder that a plugin reads as a whole (a diffusers
// pipeline's model_dir, a tokenizer_dir): every symlink under dir, at any
// depth and through symlinked folders, must resolve inside the models
// folder root, or it is errOutside naming the link. confine checked dir
// itself only; the pipeline's from_pretrained follows whatever links the
// folder holds. Dangling links are left to the reader (it fails on them).
func confineTree(root, dir string) error {
	absRoot, err := filepath.Abs(root)
	if err != nil {
		return fmt.Errorf("directory %s: %w", root, err)
	}
	realRoot, err := filepath.EvalSymlinks(absRoot)
	if err != nil {
		return fmt.Errorf("directory %s: %w", root, err)
	}
	seen := map[string]bool{}
	n := 0
	var walk func(d string) error
	walk = func(d string) error {
		real, err := filepath.EvalSymlinks(d)
		if err != nil || seen[real] {
			return nil
		}
		seen[real] = true
		return filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return nil // unreadable: the reader reports it
			}
			if n++; n > maxTreeEntries {
				return fmt.Errorf("folder %s: over %d entries to check: %w", dir, maxTreeEntries, errBadPath)
			}
			if e.Type()&fs.ModeSymlink == 0 {
				return nil
			}
			target, err := filepath.EvalSymlinks(p)
			if err != nil {
				return nil
			}
			if !within(realRoot, target) {
				return fmt.Errorf("%s resolves to %s: %w %s", p, target, errOutside, root)
			}
			if st, err := os.Stat(target); err == nil && st.IsDir() {
				return walk(target)
			}
			return nil
		})
	}
	return walk(dir)
}
