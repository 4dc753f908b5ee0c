# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint install cards bench bench-official clean parity-fixtures timm-suite edge-check edge-bench

# One model per family next to its timm peer (SR and COD models at their own sizes); the README's
# benchmark sections, benchmarks/*.{md,csv} and the cards' speed tables are rewritten.
BENCH_MODELS ?= hornet_tiny_7x7 hornet_tiny_gf convnext_tiny sret_tiny deit_tiny_patch16_224 sret_small \
	deit_small_patch16_224 vit_recurrent_small_patch16_224 vit_small_patch16_224 rgt_small_x2@3x64x64 \
	msrnet_pvt_v2_b2 pvt_v2_b2
BENCH_BACKENDS ?= eager,compile,onnxruntime
# Training steps (forward, backward, AdamW) at batch 16: fp32 and bf16 autocast, contiguous and channels_last.
TRAIN_BENCH_MODELS ?= hornet_tiny_7x7 convnext_tiny sret_small deit_small_patch16_224 \
	vit_recurrent_small_patch16_224 vit_small_patch16_224
BENCH := $(BIN)/recurzoo bench --overwrite

# pip installs torch and torchvision at the pinned versions (constraints.txt), which these machines
# serve from a local cache, and the project editable, with the test and edge (ExecuTorch) extras.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[test,edge]'
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/recurzoo demo

# import-linter reads the package from disk; the code folders are mapped into it on installation, so
# the check runs on a copy laid out as installed.
lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/layers && mkdir -p build/layers && cp -r recurzoo build/layers/
	for folder in backbones heads train export; do cp -r $$folder build/layers/recurzoo/; done
	cd build/layers && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider -q -n 2 --dist loadfile

# The parity fixtures under tests/parity/fixtures, from the authors' code checked out in OFFICIAL_ROOT
# (HorNet, SReT, RGT, MSRNet, ZoomNeXt at the commits listed in tests/parity/generate.py).
parity-fixtures: $(INSTALLED)
	@test -n "$(OFFICIAL_ROOT)" || { echo "make parity-fixtures: set OFFICIAL_ROOT=DIR (the authors' checkouts)" >&2; exit 2; }
	$(BIN)/python tests/parity/generate.py --official-root $(OFFICIAL_ROOT)

# timm's own generic model tests (tests/test_models.py of the installed timm's source distribution, from
# the package index) on every name the zoo adds to timm's registry; TorchScript and pretrained-download
# tests deselected by the plugin in tests/timm_suite. Tens of minutes on 2 cores, so not part of `test`;
# narrow it with e.g. TIMM_SUITE_ARGS='-k hornet_tiny'.
TIMM_SDIST := build/timm-sdist
TIMM_SUITE_ARGS ?=
timm-suite: $(INSTALLED)
	version=$$($(BIN)/python -c 'import timm; print(timm.__version__)') && src=$(TIMM_SDIST)/timm-$$version && \
	if [ ! -f $$src/tests/test_models.py ]; then \
		$(BIN)/python -m pip download --disable-pip-version-check --no-deps --no-binary :all: "timm==$$version" \
			-d $(TIMM_SDIST) && rm -rf $$src.part && mkdir -p $$src.part && \
		tar xzf $(TIMM_SDIST)/timm-$$version.tar.gz -C $$src.part && rm -rf $$src && \
		mv $$src.part/timm-$$version $$src && rm -rf $$src.part; \
	fi && \
	TORCH_BACKEND=recurzoo PYTHONPATH=tests/timm_suite$${PYTHONPATH:+:$$PYTHONPATH} $(BIN)/python -m pytest \
		-p recurzoo_timm_suite -p no:cacheprovider --import-mode=importlib -q -n 2 $$src/tests/test_models.py \
		$(TIMM_SUITE_ARGS)

# A reduced HorNet trained on scikit-learn's handwritten digits, exported as int8 ONNX and int8 ExecuTorch:
# held-out top-1 of each against fp32 (fails beyond 1 point). tests/test_edge.py runs the ONNX half.
edge-check: $(INSTALLED)
	$(BIN)/python -m recurzoo.export.digits --formats onnx,executorch

# Every edge artifact (int8/fp16 ONNX, fp32/int8 ExecuTorch) of one model a family: size, speed against fp32
# onnxruntime, fidelity, peak memory; rewrites benchmarks/edge.{csv,md}, the README's table and the cards.
EDGE_BENCH_MODELS ?= sret_tiny hornet_tiny_gf vit_recurrent_small_patch16_224 rgt_small_x2@3x64x64 \
	msrnet_hornet_tiny_7x7@3x256x256
EDGE_BENCH = $(BIN)/python -m recurzoo.export.edge_bench $(EDGE_BENCH_MODELS) --timeout 1800 --out benchmarks/edge \
	--readme README.md
edge-bench: $(INSTALLED)
	$(EDGE_BENCH)
	$(BIN)/python -m recurzoo.export.cards

cards: $(INSTALLED)
	$(BIN)/python -m recurzoo.export.cards

bench: $(INSTALLED)
	$(BENCH) $(BENCH_MODELS) --batch 1,8 --compare-batch 1 --backends $(BENCH_BACKENDS) --threads 1 --warmup 3 \
		--max-seconds 20 --timeout 1800 --out benchmarks/cpu --readme README.md
	$(BENCH) hornet_base_7x7 rgt@3x64x64 --train-memory --batch 4 --out benchmarks/cpu_train_memory --readme README.md
	$(BENCH) $(TRAIN_BENCH_MODELS) --train --batch 16 --threads 1 --warmup 1 --repeats 3 --max-seconds 60 \
		--timeout 1800 --out benchmarks/cpu_train --readme README.md
	$(BENCH) sret_small vit_recurrent_small_patch16_224 --growth 224,384,512 --out benchmarks/cpu_growth --readme README.md
	$(BENCH) rgt_small_x4 --growth 256,512,1024 --tile 288 --out benchmarks/cpu_growth_tiled --readme README.md
	$(EDGE_BENCH)
	$(BIN)/python -m recurzoo.export.cards

# Ours against the authors' code (unpacked read-only under OFFICIAL_ROOT as HorNet/, SReT/, RGT/), at
# equal weights, interleaved in one process; the outputs are checked to agree before timing.
OFFICIAL_ROOT ?= ../official
bench-official: $(INSTALLED)
	$(BIN)/python benchmarks/official.py --official-root $(OFFICIAL_ROOT) --threads 1 --clock cpu --out benchmarks/official_cpu.md

clean:
	rm -rf $(VENV) build *.egg-info
