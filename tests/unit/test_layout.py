"""The package layout keeps its promises: what ships to Ray imports no Airflow, private Ray APIs
stay in one module, the XCom backend does not need the operator, and the bundle holds exactly
the cluster-side code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_ray_provider import bundle

pytestmark = pytest.mark.smoke  # the layout holds on every supported combination

PACKAGE = Path(bundle.__file__).resolve().parent
CLUSTER_MODULES = sorted(f"airflow_ray_provider.cluster.{p.stem}" for p in (PACKAGE / "cluster").glob("*.py")
                         if p.stem != "__init__")


def _fresh(code: str, path: str | None = None) -> dict:
    """Run ``code`` in a new interpreter (optionally with only ``path`` added) and return its JSON output."""
    env = None
    if path is not None:
        env = {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cluster_package_imports_no_airflow() -> None:
    assert "airflow_ray_provider.cluster.owner" in CLUSTER_MODULES  # the glob found the package
    loaded = _fresh(
        "import importlib, json, sys\n"
        f"for m in {CLUSTER_MODULES!r} + ['airflow_ray_provider.exceptions']:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))))\n"
    )
    assert loaded == [], f"cluster-side modules pulled in Airflow: {loaded}"


def test_what_a_task_through_the_gateway_loads_imports_no_ray() -> None:
    """An Airflow process that reaches the cluster through the gateway needs no Ray installed (issue 24): the
    client, the operator and decorator, the XCom backend, the trigger and the checkpoint job it sends
    (tests/integration/operators/test_gateway.py runs a DAG in such a process)."""
    loaded = _fresh(
        "import json, sys\n"
        "import airflow_ray_provider.gateway_client, airflow_ray_provider.operators.ray\n"
        "import airflow_ray_provider.decorators.ray, airflow_ray_provider.xcom.backend\n"
        "import airflow_ray_provider.triggers.ray, airflow_ray_provider.cluster.checkpoint\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    assert loaded == [], f"the gateway path pulled in Ray: {loaded}"


def test_the_bundle_holds_exactly_the_cluster_side_code(airflow_home: Path) -> None:
    staged = Path(bundle.bundle_dir())
    assert staged.name == "airflow_ray_provider"
    assert str(staged).startswith(str(airflow_home))
    shipped = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert shipped == sorted(str(p) for p in bundle.source_files())
    assert {"exceptions.py", "cluster/worker.py", "cluster/openapi.json"} <= set(shipped)
    assert not any(p.startswith(("hooks", "xcom", "operators", "decorators")) for p in shipped), shipped
    assert (staged.parent.parent.stat().st_mode & 0o077) == 0, "the bundle folder must be private"
    # Every shipped module imports from the staged copy alone (no site-packages: no Airflow, no provider).
    modules = [m for m in CLUSTER_MODULES if m != "airflow_ray_provider.cluster.owner"]
    found = _fresh(
        "import importlib, json, sys\n"
        "sys.path = [p for p in sys.path if 'site-packages' not in p or 'ray' in p]\n"
        "import airflow_ray_provider, airflow_ray_provider.exceptions, airflow_ray_provider.cluster.signing\n"
        "print(json.dumps(airflow_ray_provider.__file__))\n",
        path=str(staged.parent),
    )
    assert found.startswith(str(staged)), found
    assert modules  # the rest need Ray, which test_stock_ray covers on a real stock-Ray head


def test_an_altered_staged_copy_is_replaced(airflow_home: Path) -> None:
    staged = Path(bundle.bundle_dir())
    target = staged / "cluster" / "signing.py"
    original = target.read_bytes()
    target.write_bytes(original + b"\nraise SystemExit('tampered')\n")
    bundle._staged.cache_clear()
    again = Path(bundle.bundle_dir())
    assert (again / "cluster" / "signing.py").read_bytes() == original
    assert bundle.digest(again) == bundle.digest()


def test_processes_staging_at_once_all_get_a_whole_copy(tmp_path: Path) -> None:
    """Task processes that start together stage the same bundle; none fails and every copy is whole. Seen
    under the scheduler: two processes removed the same copy at once and one task failed (FileNotFoundError).
    Processes, not threads: each has its own cache of ``_staged``, as task processes do."""
    home, go = tmp_path / "home", tmp_path / "go"
    # Each imports first, then waits for the same go-file, so the stagings overlap.
    script = ("import os, sys, time\nfrom airflow_ray_provider import bundle\nsource = bundle.digest()\n"
              "print('ready', flush=True)\nwhile not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
              "print(bundle._staged(source, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
    go.touch()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in results]
    (path,) = {out.strip() for out, _ in results}
    assert bundle.digest(Path(path)) == bundle.digest()
    assert sorted(p.name for p in Path(path).parent.parent.iterdir()) == [Path(path).parent.name]  # no leftovers


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_xcom_backend_does_not_import_the_operator() -> None:
    for path in (PACKAGE / "xcom").glob("*.py"):
        wanted = {m for m in _imports(path) if m.startswith(("airflow_ray_provider.operators",
                                                               "airflow_ray_provider.decorators"))}
        assert not wanted, f"{path.name} imports {wanted}: the backend must not need the operator class"


PRIVATE_RAY = ("ray._private", "ray._raylet", "ray.experimental", "ActorClass._remote", "ENABLE_RAY_CLUSTER",
               "RAY_gcs_rpc", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_ray_apis_are_used_only_through_ray_compat(path: Path) -> None:
    if path.name == "ray_compat.py":
        return
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    # Docstrings may name them; code may not. Strip string literals by walking the AST.
    tree = ast.parse(code)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)):
            text = ast.unparse(node)
            used.update(p for p in PRIVATE_RAY if p in text)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            text = ast.unparse(node)
            used.update(p for p in PRIVATE_RAY if p in text)
    assert not used, f"{path.relative_to(PACKAGE)} uses {used} directly; go through cluster/ray_compat.py"


def test_exceptions_live_in_one_module() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "exceptions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not (bases & {"Exception", "RuntimeError", "ValueError", "LookupError", "TypeError"}
                            or any(b.endswith(("Error", "Exception")) for b in bases)), (
                    f"{path.relative_to(PACKAGE)} defines exception {node.name}; put it in exceptions.py")
