package safetensors

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// WriteSharded writes tensors as save_pretrained does above its
// max_shard_size: base-0000N-of-0000M.safetensors, each at most maxBytes of
// tensor data unless a single group is larger, and base.safetensors.index
// .json mapping every tensor to its shard; a single shard is written as
// base.safetensors with no index. group names the unit that must stay in
// one shard (a 4-bit weight's tensors; nil: each tensor alone). Groups go
// in name order.
func WriteSharded(dir, base string, metadata map[string]string, tensors []WriteTensor, maxBytes int64, group func(string) string) error {
	if group == nil {
		group = func(n string) string { return n }
	}
	byGroup := map[string][]WriteTensor{}
	var names []string
	for _, t := range tensors {
		g := group(t.Name)
		if _, ok := byGroup[g]; !ok {
			names = append(names, g)
		}
		byGroup[g] = append(byGroup[g], t)
	}
	sort.Strings(names)
	var shards [][]WriteTensor
	var size int64
	for _, g := range names {
		var n int64
		for _, t := range byGroup[g] {
			n += int64(len(t.Data))
		}
		if len(shards) == 0 || (size > 0 && size+n > maxBytes) {
			shards, size = append(shards, nil), 0
		}
		shards[len(shards)-1] = append(shards[len(shards)-1], byGroup[g]...)
		size += n
	}
	if len(shards) <= 1 {
		return WriteFile(filepath.Join(dir, base+".safetensors"), metadata, tensors)
	}
	weightMap := map[string]string{}
	var total int64
	for i, sh := range shards {
		name := fmt.Sprintf("%s-%05d-of-%05d.safetensors", base, i+1, len(shards))
		if err := WriteFile(filepath.Join(dir, name), metadata, sh); err != nil {
			return err
		}
		for _, t := range sh {
			weightMap[t.Name] = name
			total += int64(len(t.Data))
		}
	}
	b, err := json.MarshalIndent(map[string]any{"metadata": map[string]any{"total_size": total}, "weight_map": weightMap}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, base+".safetensors.index.json"), append(b, '\n'), 0o644)
}
