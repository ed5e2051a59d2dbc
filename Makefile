# Two commands: `make demo` (set up, run the default pretraining) and `make test` (set up, run the tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup demo test eval-demo mutation clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# --no-compile: byte-compile on first import instead of every file of torch & co. now (half the install time)
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.stamp-*
	@touch $@

demo: setup
	$(BIN)/python launch/pretrain.py

test: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest $(PYTEST_ARGS)

# 5 seeds, two pretrainings at a time on 2 cores: 0.74x the time the old 3-seed default took (docs/EVIDENCE.md)
eval-demo: setup
	OMP_NUM_THREADS=2 $(BIN)/python launch/eval_demo.py

# The mutation score of the arithmetic and resume rules every run depends on (not in CI; about 2 min on 2 cores):
# mutmut mutates them, the fast unit and property tests must notice; docs/TESTING.md lists the score and survivors
MUTATE := "mff_ds.engine.batch*" "mff_ds.engine.schedule*" "mff_ds.engine.compat*" "mff_ds.eval.lars*" \
          "mff_ds.data.sources.x_rank_indices*"
mutation: setup
	$(BIN)/python -m pip install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run $(MUTATE) > /dev/null
	$(BIN)/mutmut results --all true | $(BIN)/python tests/mutation_report.py

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
