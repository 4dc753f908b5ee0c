# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test install cards bench clean

# One model per family next to its timm peer; the README table between the bench markers is rewritten.
BENCH_MODELS ?= hornet_tiny_7x7 hornet_tiny_gf convnext_tiny sret_tiny sret_small deit_tiny_patch16_224 \
	deit_small_patch16_224 rvit_small_patch16_224 vit_small_patch16_224
BENCH_BACKENDS ?= eager,compile,onnxruntime

# pip installs torch and torchvision at the pinned versions (constraints.txt), which these machines
# serve from a local cache, and the project editable, with the test extras.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/recurzoo demo

test: $(INSTALLED)
	$(BIN)/python -m pytest -p no:cacheprovider -q -n 2 --dist loadfile

cards: $(INSTALLED)
	$(BIN)/python -m recurzoo.export.cards

bench: $(INSTALLED)
	$(BIN)/recurzoo bench $(BENCH_MODELS) --batch 1,8 --backends $(BENCH_BACKENDS) \
		--out benchmarks/cpu --readme README.md

clean:
	rm -rf $(VENV) build *.egg-info
