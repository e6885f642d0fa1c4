package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Container says how a model's tensors are packaged on disk.
type Container string

// The containers OpenSet accepts.
const (
	// ContainerFile is one .safetensors file.
	ContainerFile Container = "file"
	// ContainerModelFolder is a diffusers/transformers model folder:
	// config.json beside one weights file or an index of shards.
	ContainerModelFolder Container = "model-folder"
	// ContainerPipelineFolder is a diffusers pipeline folder
	// (model_index.json); its transformer/ or unet/ component is the model.
	ContainerPipelineFolder Container = "pipeline-folder"
)

// Weight file and index names diffusers (diffusion_pytorch_model…) and
// transformers (model…) write with save_pretrained.
var weightNames = []string{"diffusion_pytorch_model", "model"}

// pipelineComponents are the folders of a pipeline that hold the denoiser,
// in order of preference.
var pipelineComponents = []string{"transformer", "unet"}

// Set is a model's tensors across one or more safetensors files: a single
// file, or the shards of a diffusers model folder, each mapped read-only in
// place (Open), never copied or concatenated. Tensor names are unique
// across the set; every accessor routes a name to the shard that holds it.
// Like File, a Set is safe for concurrent readers and Close must not race
// with them.
type Set struct {
	// Path is the path given to OpenSet: a file or a folder.
	Path      string
	Container Container
	// Dir is the model folder (the pipeline's component folder) holding
	// config.json; "" for a bare file.
	Dir string
	// Component is the pipeline component used ("transformer", "unet"); ""
	// outside pipeline folders.
	Component string
	// Config is config.json as read (nil for a bare file or a folder
	// without one); ConfigPath names it.
	Config     []byte
	ConfigPath string
	// Index is the shard index file ("" when unsharded).
	Index string
	// Files are the shards, in the order of their names.
	Files []*File
	// Tensors are every tensor, shard by shard, each shard's in data order.
	Tensors []TensorInfo
	// Metadata is the first shard's __metadata__.
	Metadata map[string]string
	// Components are a pipeline folder's other components whose tensors
	// the set carries beside the model's, each under its own name prefix
	// (AddComponent); nil unless a caller added some.
	Components []*SetComponent

	at     map[string]int   // tensor name → index in Tensors
	fileOf map[string]*File // tensor name → its shard
	root   string           // resolved confinement root (Within); "" = none
}

// ErrOutsideRoot is the error (wrapped) of a file a folder model opens
// whose real path (symlinks resolved) leaves the confinement root given
// with Within. Callers answer it as the caller's bad input, like
// ErrBadPath.
var ErrOutsideRoot = errors.New("leaves the models folder")

// Option adjusts how OpenSet opens a model.
type Option func(*setOptions)

type setOptions struct{ root string }

// Within confines every file OpenSet (and AddComponent, ReadSide) opens for
// the model to root: each file's path, with every symlink resolved
// (filepath.EvalSymlinks), must lie inside root (resolved the same way),
// or the open fails with an error naming the file, wrapping
// ErrOutsideRoot. A folder model's shards, index, config.json and
// component folders are all checked, not only the top-level path, so a
// crafted folder cannot reach files outside root through symlinks;
// symlinks that stay inside root (a Hugging Face cache's
// snapshots/<rev>/x -> ../../blobs/<sha>) are followed as usual. An empty
// root means no confinement.
func Within(root string) Option {
	return func(o *setOptions) { o.root = root }
}

// Confine checks that path, its symlinks resolved, lies inside the set's
// confinement root (Within); it returns nil when the set has none. A path
// that cannot be resolved returns the resolver's error (os.ErrNotExist for
// a missing file), so the caller treats it as it would the open's.
func (s *Set) Confine(path string) error {
	if s.root == "" {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return err
		}
		return fmt.Errorf("%w: %w", ErrBadPath, err)
	}
	if !inside(s.root, real) {
		return fmt.Errorf("%s resolves to %s, which %w %s", path, real, ErrOutsideRoot, s.root)
	}
	return nil
}

// inside reports whether p is root or below it (both absolute, clean).
func inside(root, p string) bool {
	rel, err := filepath.Rel(root, filepath.Clean(p))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel)
}

// open opens one safetensors file of the set after Confine.
func (s *Set) open(path string) (*File, error) {
	if err := s.Confine(path); err != nil {
		return nil, fmt.Errorf("open safetensors: %w", err)
	}
	return Open(path)
}

