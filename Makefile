# Two entry points (see README): `make example` runs the main job, `make test` runs the test suite.
# Both build .venv on first use from pyproject.toml pinned by constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: example test lint browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.8
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e ".[test,examples]"
	touch $@

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

test: lint browser
	$(PY) -m pytest -p no:cacheprovider -rs

clean:
	-$(VENV)/bin/airflow-ray local stop
	rm -rf $(VENV) .airflow
