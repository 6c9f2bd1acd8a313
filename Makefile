# Two entry points (see README): `make example` runs the main job, `make test` runs the test suite.
# Both build .venv on first use from pyproject.toml pinned by constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# uv builds every virtualenv, from its package cache: a rebuilt .venv takes seconds once the cache is warm.
# uv itself lives in a small virtualenv of its own under the user's cache (built once per machine), so a
# fresh clone does not reinstall it with pip.
UV_VERSION := 0.13.8
TOOLS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/airflow-ray-provider
UV := $(TOOLS)/uv-$(UV_VERSION)/bin/uv

# A "stock Ray node": Ray and the data libraries a rayproject/ray image carries (pyarrow, fsspec, boto3),
# without Airflow, this provider or s3fs. tests/system/test_bundle_stock_ray.py starts a head from it.
STOCK_VENV ?= .venv-stock-ray
STOCK_PKGS := "ray[default]" numpy pandas pyarrow fsspec boto3

# The oldest and newest supported combinations (README, "Compatibility"), each pinned by its file in
# constraints/, run the tests marked `smoke`; the main combination (.venv, constraints.txt) runs everything.
PYENV_VERSIONS ?= $(HOME)/.pyenv/versions
OLDEST := py3.10-ray2.58-airflow3.2
NEWEST := py3.13-ray2.60-airflow3.3
OLDEST_PYTHON ?= $(PYENV_VERSIONS)/3.10.13/bin/python
NEWEST_PYTHON ?= $(PYENV_VERSIONS)/3.13.0/bin/python

# Each tier prints pytest's 25 slowest tests and its wall time (README, "Testing"). The integration and system
# tiers run in lanes (pytest-xdist workers), each with its own Airflow home, Ray head and S3 server. The
# integration tier waits more than it computes (load average 0.5-1 in one lane, run 6): 2 lanes took it from
# 1425 s to 742 s, 3 lanes (with smoke beside them) to 660 s (benchmarks/results/suite_tiers.md); a file's
# tests stay in one lane (--dist loadfile), the slowest files handed out first (tests/support/lanes.py).
PYTEST = -m pytest -p no:cacheprovider -rfEs --durations=25
INTEGRATION_LANES ?= 3
# The system tier is CPU-bound (79% of both cores in 2 lanes, run 8); a third lane takes up the rest (run 11).
SYSTEM_LANES ?= 3
TIMES := .test-times
timed = @start=$$(date +%s); $(2) || exit $$?; echo "$(1): $$(( $$(date +%s) - start )) s" | tee -a $(TIMES)

.PHONY: example test test-unit test-integration test-system test-system-beside test-system-rest smoke lint browser \
	stock-ray versions clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)/uv-$(UV_VERSION)
	$(TOOLS)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml constraints.txt | $(UV)
	$(UV) venv -q --seed --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install -q --python $(PY) -c constraints.txt -e ".[test,examples]" uv==$(UV_VERSION)
	touch $@

$(STOCK_VENV)/.installed: constraints.txt | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(STOCK_VENV)
	$(UV) pip install -q --python $(STOCK_VENV)/bin/python -c constraints.txt $(STOCK_PKGS)
	touch $@

stock-ray: $(STOCK_VENV)/.installed

# One virtualenv per extra combination; a missing interpreter is reported, not silently skipped.
.venv-%/.installed: constraints/%.txt | $(UV)
	@py=$(if $(findstring $(OLDEST),$*),$(OLDEST_PYTHON),$(NEWEST_PYTHON)); \
	if [ ! -x "$$py" ]; then echo "SKIPPED $*: no interpreter at $$py"; exit 0; fi; \
	$(UV) venv -q --allow-existing --python $$py .venv-$* && \
	$(UV) pip install -q --python .venv-$*/bin/python -c constraints/$*.txt -e ".[test]" && touch $@

versions: .venv-$(OLDEST)/.installed .venv-$(NEWEST)/.installed

example: $(VENV)/.installed
	$(PY) scripts/run_example.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# The browser tests drive Debian's chromium (playwright cannot download a browser here). Installed
# where we may (root with apt-get); elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed: the browser tests will be skipped"

# No Ray, no metadata DB: what a developer runs on every change (budget: 2 minutes).
test-unit: $(VENV)/.installed
	$(call timed,unit tier,$(PY) $(PYTEST) tests/unit)

# One Ray head, one S3 server, one migrated DB per lane; DAGs run in-process (budget: 15 minutes with make test's
# other jobs beside it).
test-integration: $(VENV)/.installed
	$(call timed,integration tier,$(PY) $(PYTEST) -n $(INTEGRATION_LANES) --dist loadfile --no-loadscope-reorder tests/integration)

