# Two entry points (see README): `make example` runs the main job, `make test` runs the test suite.
# Both build .venv on first use from pyproject.toml pinned by constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# A "stock Ray node": Ray and the data libraries a rayproject/ray image carries (pyarrow, fsspec, boto3),
# without Airflow, this provider or s3fs. tests/test_stock_ray.py starts a head from it.
STOCK_VENV ?= .venv-stock-ray
STOCK_PKGS := "ray[default]" numpy pandas pyarrow fsspec boto3

# The oldest and newest supported combinations (README, "Compatibility"), each pinned by its file in
# constraints/, run the smoke subset below; the main combination (.venv, constraints.txt) runs everything.
PYENV_VERSIONS ?= $(HOME)/.pyenv/versions
OLDEST := py3.10-ray2.58-airflow3.2
NEWEST := py3.13-ray2.60-airflow3.3
OLDEST_PYTHON ?= $(PYENV_VERSIONS)/3.10.13/bin/python
NEWEST_PYTHON ?= $(PYENV_VERSIONS)/3.13.0/bin/python
# Connect and the Test button probe, a Ray task, the XCom backend, a checkpoint (S3), the layout.
SMOKE := tests/test_layout.py tests/test_hook.py::test_provider_is_registered_with_airflow \
	tests/test_hook.py::test_test_connection_button \
	tests/test_decorator.py::test_values_flow_between_ray_and_plain_tasks_both_ways \
	tests/test_xcom_backend.py::test_ray_results_stay_in_ray_and_reach_ray_tasks_by_reference \
	tests/test_checkpoint_tasks.py::test_a_retry_resumes_from_progress_saved_mid_task

.PHONY: example test lint browser stock-ray versions smoke clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.8
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e ".[test,examples]"
	touch $@

$(STOCK_VENV)/.installed: constraints.txt $(VENV)/.installed
	$(PYTHON) -m venv $(STOCK_VENV)
	$(VENV)/bin/uv pip install -q --python $(STOCK_VENV)/bin/python -c constraints.txt $(STOCK_PKGS)
	touch $@

stock-ray: $(STOCK_VENV)/.installed

# One virtualenv per extra combination; a missing interpreter is reported, not silently skipped.
.venv-%/.installed: constraints/%.txt $(VENV)/.installed
	@py=$(if $(findstring $(OLDEST),$*),$(OLDEST_PYTHON),$(NEWEST_PYTHON)); \
	if [ ! -x "$$py" ]; then echo "SKIPPED $*: no interpreter at $$py"; exit 0; fi; \
	$$py -m venv .venv-$* && \
	$(VENV)/bin/uv pip install -q --python .venv-$*/bin/python -c constraints/$*.txt -e ".[test]" && touch $@

versions: .venv-$(OLDEST)/.installed .venv-$(NEWEST)/.installed

smoke: versions
	@for combo in $(OLDEST) $(NEWEST); do \
		if [ -x .venv-$$combo/bin/python ] && [ -e .venv-$$combo/.installed ]; then \
			echo "== smoke: $$combo"; .venv-$$combo/bin/python -m pytest -p no:cacheprovider -rs $(SMOKE) || exit 1; \
		else echo "SKIPPED smoke $$combo: its virtualenv could not be built (see above)"; fi; \
	done

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

test: lint browser stock-ray versions
	$(PY) -m pytest -p no:cacheprovider -rs
	$(MAKE) smoke

clean:
	-$(VENV)/bin/airflow-ray local stop
	rm -rf $(VENV) $(STOCK_VENV) .venv-$(OLDEST) .venv-$(NEWEST) .airflow
