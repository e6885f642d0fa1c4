package comfyui

import (
	"fmt"
	"image"
	"math"
	"sort"
	"strings"
)

// Values that flow along a graph's links.
type (
	modelVal struct {
		model string // "" until a loader named one
		loras []LoRA
	}
	clipVal struct{}
	vaeVal  struct{}
	condVal struct{ text string }
	// latentVal is an empty latent (images nil) or a sampled one.
	latentVal struct {
		width, height, batch int
		images               []image.Image
	}
	imagesVal []image.Image
)

// input describes one input of a node as /object_info publishes it.
type input struct {
	name     string
	typ      string         // INT, FLOAT, STRING, BOOLEAN, COMBO, or a link type (MODEL…)
	opts     map[string]any // default, min, max, step, multiline, tooltip
	combo    func(s *Server) []string
	optional bool
}

// node is one node class: its /object_info entry and what running it does.
type node struct {
	name, display, category, description string
	inputs                               []input
	outputs, outputNames                 []string
	outputNode                           bool
	// arenahost marks arenahost's own nodes (python_module "arenahost");
	// the others are ComfyUI core names mapped onto arenahost.
	arenahost bool
	run       func(x *execution, id string, in map[string]any) ([]any, map[string]any, error)
}

// maxSeed is ComfyUI's seed limit (2^64-1), published as an integer.
const maxSeed = uint64(math.MaxUint64)

func intIn(name string, def, lo float64, hi any) input {
	return input{name: name, typ: "INT", opts: map[string]any{"default": def, "min": lo, "max": hi}}
}

func floatIn(name string, def, lo, hi, step float64) input {
	return input{name: name, typ: "FLOAT", opts: map[string]any{"default": def, "min": lo, "max": hi, "step": step, "round": 0.01}}
}

func link(name, typ string) input { return input{name: name, typ: typ} }

func seedIn() input {
	in := intIn("seed", 0, 0, maxSeed)
	in.opts["control_after_generate"] = true
	return in
}

func combo(name string, f func(s *Server) []string) input {
	return input{name: name, typ: "COMBO", combo: f, opts: map[string]any{}}
}

func fixed(vals ...string) func(*Server) []string { return func(*Server) []string { return vals } }

func (s *Server) checkpointNames() []string {
	ns, err := s.core.Checkpoints()
	if err != nil {
		s.log.Warn("comfyui: list checkpoints", "err", err)
	}
	if ns == nil {
		ns = []string{}
	}
	return ns
}

func (s *Server) loraNames() []string {
	ns, err := s.core.LoRAs()
	if err != nil {
		s.log.Warn("comfyui: list LoRAs", "err", err)
	}
	if ns == nil {
		ns = []string{}
	}
	return ns
}

// Samplers and schedulers a KSampler may name: the pipelines sample with
// a flow-matching Euler step on the schedule σ = 1 → 0, which is what
// "euler" with "simple" (or "normal") means for a flow model.
var (
	samplerNames   = []string{"euler"}
	schedulerNames = []string{"simple", "normal"}
)

// sizeIn is a latent side: the pipelines take multiples of 16.
func sizeIn(name string) input {
	return input{name: name, typ: "INT", opts: map[string]any{"default": 512.0, "min": 16.0, "max": 2048.0, "step": 16.0}}
}

var nodes = map[string]*node{}

func register(n *node) { nodes[n.name] = n }