// ReadSide reads a JSON side file of the set's model (ReadSmallRegular)
// after Confine.
func (s *Set) ReadSide(path string) ([]byte, error) {
	if err := s.Confine(path); err != nil {
		return nil, err
	}
	return ReadSmallRegular(path)
}

// ErrNoWeights is the error (wrapped) of a folder that holds no
// safetensors weights under the names save_pretrained writes.
var ErrNoWeights = errors.New("no weights")

// SetComponent is a pipeline component folder (a text encoder, the VAE)
// whose weights a Set carries beside the model's.
type SetComponent struct {
	// Folder is the component's folder name in the pipeline
	// ("text_encoder"), Dir its path, Prefix what its tensor names are
	// given in the set ("text_encoders.clip_l.transformer." + name).
	Folder, Dir, Prefix string
	// Index is its shard index file ("" when unsharded); Files its shards.
	Index string
	Files []*File
	// Tensors is how many tensors it added.
	Tensors int
}

// OpenSet opens the model at path: a .safetensors file, a model folder
// (config.json + diffusion_pytorch_model.safetensors or model.safetensors,
// or their .index.json and shards) or a pipeline folder (model_index.json
// with a transformer/ or unet/ component). A sharded folder's index is
// validated against the shards' own headers: every tensor the index names
// is in exactly the shard it says, no shard holds a tensor the index does
// not name or one another shard holds too, no shard is missing, and no
// shard name leaves the folder. Errors name the folder, index and shard at
// fault. Within confines every file it opens to a root folder.
func OpenSet(path string, opts ...Option) (*Set, error) {
	var o setOptions
	for _, opt := range opts {
		opt(&o)
	}
	root := ""
	if o.root != "" {
		abs, err := filepath.Abs(o.root)
		if err == nil {
			root, err = filepath.EvalSymlinks(abs)
		}
		if err != nil {
			return nil, fmt.Errorf("open model %s: models folder %s: %w", path, o.root, err)
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open model: %w", err)
	}
	if !st.IsDir() {
		s := &Set{Path: path, Container: ContainerFile, root: root}
		f, err := s.open(path)
		if err != nil {
			return nil, err
		}
		s.add(f)
		return s, nil
	}
	s := &Set{Path: path, Container: ContainerModelFolder, Dir: path, root: root}
	if _, err := os.Stat(filepath.Join(path, "model_index.json")); err == nil {
		s.Container = ContainerPipelineFolder
		for _, c := range pipelineComponents {
			if st, err := os.Stat(filepath.Join(path, c)); err == nil && st.IsDir() {
				s.Component, s.Dir = c, filepath.Join(path, c)
				break
			}
		}
		if s.Component == "" {
			return nil, fmt.Errorf("open model %s: pipeline folder (model_index.json) without a %s/ component folder", path, strings.Join(pipelineComponents, "/ or "))
		}
	}
	if err := s.openFolder(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// ModelFiles is how many of Files hold the model itself (the rest are its
// Components' files).
func (s *Set) ModelFiles() int {
	n := len(s.Files)
	for _, c := range s.Components {
		n -= len(c.Files)
	}
	return n
}

// AddComponent opens the model folder dir (config.json beside one weights
// file or an index of shards, validated as OpenSet validates a folder) and
// adds its tensors to the set as prefix + their name, read in place from
// their own files like the model's. A folder without safetensors weights
// is an error wrapping ErrNoWeights (the caller may leave it to another
// loader); a name the set already holds is an error naming both files. On
// error the set is unchanged.
func (s *Set) AddComponent(folder, dir, prefix string) error {
	sub := &Set{Path: dir, Container: ContainerModelFolder, Dir: dir, root: s.root}
	if err := sub.openFolder(); err != nil {
		_ = sub.Close()
		return fmt.Errorf("component %s/: %w", folder, err)
	}
	for _, t := range sub.Tensors {
		if _, dup := s.at[prefix+t.Name]; dup {
			a, _ := s.FileOf(prefix + t.Name)
			b, _ := sub.FileOf(t.Name)
			_ = sub.Close()
			return fmt.Errorf("component %s/: tensor %s of %s is named %s in the model, which %s already holds", folder, t.Name, b.Path, prefix+t.Name, a.Path)
		}
	}
	if s.at == nil {
		s.at, s.fileOf = map[string]int{}, map[string]*File{}
	}
	for _, t := range sub.Tensors {
		f := sub.fileOf[t.Name]
		t.Name = prefix + t.Name
		s.at[t.Name] = len(s.Tensors)
		s.Tensors = append(s.Tensors, t)
		s.fileOf[t.Name] = f
	}
	s.Files = append(s.Files, sub.Files...)
	s.Components = append(s.Components, &SetComponent{Folder: folder, Dir: dir, Prefix: prefix, Index: sub.Index, Files: sub.Files, Tensors: len(sub.Tensors)})
	return nil
}

func (s *Set) openFolder() error {
	cfg := filepath.Join(s.Dir, "config.json")
	if b, err := s.ReadSide(cfg); err == nil {
		if !json.Valid(b) {
			return fmt.Errorf("open model %s: %s is not valid JSON", s.Path, cfg)
		}
		s.Config, s.ConfigPath = b, cfg
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open model %s: %w", s.Path, err)
	}
	for _, base := range weightNames {
		single := filepath.Join(s.Dir, base+".safetensors")
		index := single + ".index.json"
		_, errS := os.Stat(single)
		_, errI := os.Stat(index)
		switch {
		case errS == nil && errI == nil:
			return fmt.Errorf("open model %s: both %s and the shard index %s; remove the one that is stale", s.Path, filepath.Base(single), filepath.Base(index))
		case errS == nil:
			f, err := s.open(single)
			if err != nil {
				return err
			}
			s.add(f)
			return nil
		case errI == nil:
			s.Index = index
			return s.openShards()
		}
	}
	var want []string
	for _, b := range weightNames {
		want = append(want, b+".safetensors", b+".safetensors.index.json")
	}
	return fmt.Errorf("open model %s: %w in %s (looked for %s)", s.Path, ErrNoWeights, s.Dir, strings.Join(want, ", "))
}

// shardIndex is the index save_pretrained writes beside the shards.
type shardIndex struct {
	Metadata  map[string]any    `json:"metadata"`
	WeightMap map[string]string `json:"weight_map"`
}

func (s *Set) openShards() error {
	b, err := s.ReadSide(s.Index)
	if err != nil {
		return fmt.Errorf("open model %s: %w", s.Path, err)
	}
	var idx shardIndex
	if err := json.Unmarshal(b, &idx); err != nil {
		return fmt.Errorf("open model %s: index %s: %w", s.Path, s.Index, err)
	}
	if len(idx.WeightMap) == 0 {
		return fmt.Errorf("open model %s: index %s has no weight_map entries", s.Path, s.Index)
	}
	byShard := map[string][]string{}
	for tensor, shard := range idx.WeightMap {
		if !filepath.IsLocal(shard) || strings.ContainsAny(shard, `/\`) || shard != filepath.Clean(shard) {
			return fmt.Errorf("open model %s: index %s puts tensor %s in %q, which is not a file name inside the folder", s.Path, s.Index, tensor, shard)
		}
		byShard[shard] = append(byShard[shard], tensor)
	}
	shards := make([]string, 0, len(byShard))
	for sh := range byShard {
		shards = append(shards, sh)
	}
	sort.Strings(shards)
	holder := map[string]string{} // tensor → shard that holds it
	for _, sh := range shards {
		p := filepath.Join(s.Dir, sh)
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("open model %s: shard %s named by index %s (for %d tensors, e.g. %s): %w", s.Path, sh, filepath.Base(s.Index), len(byShard[sh]), byShard[sh][0], err)
		}
		f, err := s.open(p)
		if err != nil {
			return fmt.Errorf("open model %s: shard %s: %w", s.Path, sh, err)
		}
		s.add(f)
		for _, t := range f.Tensors {
			if other, dup := holder[t.Name]; dup {
				return fmt.Errorf("open model %s: tensor %s is in two shards, %s and %s", s.Path, t.Name, other, sh)
			}
			holder[t.Name] = sh
		}
	}
	for _, f := range s.Files {
		sh := filepath.Base(f.Path)
		for _, t := range f.Tensors {
			want, ok := idx.WeightMap[t.Name]
			switch {
			case !ok:
				return fmt.Errorf("open model %s: shard %s holds tensor %s, which index %s does not name", s.Path, sh, t.Name, filepath.Base(s.Index))
			case want != sh:
				return fmt.Errorf("open model %s: shard %s holds tensor %s, which index %s puts in %s", s.Path, sh, t.Name, filepath.Base(s.Index), want)
			}
		}
	}
	var missing []string
	for tensor, sh := range idx.WeightMap {
		if holder[tensor] != sh {
			missing = append(missing, tensor+" (in "+sh+")")
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		more := ""
		if len(missing) > 5 {
			more, missing = fmt.Sprintf(" and %d more", len(missing)-5), missing[:5]
		}
		return fmt.Errorf("open model %s: index %s names tensors its shards do not hold: %s%s", s.Path, filepath.Base(s.Index), strings.Join(missing, ", "), more)
	}
	return nil
}

// add appends a shard's tensors. Callers check uniqueness of names across
// shards (openShards); a single file's names are unique by its header.
func (s *Set) add(f *File) {
	if s.at == nil {
		s.at, s.fileOf = map[string]int{}, map[string]*File{}
	}
	if len(s.Files) == 0 {
		s.Metadata = f.Metadata
	}
	s.Files = append(s.Files, f)
	for _, t := range f.Tensors {
		if _, dup := s.at[t.Name]; dup {
			continue
		}
		s.at[t.Name] = len(s.Tensors)
		s.Tensors = append(s.Tensors, t)
		s.fileOf[t.Name] = f
	}
}

// Lookup returns the tensor called name.
func (s *Set) Lookup(name string) (TensorInfo, bool) {
	i, ok := s.at[name]
	if !ok {
		return TensorInfo{}, false
	}
	return s.Tensors[i], true
}

// FileOf returns the shard that holds tensor name.
func (s *Set) FileOf(name string) (*File, bool) {
	f, ok := s.fileOf[name]
	return f, ok
}

// Evict drops the named tensor's mapped pages from the resident set (see
// File.Evict), in whichever shard holds it; an unknown name is a no-op.
func (s *Set) Evict(name string) error {
	f, ok := s.FileOf(name)
	if !ok {
		return nil
	}
	t, _ := s.Lookup(name) // a component's tensor is named otherwise in its file
	return f.evict(t)
}

// shard returns the shard holding tensor name.
func (s *Set) shard(name string) (*File, error) {
	if f, ok := s.fileOf[name]; ok {
		return f, nil
	}
	return nil, &Error{File: s.Path, Key: name, Err: errors.New("no such tensor")}
}

// Data returns tensor name's bytes as a slice of its shard's mapping
// (File.Data).
func (s *Set) Data(name string) ([]byte, error) {
	f, err := s.shard(name)
	if err != nil {
		return nil, err
	}
	t, _ := s.Lookup(name) // a component's tensor is named otherwise in its file
	return f.TensorData(t)
}

// ReadTensor is File.ReadTensor on t's shard.
func (s *Set) ReadTensor(t TensorInfo, fn func(data []byte) error) error {
	f, err := s.shard(t.Name)
	if err != nil {
		return err
	}
	return f.ReadTensor(t, fn)
}

// CopyTensor is File.CopyTensor on t's shard.
func (s *Set) CopyTensor(dst []byte, t TensorInfo) error {
	f, err := s.shard(t.Name)
	if err != nil {
		return err
	}
	return f.CopyTensor(dst, t)
}

// Unchanged reports whether every shard is Unchanged.
func (s *Set) Unchanged() bool {
	for _, f := range s.Files {
		if !f.Unchanged() {
			return false
		}
	}
	return len(s.Files) > 0
}

// AdviseSequential advises every shard's mapping (File.AdviseSequential).
func (s *Set) AdviseSequential() error {
	var errs []error
	for _, f := range s.Files {
		errs = append(errs, f.AdviseSequential())
	}
	return errors.Join(errs...)
}

// FileBytes is the shards' total size on disk.
func (s *Set) FileBytes() int64 {
	var n int64
	for _, f := range s.Files {
		n += int64(len(f.mapping))
	}
	return n
}

// Close unmaps every shard.
func (s *Set) Close() error {
	var errs []error
	for _, f := range s.Files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// TensorData is File.TensorData on t's shard.
func (s *Set) TensorData(t TensorInfo) ([]byte, error) {
	f, err := s.shard(t.Name)
	if err != nil {
		return nil, err
	}
	return f.TensorData(t)
}

// maxSideFile bounds config.json and a shard index: both are small JSON.
const maxSideFile = 64 << 20

// ReadSmallRegular reads a folder's JSON side file (config.json, a shard
// index, model_index.json) through OpenRegular, so a FIFO, device or
// directory in its place is a bad_path at once instead of a hang, and a
// file over 64 MiB is refused instead of read.
func ReadSmallRegular(path string) ([]byte, error) {
	f, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSideFile+1))
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: path, Err: err}
	}
	if len(b) > maxSideFile {
		return nil, fmt.Errorf("%s: over %d bytes, too large for a JSON side file", path, maxSideFile)
	}
	return b, nil
}
