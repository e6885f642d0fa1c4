#!/usr/bin/env bash
# make bench: every benchmark runs its baseline in the same run and prints the
# ratio. Figures go to bench/out/ and, by hand with the machine's description,
# into bench/results.md.
#
# BENCH_ONLY=name1,name2 runs a subset (names are the section names below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TORCH=${ARENAHOST_TORCH_PYTHON:-.venv-torch/bin/python}
out=bench/out
mkdir -p "$out"

want() { [ -z "${BENCH_ONLY:-}" ] || [[ ",$BENCH_ONLY," == *",$1,"* ]]; }
section() { printf '\n=== %s\n' "$1"; }
gobench() { # gobench NAME PKG REGEX BENCHTIME
  go test -run '^$' -bench "$3" -benchtime "$4" -count 1 "$2" | tee "$out/$1.txt"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "go: $(go version | cut -d' ' -f3)  date: $(date -u +%FT%TZ)"

if want nf4; then
  section "nf4: quantize/dequantize throughput, Go vs bitsandbytes CPU (torch) on the same data"
  gobench nf4 ./shared/nf4 '^Benchmark(Quantize|QuantizeNested|Dequantize)$' 3x
  "$PY_TORCH" shared/nf4/testdata/bench_bnb.py --go "$out/nf4.txt"
fi

if want merge; then
  section "merge: fused merge --as nf4 (340M-param Flux block, rank-16 LoRAs) vs NumPy/OpenBLAS, and the delta phase vs the machine's SGEMM"
  PY=${ARENAHOST_PYTHON:-.venv/bin/python}
  [[ $PY == /* ]] || PY=$PWD/$PY # the test runs in its package directory
  ARENAHOST_PYTHON=$PY go test ./bench/merge -run '^$' -bench . -benchtime 1x -timeout 60m | tee "$out/merge.txt"
  go test ./shared/lora -run '^$' -bench '^BenchmarkDeltaRows$' -benchtime 3x -count 1 | tee "$out/delta.txt"
fi

if want load; then
  section "load: ~1 GiB NF4 checkpoint into the arena vs reading the file once (floor)"
  gobench load ./host/registry '^BenchmarkLoad$' 2x
fi

if want load-sharded; then
  section "load-sharded: the same NF4 checkpoint from one file and from a diffusers folder of 64 MiB shards + index"
  gobench load-sharded ./host/registry '^BenchmarkLoadSharded$' 8x
fi

if want device-load; then
  section "device-load: ~256 MiB NF4 checkpoint into cuda-sim, one host copy per chunk vs two, and the load CRC's cost"
  gobench device-load ./host/registry '^BenchmarkDeviceLoad$' 3x
fi

if want invoke; then
  section "invoke: 1 GiB tensor by descriptor vs the same bytes over gRPC; round-trip p50/p99"
  gobench invoke ./sdk '^BenchmarkInvoke1GiB$' 1x
  gobench roundtrip ./sdk '^BenchmarkInvokeRoundTrip$' 2000x
  gobench plugin ./host/plugin '^Benchmark(InvokeGo|InvokePython)$' 500x
  gobench swap ./host/plugin '^BenchmarkSwap$' 10x
fi

if want arena; then
  section "arena: alloc/free churn"
  gobench arena ./host/arena '^BenchmarkAllocFree' 1s
fi

if want preview; then
  section "preview: latent-to-frame render and encode (Flux 1024², factor method)"
  gobench preview ./plugins/preview/render '^Benchmark(RenderFlux|Encode)$' 1s
fi

if want jobs; then
  section "jobs: publish-to-frame latency (Flux 1024² latents) and step time with previews on vs off"
  gobench jobs ./host/job '^Benchmark(PublishToFrame|StepOverhead|PublishCall)$' 1x 2>&1 | grep -v ' INFO '
fi

if want pipeline; then
  section "pipeline: diffusers Flux step time, PEFT on bitsandbytes vs arenahost side mode vs no LoRA"
  "$PY_TORCH" bench/pipeline/bench_pipeline.py --steps 4 --size 256 --rounds 5 | tee "$out/pipeline.txt"
fi

if want comfyui; then
  section "comfyui: ComfyUI step time and memory, the arenahost pack's side mode (3 LoRAs) vs ComfyUI's own LoRA loader on the dequantized model"
  PYTHONPATH="$PWD/sdk/python:$PWD/sdk/comfyui${PYTHONPATH:+:$PYTHONPATH}" "${ARENAHOST_COMFY_PYTHON:-.venv-comfy/bin/python}" \
    bench/comfyui/bench_comfyui.py --rounds 5 2>&1 | grep -v 'setup plugin' | tee "$out/comfyui.txt"
fi

if want multilora; then
  section "multilora: 5 rank-16 LoRAs on a Flux-dev-width slice (2 double + 4 single blocks) end to end: side apply, fused apply, fused re-apply, remove; baseline = files parsed one by one and the journal restored from the model file"
  go test ./host/lora/peftbench -run '^$' -bench '^BenchmarkMultiLoRA$' -benchtime 1x -timeout 60m | tee "$out/multilora.txt"
fi

if want lora; then
  section "lora: fuse/side/remove on a 0.62 B Flux slice vs PEFT's merge into bitsandbytes Linear4bit (slow: the baseline takes ~20 min)"
  go test ./host/lora/peftbench -run '^$' -bench . -benchtime 1x -timeout 60m | tee "$out/lora.txt"
fi
