# Every target bootstraps what it needs: uv (installed with pip when missing), then the locked
# environment (uv sync --frozen), then the job itself.
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PYTEST_ARGS ?=

.PHONY: demo test test-all bench results lint format bootstrap

bootstrap:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo: bootstrap
	$(UV) run fedlit fit --config configs/quickstart.yaml

test: bootstrap
	$(UV) run pytest -m "not slow and not gpu" --durations=15 $(PYTEST_ARGS)

test-all: bootstrap
	$(UV) run pytest $(PYTEST_ARGS)

# Round-loop benchmark (benchmarks/, results in docs/performance.md); BENCH_ARGS narrows it,
# e.g. make bench BENCH_ARGS="--models cnn --clients 10 --ranks 1".
BENCH_ARGS ?=
bench: bootstrap
	$(UV) run python -m benchmarks.run_all $(BENCH_ARGS)

# The runs and figures of docs/results.md (benchmarks/reproduce.py): PAPER is fedpart, fedmr,
# lips, probes or all; JOBS rows run at once, one CPU thread each. Finished rows are kept,
# interrupted ones resume; finished rows are archived in docs/results/runs (committed), from
# which RESULTS_ARGS=--figures_only redraws on a clone that never ran them.
PAPER ?= all
JOBS ?= 2
RESULTS_ARGS ?=
results: bootstrap
	$(UV) run python -m benchmarks.reproduce $(PAPER) --jobs $(JOBS) $(RESULTS_ARGS)

lint: bootstrap
	$(UV) run ruff check fedlit callbacks tests benchmarks
	$(UV) run ruff format --check fedlit callbacks tests benchmarks

format: bootstrap
	$(UV) run ruff format fedlit callbacks tests benchmarks
	$(UV) run ruff check --fix fedlit callbacks tests benchmarks
