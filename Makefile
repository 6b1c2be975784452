# Two commands do all set-up on a fresh machine: `make figures` and `make test` (see README.md).
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard toy_examples/*.ipynb) $(wildcard notebooks/*.ipynb))

# Same threads and hashing on every run, so that printed numbers and figures are stable.
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: install figures lab test unit nbval lint bench clean experiments experiments-clean quick-experiments \
  real-corpus $(NOTEBOOKS:%=run-%) $(ARMS:%=experiments-%)

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Execute every notebook in place (outputs stored, metadata scrubbed); the notebooks write figures/. Two notebooks
# at a time: most of each one's time is the kernel's start and `import torch`, on one core.
figures: $(STAMP)
	@$(MAKE) --no-print-directory -j2 -o $(STAMP) $(NOTEBOOKS:%=run-%)
	@echo "figures/ is up to date"

# jupyter_config.py says what is stored (outputs, the python3 kernelspec, the language's name; no run-dependent
# metadata), merges split streams, and has the kernels use encrypted transport.
$(NOTEBOOKS:%=run-%): run-%: $(STAMP)
	$(BIN)/jupyter nbconvert --config=$(CURDIR)/jupyter_config.py --to notebook --execute --inplace --log-level=WARN $*

# JupyterLab on the collection, with the same settings as `make figures` (jupyter_config.py, and the hash and
# backend settings above), so that running a notebook there and saving it leaves git clean. JUPYTER_ARGS passes
# more options, e.g. JUPYTER_ARGS="--no-browser --port 8890".
lab: $(STAMP)
	$(BIN)/jupyter lab --config=$(CURDIR)/jupyter_config.py --ServerApp.root_dir=$(CURDIR) $(JUPYTER_ARGS)

test: lint unit quick-experiments nbval

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The engine's tests once more on the native backend (the fused C++ row kernel, built on first use with the
# machine's C++ compiler): it must pass what the eager engine passes.
NATIVE_TESTS := tests/test_accuracy.py tests/test_divergences.py tests/test_properties.py tests/test_chunked.py \
  tests/test_engine_calls.py tests/test_outliers.py tests/test_misuse.py tests/test_bad_input.py tests/test_gradients.py

unit: $(STAMP)
	$(BIN)/pytest tests
	@if command -v $${CXX:-c++} >/dev/null; then \
	  echo "KDIV_BACKEND=native pytest $(NATIVE_TESTS)"; \
	  KDIV_BACKEND=native $(BIN)/pytest -q -p no:cacheprovider $(NATIVE_TESTS); \
	else \
	  echo "NOTE: no C++ compiler ($${CXX:-c++}): the native backend is not built, and its tests did not run"; \
	fi

nbval: $(STAMP)
ifneq ($(NOTEBOOKS),)
	$(BIN)/pytest -p no:cacheprovider --nbval --nbval-current-env --nbval-cell-timeout=300 \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS)
else
	@echo "no notebooks yet: nothing for nbval"
endif

# `make bench` (about 10 minutes on 2 cores) or `make bench QUICK=1` (one round at N / 4, about 3 minutes)
bench: $(STAMP)
	$(PY) bench/run.py $(if $(QUICK),--quick)

# The KD lab (kdiv.distill). `make experiments` runs (or resumes: finished records are kept) the committed sweep of
# both arms, one process per arm on one thread each; `make experiments-clean experiments` regenerates them from
# scratch. `make quick-experiments` runs the whole pipeline at toy sizes into a temporary folder (part of make test).
ARMS := synthetic real
experiments: $(STAMP)
	@$(MAKE) --no-print-directory -j2 $(ARMS:%=experiments-%)

$(ARMS:%=experiments-%): experiments-%: $(STAMP)
	$(PY) -m kdiv.distill run --arm $* --out experiments/$*

experiments-clean:
	rm -rf $(foreach a,$(ARMS),experiments/$(a)/results.json experiments/$(a)/samples.jsonl experiments/$(a)/cache)

quick-experiments: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m kdiv.distill run --arm synthetic --quick --no-progress --out $$tmp/synthetic && \
	$(PY) -m kdiv.distill run --arm real --quick --no-progress --out $$tmp/real; \
	rc=$$?; rm -rf $$tmp; exit $$rc

# The real arm's data from WordNet 3.0 (Debian: apt-get install wordnet-base); the result is committed.
real-corpus: $(STAMP)
	$(PY) -m kdiv.distill build-corpus --wordnet /usr/share/wordnet --out experiments/real/data/wordnet_nouns.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