func init() {
	// arenahost's own nodes.
	register(&node{name: "ArenahostLoadModel", display: "Load model (arenahost)", category: "arenahost", arenahost: true,
		description: "Loads an NF4 checkpoint into the host's shared arena (once; every process maps the same copy) and selects it.",
		inputs:      []input{combo("model_name", (*Server).checkpointNames)},
		outputs:     []string{"MODEL"}, outputNames: []string{"MODEL"}, run: runLoadModel("model_name")})
	register(&node{name: "ArenahostLoRA", display: "LoRA (arenahost)", category: "arenahost", arenahost: true,
		description: "Adds a LoRA to the model: side mode (exact low-rank side factors, default) or fuse (written into the NF4 bytes, restored byte-exact). Chain nodes for several LoRAs; one chain shares one mode.",
		inputs: []input{link("model", "MODEL"), combo("lora_name", (*Server).loraNames), floatIn("strength", 1, -100, 100, 0.01),
			combo("mode", fixed("side", "fuse"))},
		outputs: []string{"MODEL"}, outputNames: []string{"MODEL"}, run: runLoRA("strength", "mode")})
	register(&node{name: "ArenahostSampler", display: "Sample (arenahost)", category: "arenahost", arenahost: true,
		description: "Runs the host's pipeline plugin (one job per image) and decodes the final latent; previews stream while it runs.",
		inputs: []input{link("model", "MODEL"), {name: "prompt", typ: "STRING", opts: map[string]any{"default": "", "multiline": true}},
			seedIn(), intIn("steps", 20, 1, 1000), sizeIn("width"), sizeIn("height"), intIn("batch_size", 1, 1, 8)},
		outputs: []string{"LATENT"}, outputNames: []string{"LATENT"}, run: runArenahostSampler})
	register(&node{name: "ArenahostDecode", display: "Decode (arenahost)", category: "arenahost", arenahost: true,
		description: "Turns a sampled latent into images (the sampler already decoded them).",
		inputs:      []input{link("samples", "LATENT")},
		outputs:     []string{"IMAGE"}, outputNames: []string{"IMAGE"}, run: runDecode})

	// ComfyUI core names whose meaning maps onto arenahost.
	register(&node{name: "CheckpointLoaderSimple", display: "Load Checkpoint", category: "loaders",
		description: "arenahost: loads the checkpoint into the arena; CLIP and VAE are the pipeline's own.",
		inputs:      []input{combo("ckpt_name", (*Server).checkpointNames)},
		outputs:     []string{"MODEL", "CLIP", "VAE"}, outputNames: []string{"MODEL", "CLIP", "VAE"}, run: runLoadModel("ckpt_name")})
	register(&node{name: "UNETLoader", display: "Load Diffusion Model", category: "advanced/loaders",
		description: "arenahost: loads the checkpoint into the arena; weight_dtype is the checkpoint's own (NF4).",
		inputs:      []input{combo("unet_name", (*Server).checkpointNames), combo("weight_dtype", fixed("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"))},
		outputs:     []string{"MODEL"}, outputNames: []string{"MODEL"}, run: runLoadModel("unet_name")})
	register(&node{name: "LoraLoaderModelOnly", display: "LoraLoaderModelOnly", category: "loaders",
		description: "arenahost: a side-mode LoRA on the model.",
		inputs:      []input{link("model", "MODEL"), combo("lora_name", (*Server).loraNames), floatIn("strength_model", 1, -100, 100, 0.01)},
		outputs:     []string{"MODEL"}, outputNames: []string{"MODEL"}, run: runLoRA("strength_model", "")})
	register(&node{name: "LoraLoader", display: "Load LoRA", category: "loaders",
		description: "arenahost: a side-mode LoRA on the model; the text encoder is the pipeline's own, so strength_clip is not applied.",
		inputs: []input{link("model", "MODEL"), link("clip", "CLIP"), combo("lora_name", (*Server).loraNames),
			floatIn("strength_model", 1, -100, 100, 0.01), floatIn("strength_clip", 1, -100, 100, 0.01)},
		outputs: []string{"MODEL", "CLIP"}, outputNames: []string{"MODEL", "CLIP"}, run: runLoRA("strength_model", "")})
	register(&node{name: "CLIPTextEncode", display: "CLIP Text Encode (Prompt)", category: "conditioning",
		description: "arenahost: the text goes to the pipeline as its prompt.",
		inputs:      []input{{name: "text", typ: "STRING", opts: map[string]any{"multiline": true, "dynamicPrompts": true}}, link("clip", "CLIP")},
		outputs:     []string{"CONDITIONING"}, outputNames: []string{"CONDITIONING"},
		run: func(_ *execution, _ string, in map[string]any) ([]any, map[string]any, error) {
			return []any{condVal{text: in["text"].(string)}}, nil, nil
		}})
	for _, name := range []string{"EmptyLatentImage", "EmptySD3LatentImage"} {
		display := map[string]string{"EmptyLatentImage": "Empty Latent Image", "EmptySD3LatentImage": "EmptySD3LatentImage"}[name]
		register(&node{name: name, display: display, category: "latent",
			description: "arenahost: the size and batch of the images to sample (multiples of 16).",
			inputs:      []input{sizeIn("width"), sizeIn("height"), intIn("batch_size", 1, 1, 8)},
			outputs:     []string{"LATENT"}, outputNames: []string{"LATENT"},
			run: func(_ *execution, _ string, in map[string]any) ([]any, map[string]any, error) {
				return []any{latentVal{width: asInt(in["width"]), height: asInt(in["height"]), batch: asInt(in["batch_size"])}}, nil, nil
			}})
	}
	register(&node{name: "KSampler", display: "KSampler", category: "sampling",
		description: "arenahost: runs the pipeline plugin (flow-matching Euler; cfg and the negative prompt are not used by the pipelines).",
		inputs: []input{link("model", "MODEL"), seedIn(), intIn("steps", 20, 1, 1000), floatIn("cfg", 8, 0, 100, 0.1),
			combo("sampler_name", fixed(samplerNames...)), combo("scheduler", fixed(schedulerNames...)),
			link("positive", "CONDITIONING"), link("negative", "CONDITIONING"), link("latent_image", "LATENT"), floatIn("denoise", 1, 1, 1, 0.01)},
		outputs: []string{"LATENT"}, outputNames: []string{"LATENT"}, run: runKSampler})
	register(&node{name: "VAEDecode", display: "VAE Decode", category: "latent",
		description: "arenahost: the sampled images (the sampler already decoded them).",
		inputs:      []input{link("samples", "LATENT"), link("vae", "VAE")},
		outputs:     []string{"IMAGE"}, outputNames: []string{"IMAGE"}, run: runDecode})
	register(&node{name: "SaveImage", display: "Save Image", category: "image", outputNode: true,
		description: "Saves the images as PNG to the output folder.",
		inputs:      []input{link("images", "IMAGE"), {name: "filename_prefix", typ: "STRING", opts: map[string]any{"default": "ComfyUI"}}},
		outputs:     []string{}, outputNames: []string{}, run: runSave("output")})
	register(&node{name: "PreviewImage", display: "Preview Image", category: "image", outputNode: true,
		description: "Saves the images as PNG to the temp folder.",
		inputs:      []input{link("images", "IMAGE")},
		outputs:     []string{}, outputNames: []string{}, run: runSave("temp")})
}

