# nbtrain — `make demo` runs a real %%bigtrain training headless; `make test` runs every test.
# Both set up .venv themselves (Debian packages, torch's CPU wheel, the project).

PY      := .venv/bin/python
STAMP   := .venv/.nbtrain-installed
PYTEST  := $(PY) -m pytest -p no:cacheprovider
# pytest exits 5 when a phase has no tests yet: say so instead of failing the phase.
NOTESTS := || { rc=$$?; [ $$rc = 5 ] && echo "(no tests in this phase)" || exit $$rc; }

.PHONY: setup environment run-ops ops demo test lint test-unit test-integration test-integration-hosts test-integration-others test-notebooks test-browser test-package test-gpu bench notebooks clean

$(STAMP): pyproject.toml .ci/setup-env
	.ci/setup-env
	@touch $@

# DeepSpeed's CPU ops, built once in one process: two ranks building the same op at once can
# fail. Steps of their own, so that `make test` can build them alongside other work: run-ops
# (those every CPU run loads) alongside lint and the unit tests, which need only the environment;
# ops adds NVMe offload's async_io (2/3 of the build), which a run builds on first use otherwise.
RUN_OPS_STAMP := .venv/.nbtrain-run-ops-built
OPS_STAMP     := .venv/.nbtrain-ops-built
$(RUN_OPS_STAMP): $(STAMP)
	$(PY) -m nbtrain.launch.ops --without-nvme
	@touch $@

$(OPS_STAMP): $(RUN_OPS_STAMP)
	$(PY) -m nbtrain.launch.ops
	@touch $@

setup: $(OPS_STAMP)

environment: $(STAMP)

run-ops: $(RUN_OPS_STAMP)

ops: $(OPS_STAMP)

demo: setup
	$(PY) .ci/run_notebook.py --html build/demo/01_quickstart.html notebooks/01_quickstart.ipynb

# The extension's eslint, prettier and jest need its devDependencies; `pip install` (setup)
# installs them on its first build, this again whenever package-lock.json changed since.
EXT_MODULES := extension/node_modules/.package-lock.json
$(EXT_MODULES): extension/package-lock.json
	cd extension && npm install --no-audit --no-fund
	@touch $@

lint: environment $(EXT_MODULES)
	$(PY) -m ruff check nbtrain tests benchmarks .ci
	$(PY) -m mypy
	cd extension && npm run --silent lint:check && npm test --silent

test-unit: environment
	$(PYTEST) -q -m "not integration and not browser and not gpu and not package" tests $(NOTESTS)

# The integration tests in two parts: those on the namespace hosts and SLURM (marker `hosts`,
# set by tests/conftest.py) mostly wait on daemons, cut links and SLURM's time limit, while the
# others keep both cores busy. test-integration runs the two side by side, and `make test` the
# tutorials after the host tests and the wheel's test after the others (.ci/test-phases).
integration = $(PYTEST) -q --durations=10 -m "integration and not gpu and $(1)" tests $(NOTESTS)
test-integration-hosts: run-ops
	$(call integration,hosts)

test-integration-others: run-ops
	$(call integration,not hosts)

test-integration: run-ops
	@.ci/test-phases integration

test-notebooks: run-ops
	$(PYTEST) -q --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg

test-browser: run-ops
	$(PYTEST) -q -m "browser and not gpu" tests $(NOTESTS)

# Build the wheel and use it in a fresh virtual environment outside the repository; -s prints
# each step's seconds (PACKAGE lines).
test-package: environment
	$(PYTEST) -q -s -m package tests $(NOTESTS)

# The GPU tests (marker gpu), in the modules that hold them. With .venv (a development machine)
# they run there, and skip with the reason where there is no GPU. On the project's GPU machine
# (no .venv, the kit carried in .gpu-kit/; or NBTRAIN_GPU_KIT=1) `.ci/gpu-kit test` installs the
# kit into a scratch folder (no registry there), builds DeepSpeed's CUDA ops once, then runs
# them (docs/gpu.md).
test-gpu:
	@if [ -n "$$NBTRAIN_GPU_KIT" ] || { [ -d .gpu-kit ] && [ ! -x $(PY) ]; }; then \
	  python3 .ci/gpu-kit test; \
	else \
	  $(MAKE) --no-print-directory setup && $(PY) -m tests.gpu.ops && \
	  $(PYTEST) -q -rs -m gpu $$(grep -l 'pytest.mark.gpu' tests/test_*.py) $(NOTESTS); \
	fi

# Every phase runs and prints its time; the target fails if any phase failed. Phases that leave
# a core idle run in two lines side by side (.ci/test-phases says which).
test:
	@.ci/test-phases

# The multi-node benchmark needs root (namespace hosts, a real 2-node SLURM cluster) and is not
# part of `make bench`: .venv/bin/python benchmarks/multinode.py [--reps N] (benchmarks/README.md).
bench: setup
	$(PY) benchmarks/launch_overhead.py

# Re-execute the tutorials in place (their saved outputs are what nbval compares), from an
# empty run folder so that `%bigtrain runs` lists only their own runs.
notebooks: setup
	rm -rf notebooks/bigtrain-runs
	for nb in notebooks/*.ipynb; do $(PY) .ci/run_notebook.py --save $$nb || exit 1; done

clean:
	rm -rf .venv bigtrain-runs notebooks/bigtrain-runs
