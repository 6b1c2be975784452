# Two commands do all set-up on a fresh machine: `make figures` and `make test` (see README.md).
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard toy_examples/*.ipynb) $(wildcard notebooks/*.ipynb))

# Same threads and hashing on every run, so that printed numbers and figures are stable.
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: install figures test unit nbval lint bench clean $(NOTEBOOKS:%=run-%)

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Execute every notebook in place (outputs stored, metadata scrubbed); the notebooks write figures/.
figures: $(NOTEBOOKS:%=run-%)
	@echo "figures/ is up to date"

$(NOTEBOOKS:%=run-%): run-%: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	  --ClearMetadataPreprocessor.enabled=True --ClearMetadataPreprocessor.preserve_nb_metadata_mask= \
	  --ExecutePreprocessor.timeout=600 $*
	@# A busy machine can split one print into several stream outputs: merge them so the stored bytes are stable.
	$(BIN)/jupyter nbconvert --to notebook --inplace --log-level=WARN \
	  --CoalesceStreamsPreprocessor.enabled=True $*

test: lint unit nbval

lint: $(STAMP)
	$(BIN)/ruff check .

unit: $(STAMP)
	$(BIN)/pytest tests

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