// tooltips describe inputs by name, as ComfyUI's inputs carry tooltips.
var tooltips = map[string]string{
	"model":          "The model (an NF4 checkpoint in the arena, with its LoRAs).",
	"seed":           "The random seed of the noise (taken modulo 2^63).",
	"steps":          "The number of sampling steps.",
	"cfg":            "Accepted for compatibility; the pipelines do not use classifier-free guidance.",
	"sampler_name":   "The pipelines sample with flow-matching Euler.",
	"scheduler":      "The pipelines' schedule, σ = 1 → 0.",
	"positive":       "The prompt (its text goes to the pipeline).",
	"negative":       "Not used by the pipelines.",
	"latent_image":   "The size and batch to sample.",
	"denoise":        "Must be 1: the pipelines sample from noise.",
	"lora_name":      "A LoRA file under the LoRA directory.",
	"strength":       "How strongly the LoRA modifies the model.",
	"strength_model": "How strongly the LoRA modifies the model.",
	"strength_clip":  "Not applied: the text encoder is the pipeline's own.",
	"mode":           "side: exact low-rank side factors; fuse: written into the NF4 bytes, restored byte-exact.",
	"images":         "The images to save.",
	"samples":        "The sampled latent.",
}

// lists answers each COMBO input's choices once per request: several
// inputs (ckpt_name, unet_name, model_name; every lora_name) list the same
// folder, which would otherwise be walked once per input and node. An
// input name always lists with the same function.
type lists struct {
	s    *Server
	memo map[string][]string
}

func (s *Server) lists() *lists { return &lists{s: s, memo: map[string][]string{}} }

func (l *lists) of(in input) []string {
	if v, ok := l.memo[in.name]; ok {
		return v
	}
	v := in.combo(l.s)
	l.memo[in.name] = v
	return v
}

func (in input) spec(l *lists) []any {
	opts := map[string]any{}
	for k, v := range in.opts {
		opts[k] = v
	}
	tip := tooltips[in.name]
	if tip == "" {
		tip = in.name
	}
	opts["tooltip"] = tip
	if in.typ == "COMBO" {
		return []any{l.of(in), opts}
	}
	return []any{in.typ, opts}
}

