"""``airflow-ray``: the embedded Ray head (``local``), XCom upkeep (``xcom gc``), checkpoints (``checkpoints``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from airflow_ray_provider.config import DEFAULT_CONN_ID
from airflow_ray_provider.exceptions import LocalClusterError
from airflow_ray_provider.local_cluster import LocalRayCluster


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
    xcom.add_argument("--conn-id", default=DEFAULT_CONN_ID, help=f"the ray connection (default: {DEFAULT_CONN_ID})")
    xcom.add_argument("--retention", type=float, help="seconds after a run finished to keep its objects "
                      "(default: [ray] xcom_retention; negative keeps them until their rows are deleted)")
    xcom.add_argument("--grace", type=float, default=600.0, help="seconds to keep unreferenced new objects")
    xcom.add_argument("--dry-run", action="store_true", help="report, release nothing")
    upkeep = sub.add_parser("upkeep", help="what the listener runs after DAG runs: xcom gc (with the Ray XCom "
                            "backend) and checkpoints prune (with [ray] checkpoint_retention >= 0)")
    upkeep.add_argument("--conn-id", default=DEFAULT_CONN_ID, help=f"the ray connection (default: {DEFAULT_CONN_ID})")
    ckpt = sub.add_parser("checkpoints", help="durable task checkpoints (checkpoint=True)")
    ckpt.add_argument("action", choices=["list", "delete", "prune"],
                      help="list them; delete one DAG run's; prune those older than the retention")
    ckpt.add_argument("--ray-conn-id", default=DEFAULT_CONN_ID, help="the ray connection whose checkpoint_path to use")
    ckpt.add_argument("--path", help="checkpoint root instead of the connection's (e.g. s3://bucket/prefix)")
    ckpt.add_argument("--conn-id", help="Airflow connection with the store's credentials (e.g. an aws connection)")
    ckpt.add_argument("--dag-id", help="list: only this DAG; delete: required")
    ckpt.add_argument("--run-id", help="delete: the DAG run whose checkpoints to delete")
    ckpt.add_argument("--older-than", type=float, help="prune: seconds since the last write "
                      "(default: [ray] checkpoint_retention)")
    ckpt.add_argument("--dry-run", action="store_true", help="prune: report, delete nothing")
    ckpt.add_argument("--json", action="store_true", help="list: print JSON")
    return parser


def _checkpoints(args: argparse.Namespace) -> int:
    from airflow_ray_provider.cluster import checkpoint
    from airflow_ray_provider.config import checkpoint_retention
    from airflow_ray_provider.storage import make_store, store_for

    store = make_store(args.path, args.conn_id) if args.path else store_for(args.ray_conn_id, None, args.conn_id)[0]
    if args.action == "list":
        rows = checkpoint.list_runs(store, args.dag_id)
        if args.json:
            print(json.dumps(rows))
        for row in [] if args.json else rows:
            print(f"{row['dag']}\t{row['run']}\t{row['task']}\t{row['map_index']}\t{row['bytes']}\t{row['uri']}")
        return 0
    if args.action == "delete":
        if not args.dag_id or not args.run_id:
            print("airflow-ray: checkpoints delete needs --dag-id and --run-id", file=sys.stderr)
            return 2
        count = checkpoint.delete_run(store, args.dag_id, args.run_id)
        print(f"deleted the checkpoints of {count} task(s) of {args.dag_id} / {args.run_id}")
        return 0
    older = args.older_than if args.older_than is not None else checkpoint_retention()
    if older < 0:
        print("checkpoint retention is off ([ray] checkpoint_retention < 0); nothing pruned")
        return 0
    rows = checkpoint.prune(store, older, dry_run=args.dry_run)
    print(("dry run: would have " if args.dry_run else "") + f"pruned {len(rows)} task checkpoint folder(s) "
          f"({sum(r['bytes'] for r in rows)} bytes) not written for {older:.0f}s")
    return 0


def _upkeep(args: argparse.Namespace) -> int:
    from airflow_ray_provider.config import checkpoint_retention
    from airflow_ray_provider.plugins import ray_xcom_backend_configured

    status = 0
    if ray_xcom_backend_configured():
        status |= main(["xcom", "gc", "--conn-id", args.conn_id])
    if checkpoint_retention() >= 0:
        status |= main(["checkpoints", "prune", "--ray-conn-id", args.conn_id])
    return status


def _xcom(args: argparse.Namespace) -> int:
    from airflow_ray_provider.xcom.retention import collect_garbage

    report = collect_garbage(conn_id=args.conn_id, retention_s=args.retention, grace_s=args.grace,
                             dry_run=args.dry_run)
    print(("dry run: would have " if args.dry_run else "") + report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.group == "xcom":
        return _xcom(args)
    if args.group == "upkeep":
        return _upkeep(args)
    if args.group == "checkpoints":
        from airflow_ray_provider.exceptions import CheckpointError

        try:
            return _checkpoints(args)
        except CheckpointError as exc:
            print(f"airflow-ray: {exc}", file=sys.stderr)
            return 1
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
                recorded = cluster.read_state()
                why = cluster.why_left_broken(recorded) if recorded is not None else None
                print(f"not running: {why}" if why else "not running")
                return 3
    except LocalClusterError as exc:
        print(f"airflow-ray: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(state)))
    else:
        print(f"running at {state.address} (state: {cluster.state_file}, Ray temp dir: {state.temp_dir})")
        if state.client_address:
            print(f"Ray Client: {state.client_address}")
        if state.dashboard_url:
            print(f"dashboard: {state.dashboard_url}")
        # Where the token is, never the token: clients of the head (ray.init, `ray` CLI) need it.
        if state.auth_mode != "token":
            print("auth: DISABLED (started with RAY_AUTH_MODE=disabled): any local user can join")
        elif state.token_file:
            print(f"auth: token in {state.token_file} (clients: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>)")
        else:
            print("auth: token from RAY_AUTH_TOKEN in the environment that started it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
