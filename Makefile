# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test install cards clean

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
	$(BIN)/python -m pytest -p no:cacheprovider -q

cards: $(INSTALLED)
	$(BIN)/python -m recurzoo.export.cards

clean:
	rm -rf $(VENV) build *.egg-info
