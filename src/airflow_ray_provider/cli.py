"""``airflow-ray``: the embedded local Ray head (``local start|stop|status``) and XCom upkeep (``xcom gc``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from airflow_ray_provider.local_cluster import LocalClusterError, LocalRayCluster


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-ray", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)
    local = sub.add_parser("local", help="the embedded Ray head under $AIRFLOW_HOME/ray")
    local.add_argument("action", choices=["start", "stop", "status"])
    local.add_argument("--home", help="state folder (default: $AIRFLOW_HOME/ray)")
    local.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    local.add_argument("--dashboard", action="store_true", help="also start the Ray dashboard on a free port")
    local.add_argument("--json", action="store_true", help="print the state as JSON")
    xcom = sub.add_parser("xcom", help="XComs held in Ray by RayXComBackend")
    xcom.add_argument("action", choices=["gc"])
    xcom.add_argument("--conn-id", default="ray_default", help="the ray connection (default: ray_default)")
    xcom.add_argument("--retention", type=float, help="seconds after a run finished to keep its objects "
                      "(default: [ray] xcom_retention; negative keeps them until their rows are deleted)")
    xcom.add_argument("--grace", type=float, default=600.0, help="seconds to keep unreferenced new objects")
    xcom.add_argument("--dry-run", action="store_true", help="report, release nothing")
    return parser


def _xcom(args: argparse.Namespace) -> int:
    from airflow_ray_provider.retention import collect_garbage

    report = collect_garbage(conn_id=args.conn_id, retention_s=args.retention, grace_s=args.grace,
                             dry_run=args.dry_run)
    print(("dry run: would have " if args.dry_run else "") + report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.group == "xcom":
        return _xcom(args)
    cluster = LocalRayCluster(args.home, num_cpus=args.num_cpus, include_dashboard=args.dashboard)
    try:
        if args.action == "start":
            state = cluster.ensure_running()
        elif args.action == "stop":
            stopped = cluster.stop()
            print("stopped" if stopped else "not running")
            return 0
        else:
            state = cluster.status()
            if state is None:
                print("not running")
                return 3
    except LocalClusterError as exc:
        print(f"airflow-ray: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(state)))
    else:
        print(f"running at {state.address} (state: {cluster.state_file}, Ray temp dir: {state.temp_dir})")
        if state.dashboard_url:
            print(f"dashboard: {state.dashboard_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
