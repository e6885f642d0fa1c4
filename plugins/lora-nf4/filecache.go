package main

import (
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/arenahost/arenahost/shared/lora"
)

// The host asks for a fused apply in two calls, plan (which weights the set
// touches, so the host can journal them) and apply, and both parse the
// same LoRA files. fileCache keeps the files the last plan call parsed for
// the apply that follows: apply takes a file out of the cache when it is
// unchanged on disk (same device, inode, size and modification time),
// else parses it again. The cache holds one set, is emptied by the apply
// that uses it, and drops what is left after fileCacheTTL, so the plugin
// holds no parsed LoRA between applies.
type fileCache struct {
	mu    sync.Mutex
	files map[string]cachedFile
	timer *time.Timer
}

// fileCacheTTL is how long a plan's parsed files wait for their apply.
const fileCacheTTL = 30 * time.Second

type cachedFile struct {
	id fileID
	f  *lora.File
}

// fileID is what os.Stat says of a file, to tell an unchanged file.
type fileID struct {
	dev, ino uint64
	size     int64
	mod      time.Time
}

func statID(path string) (fileID, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, false
	}
	id := fileID{size: fi.Size(), mod: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id, true
}

// parse returns path parsed, from the cache when the plan before this call
// parsed it and it is unchanged (the entry is taken out), else from disk,
// with the file's identity as stated before the parse (ok false when the
// stat failed: such a file is not worth keeping).
func (c *fileCache) parse(path string) (f *lora.File, id fileID, ok bool, err error) {
	id, ok = statID(path)
	c.mu.Lock()
	e, hit := c.files[path]
	delete(c.files, path)
	c.mu.Unlock()
	if ok && hit && e.id == id {
		return e.f, id, ok, nil
	}
	f, err = lora.Parse(path)
	return f, id, ok, err
}

// keep replaces the cache with files (path → parsed file), each with its
// identity as stated before it was parsed.
func (c *fileCache) keep(files map[string]cachedFile) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.files = files
	if c.timer != nil {
		c.timer.Stop()
	}
	c.timer = time.AfterFunc(fileCacheTTL, c.clear)
}

func (c *fileCache) clear() {
	c.mu.Lock()
	c.files = nil
	c.mu.Unlock()
}
