// Package peftbench compares arenahost's LoRA paths with the baseline UIs
// use today: PEFT's merge into bitsandbytes Linear4bit layers on the CPU
// (peft_baseline.py, torch environment), on the same NF4 model and the same
// kohya LoRA files. Run it with
//
//	ARENAHOST_TORCH_PYTHON=.venv-torch/bin/python go test ./host/lora/peftbench -run '^$' -bench . -benchtime 1x -timeout 30m
//
// (make bench sets the interpreter). It lives under host/ because it measures
// the host itself (server, registry, coordinator, arena); the baseline script
// and the recorded results stay in bench/lora. The model is a Flux-width slice: one
// double and two single blocks at hidden 3072, MLP 12288 (about 0.62 B
// parameters, NF4, blocksize 64), with rank-16 kohya LoRAs on every block
// Linear; ARENAHOST_BENCH_SMALL=1 uses the small sample model instead, for
// a quick check. Generated files are cached under the user cache directory.
package peftbench