# Own processes: the scheduler and triggerer, the API server and a browser, network namespaces, Celery,
# heads killed or restarted, other versions (budget in make test: 14 minutes in $(SYSTEM_LANES) lanes after the
# integration tier, what runs beside it hidden by it). A module's tests stay
# in one lane (--dist loadfile), so its module-scoped fixtures start once. Not --dist loadgroup: with pytest 9.2
# and pytest-xdist 3.8 it silently stops grouping (pytest-dev/pytest-xdist#1386), which until this change
# started the UI tests' API server and DAG runs, and two heads, once in each lane.
test-system: $(VENV)/.installed stock-ray versions browser
	$(call timed,system tier,$(PY) $(PYTEST) -n $(SYSTEM_LANES) --dist loadfile --no-loadscope-reorder tests/system)
# `make test` splits the system tier in two (tests/system/conftest.py, BESIDE_INTEGRATION): a few modules in one
# lane beside the integration tier, which leaves a quarter of both cores idle, and the rest in lanes after it.
test-system-beside: $(VENV)/.installed stock-ray versions browser
	$(call timed,system tier beside integration,$(PY) $(PYTEST) -m beside_integration tests/system)
test-system-rest: $(VENV)/.installed stock-ray versions browser
	$(call timed,system tier after integration,$(PY) $(PYTEST) -n $(SYSTEM_LANES) --dist loadfile \
		--no-loadscope-reorder -m "not beside_integration" tests/system)

# The tests marked `smoke` on the oldest and newest supported combinations, the two side by side (each waits
# more than it computes, as the integration tier does); each one's output is printed whole when it ends.
smoke: versions
	@start=$$(date +%s); status=0; pids=""; \
	for combo in $(OLDEST) $(NEWEST); do \
		if [ -x .venv-$$combo/bin/python ] && [ -e .venv-$$combo/.installed ]; then \
			( s=$$(date +%s); .venv-$$combo/bin/python $(PYTEST) -m smoke tests > .smoke-$$combo.log 2>&1; \
			  rc=$$?; echo "smoke $$combo: $$(( $$(date +%s) - s )) s" >> .smoke-$$combo.log; exit $$rc ) & \
			pids="$$pids $$!"; \
		else echo "SKIPPED smoke $$combo: its virtualenv could not be built (see above)"; fi; \
	done; \
	for pid in $$pids; do wait $$pid || status=1; done; \
	for combo in $(OLDEST) $(NEWEST); do \
		[ -e .smoke-$$combo.log ] && { echo "== smoke: $$combo"; cat .smoke-$$combo.log; tail -1 .smoke-$$combo.log >> $(TIMES); rm -f .smoke-$$combo.log; }; \
	done; \
	echo "smoke (both): $$(( $$(date +%s) - start )) s" | tee -a $(TIMES); exit $$status

# Lint first, then the integration tier with two jobs beside it: the smoke runs and then the unit tier (the smoke
# runs wait more than they compute: 660 s together against 764 + 136 one after the other,
# benchmarks/results/suite_tiers.md; the unit tier, 1 minute and 1 core, fills the time they leave), and the
# system modules marked beside_integration (run 16: the integration phase used 73% of both cores, the system tier
# 92%). Then the rest of the system tier (CPU-bound). Until 1c55f0c the whole system tier ran beside the others:
# the load average stayed at 8-18 and Ray's fixed 15 s window for a new head's agents failed heads; a head's
# session now starts at a raised priority (local_cluster.START_PRIORITY_BOOST, benchmarks/head_start_load.py).
# Six sessions start at once here: run 9 failed when two were handed the same free port, which free_ports now
# keeps from other processes (PORT_HOLD_S). Every tier runs even when an earlier one failed, so CI shows all
# failures at once; the output of the jobs beside the integration tier comes after its own.
test:
	@rm -f $(TIMES) .smoke.log .unit.log .system-beside.log; start=$$(date +%s); status=0; \
	for target in lint versions stock-ray browser; do $(MAKE) --no-print-directory $$target || status=1; done; \
	( rc=0; $(MAKE) --no-print-directory smoke > .smoke.log 2>&1 || rc=1; \
	  $(MAKE) --no-print-directory test-unit > .unit.log 2>&1 || rc=1; exit $$rc ) & beside=$$!; \
	$(MAKE) --no-print-directory test-system-beside > .system-beside.log 2>&1 & system_beside=$$!; \
	$(MAKE) --no-print-directory test-integration || status=1; \
	wait $$beside || status=1; wait $$system_beside || status=1; \
	cat .smoke.log .unit.log .system-beside.log; rm -f .smoke.log .unit.log .system-beside.log; \
	$(MAKE) --no-print-directory test-system-rest || status=1; \
	echo "== wall times (make test, budget 30 minutes)"; cat $(TIMES); \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

clean:
	-$(VENV)/bin/airflow-ray local stop
	rm -rf $(VENV) $(STOCK_VENV) .venv-$(OLDEST) .venv-$(NEWEST) .airflow $(TIMES)