// info is a node's /object_info entry.
func (n *node) info(l *lists) map[string]any {
	req, opt := map[string]any{}, map[string]any{}
	var reqOrder, optOrder []string
	for _, in := range n.inputs {
		spec := in.spec(l)
		if in.optional {
			opt[in.name] = spec
			optOrder = append(optOrder, in.name)
		} else {
			req[in.name] = spec
			reqOrder = append(reqOrder, in.name)
		}
	}
	inputs := map[string]any{"required": req}
	order := map[string]any{"required": nonNil(reqOrder)}
	if len(opt) > 0 {
		inputs["optional"], order["optional"] = opt, optOrder
	}
	module := "nodes"
	if n.arenahost {
		module = "arenahost"
	}
	isList := make([]bool, len(n.outputs))
	outTips := make([]string, len(n.outputs))
	for i, o := range n.outputs {
		outTips[i] = "The " + o + "."
	}
	return map[string]any{
		"input": inputs, "input_order": order, "is_input_list": false,
		"output": nonNil(n.outputs), "output_is_list": isList, "output_name": nonNil(n.outputNames), "output_tooltips": outTips,
		"name": n.name, "display_name": n.display, "description": n.description, "python_module": module,
		"category": n.category, "output_node": n.outputNode, "has_intermediate_output": false, "search_aliases": []string{},
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func asInt(v any) int {
	f, _ := v.(float64)
	return int(f)
}

// graphNode is one node of an API-format graph.
type graphNode struct {
	ClassType string         `json:"class_type"`
	Inputs    map[string]any `json:"inputs"`
	Meta      map[string]any `json:"_meta,omitempty"`
}

func (g graphNode) title() string {
	if t, ok := g.Meta["title"].(string); ok && t != "" {
		return t
	}
	return g.ClassType
}

// validation is the outcome of validating a prompt, as ComfyUI answers it.
type validation struct {
	err        *apiError
	outputs    []string       // output node ids that will run
	nodeErrors map[string]any // id → {errors, dependent_outputs, class_type}
}

// validate checks a graph as ComfyUI's validate_prompt does: every node's
// class exists (else missing_node_type naming it), there is an output
// node, and every input of the nodes the outputs depend on is present,
// linked to an output of the right type, or a value within its limits.
// Outputs whose inputs fail are dropped with their node_errors; when none
// remain the prompt is refused.
func (s *Server) validate(g map[string]graphNode) validation {
	ls := s.lists()
	ids := make([]string, 0, len(g))
	for id := range g {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return lessID(ids[i], ids[j]) })
	for _, id := range ids {
		n := g[id]
		if n.ClassType == "" {
			return validation{err: &apiError{Type: "invalid_prompt", Message: "Cannot execute because a node is missing the class_type property.",
				Details: fmt.Sprintf("Node ID '#%s'", id), ExtraInfo: map[string]any{}}}
		}
		if nodes[n.ClassType] == nil {
			return validation{err: &apiError{Type: "missing_node_type",
				Message: fmt.Sprintf("Node '%s' not found. The custom node may not be installed.", n.ClassType),
				Details: fmt.Sprintf("Node ID '#%s'", id),
				ExtraInfo: map[string]any{"node_id": id, "class_type": n.ClassType, "node_title": n.title(),
					"arenahost": "arenahost runs its own nodes and the ComfyUI core nodes whose meaning maps onto it; see GET /object_info and docs/comfyui.md"}}}
		}
	}
	var outputs []string
	for _, id := range ids {
		if nodes[g[id].ClassType].outputNode {
			outputs = append(outputs, id)
		}
	}
	if len(outputs) == 0 {
		return validation{err: &apiError{Type: "prompt_no_outputs", Message: "Prompt has no outputs", Details: "", ExtraInfo: map[string]any{}}}
	}
	v := validation{nodeErrors: map[string]any{}}
	checked := map[string][]map[string]any{}
	var bad []string
	for _, o := range outputs {
		failing := map[string]bool{}
		s.validateNode(ls, g, o, checked, map[string]bool{}, failing)
		if len(failing) == 0 {
			v.outputs = append(v.outputs, o)
			continue
		}
		for id := range failing {
			errs := checked[id]
			if len(errs) == 0 {
				continue
			}
			ne, ok := v.nodeErrors[id].(map[string]any)
			if !ok {
				ne = map[string]any{"errors": errs, "dependent_outputs": []string{}, "class_type": g[id].ClassType}
				v.nodeErrors[id] = ne
			}
			ne["dependent_outputs"] = append(ne["dependent_outputs"].([]string), o)
			for _, e := range errs {
				bad = append(bad, fmt.Sprintf("%s: %s", e["message"], e["details"]))
			}
		}
	}
	if len(v.outputs) == 0 {
		v.err = &apiError{Type: "prompt_outputs_failed_validation", Message: "Prompt outputs failed validation",
			Details: strings.Join(bad, "\n"), ExtraInfo: map[string]any{}}
	}
	return v
}

// validateNode checks id and what it depends on; failing collects the ids
// with errors (or with failing inputs).
func (s *Server) validateNode(ls *lists, g map[string]graphNode, id string, checked map[string][]map[string]any, visiting, failing map[string]bool) bool {
	if errs, ok := checked[id]; ok {
		if len(errs) > 0 || failing[id] {
			failing[id] = true
			return false
		}
		return true
	}
	if visiting[id] {
		checked[id] = []map[string]any{verr("dependency_cycle", "Dependency cycle detected", id, "")}
		failing[id] = true
		return false
	}
	visiting[id] = true
	defer delete(visiting, id)
	n := g[id]
	def := nodes[n.ClassType]
	var errs []map[string]any
	ok := true
	for _, in := range def.inputs {
		val, present := n.Inputs[in.name]
		if !present {
			if !in.optional {
				errs = append(errs, verr("required_input_missing", "Required input is missing", in.name, in.name))
			}
			continue
		}
		if l, isList := val.([]any); isList {
			if len(l) != 2 {
				errs = append(errs, verr("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", in.name, in.name))
				continue
			}
			src := fmt.Sprint(l[0])
			slot, isNum := l[1].(float64)
			up, exists := g[src]
			if !isNum || !exists {
				errs = append(errs, verr("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", in.name, in.name))
				continue
			}
			outs := nodes[up.ClassType].outputs
			if int(slot) < 0 || int(slot) >= len(outs) {
				errs = append(errs, verr("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", in.name, in.name))
				continue
			}
			if got := outs[int(slot)]; got != in.typ {
				errs = append(errs, verr("return_type_mismatch", "Return type mismatch between linked nodes", in.name,
					fmt.Sprintf("%s, received_type(%s) mismatch input_type(%s)", in.name, got, in.typ)))
				continue
			}
			if !s.validateNode(ls, g, src, checked, visiting, failing) {
				ok = false
			}
			continue
		}
		if e := checkValue(ls, in, val); e != nil {
			errs = append(errs, e)
		}
	}
	checked[id] = errs
	if len(errs) > 0 || !ok {
		failing[id] = true
		return false
	}
	return true
}

func verr(typ, msg, input, details string) map[string]any {
	return map[string]any{"type": typ, "message": msg, "details": details, "extra_info": map[string]any{"input_name": input}}
}

// checkValue checks a widget value against its input's type and limits.
func checkValue(l *lists, in input, val any) map[string]any {
	bad := func(typ, msg string) map[string]any {
		e := verr(typ, msg, in.name, in.name)
		e["extra_info"].(map[string]any)["received_value"] = val
		e["extra_info"].(map[string]any)["input_config"] = in.spec(l)
		return e
	}
	switch in.typ {
	case "INT", "FLOAT":
		f, isNum := val.(float64)
		if !isNum {
			return bad("invalid_input_type", fmt.Sprintf("Failed to convert an input value to a %s value", in.typ))
		}
		if in.typ == "INT" && f != math.Trunc(f) {
			return bad("invalid_input_type", "Failed to convert an input value to a INT value")
		}
		if lo, ok := in.opts["min"].(float64); ok && f < lo {
			return bad("value_smaller_than_min", fmt.Sprintf("Value %v smaller than min of %v", val, lo))
		}
		if hi, ok := toFloat(in.opts["max"]); ok && f > hi {
			return bad("value_bigger_than_max", fmt.Sprintf("Value %v bigger than max of %v", val, hi))
		}
		if st, ok := in.opts["step"].(float64); ok && in.typ == "INT" && st == 16 && int(f)%16 != 0 {
			return bad("custom_validation_failed", fmt.Sprintf("Value %v is not a multiple of 16 (the pipelines take multiples of 16)", val))
		}
	case "STRING":
		if _, isStr := val.(string); !isStr {
			return bad("invalid_input_type", "Failed to convert an input value to a STRING value")
		}
	case "COMBO":
		str, _ := val.(string)
		opts := l.of(in)
		for _, o := range opts {
			if o == str {
				return nil
			}
		}
		list := fmt.Sprint(opts)
		if len(opts) > 20 {
			list = fmt.Sprintf("(list of length %d)", len(opts))
		}
		e := bad("value_not_in_list", "Value not in list")
		e["details"] = fmt.Sprintf("%s: '%v' not in %s", in.name, val, list)
		return e
	default: // a link type given a literal
		return bad("bad_linked_input", fmt.Sprintf("Input %s needs a link to a node's %s output", in.name, in.typ))
	}
	return nil
}

// lessID orders node ids numerically when they are numbers.
func lessID(a, b string) bool {
	if len(a) != len(b) && isDigits(a) && isDigits(b) {
		return len(a) < len(b)
	}
	return a < b
}

func isDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return s != ""
}

func toFloat(v any) (float64, bool) {
	switch x := v.(type) {
	case float64:
		return x, true
	case uint64:
		return float64(x), true
	case int:
		return float64(x), true
	}
	return 0, false
}
