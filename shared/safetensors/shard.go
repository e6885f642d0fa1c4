package safetensors

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// ShardPlan is how save_pretrained splits tensors above its
// max_shard_size.
type ShardPlan struct {
	// Names are the shard files: base.safetensors for a single shard, else
	// base-0000N-of-0000M.safetensors.
	Names []string
	// Shards hold, per shard, indexes into the planned tensors, groups in
	// name order.
	Shards [][]int
	// Index is base.safetensors.index.json ({"metadata": {"total_size"},
	// "weight_map"}), nil for a single shard.
	Index []byte
}

// PlanShards splits tensors (names and byte sizes) into shards of at most
// maxBytes of tensor data, unless a single group is larger. group names
// the unit that must stay in one shard (a 4-bit weight's tensors; nil:
// each tensor alone). There is always at least one shard.
func PlanShards(base string, names []string, sizes []int64, maxBytes int64, group func(string) string) (ShardPlan, error) {
	if group == nil {
		group = func(n string) string { return n }
	}
	byGroup := map[string][]int{}
	var groups []string
	for i, n := range names {
		g := group(n)
		if _, ok := byGroup[g]; !ok {
			groups = append(groups, g)
		}
		byGroup[g] = append(byGroup[g], i)
	}
	sort.Strings(groups)
	var plan ShardPlan
	var size int64
	for _, g := range groups {
		var n int64
		for _, i := range byGroup[g] {
			n += sizes[i]
		}
		if len(plan.Shards) == 0 || (size > 0 && size+n > maxBytes) {
			plan.Shards, size = append(plan.Shards, nil), 0
		}
		plan.Shards[len(plan.Shards)-1] = append(plan.Shards[len(plan.Shards)-1], byGroup[g]...)
		size += n
	}
	if len(plan.Shards) == 0 {
		plan.Shards = [][]int{nil}
	}
	if len(plan.Shards) == 1 {
		plan.Names = []string{base + ".safetensors"}
		return plan, nil
	}
	weightMap := map[string]string{}
	var total int64
	for k, sh := range plan.Shards {
		name := fmt.Sprintf("%s-%05d-of-%05d.safetensors", base, k+1, len(plan.Shards))
		plan.Names = append(plan.Names, name)
		for _, i := range sh {
			weightMap[names[i]] = name
			total += sizes[i]
		}
	}
	b, err := json.MarshalIndent(map[string]any{"metadata": map[string]any{"total_size": total}, "weight_map": weightMap}, "", "  ")
	if err != nil {
		return ShardPlan{}, err
	}
	plan.Index = append(b, '\n')
	return plan, nil
}

// WriteSharded writes tensors as save_pretrained does above its
// max_shard_size (PlanShards): the shards, and base.safetensors.index.json
// mapping every tensor to its shard; a single shard is written as
// base.safetensors with no index, its tensors in the given order.
func WriteSharded(dir, base string, metadata map[string]string, tensors []WriteTensor, maxBytes int64, group func(string) string) error {
	names := make([]string, len(tensors))
	sizes := make([]int64, len(tensors))
	for i, t := range tensors {
		names[i], sizes[i] = t.Name, int64(len(t.Data))
	}
	plan, err := PlanShards(base, names, sizes, maxBytes, group)
	if err != nil {
		return err
	}
	if plan.Index == nil {
		return WriteFile(filepath.Join(dir, plan.Names[0]), metadata, tensors)
	}
	for k, sh := range plan.Shards {
		ts := make([]WriteTensor, len(sh))
		for j, i := range sh {
			ts[j] = tensors[i]
		}
		if err := WriteFile(filepath.Join(dir, plan.Names[k]), metadata, ts); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(dir, base+".safetensors.index.json"), plan.Index, 0o644)
}
