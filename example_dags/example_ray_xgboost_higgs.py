"""Distributed XGBoost on Ray over modin data: the HIGGS pipeline, in two trainers.

``prepare_data`` finds the data: the real HIGGS CSV when ``data_path`` is given (a path or URL
with HIGGS's layout: no header, the label, then 28 features; ``.csv.gz`` works), otherwise a
HIGGS-shaped synthetic file generated once. ``train_xgboost_ray`` loads it with modin on Ray and
trains with xgboost-ray (``RayDMatrix`` + ``RayParams``, one actor per free CPU slot);
``evaluate`` predicts with the same actors. ``train_ray_train`` trains the same data with
Ray Train's maintained ``XGBoostTrainer``, the path to take once xgboost-ray's pin on
xgboost<2.1 gets in the way. Both models are checkpointed, so a retry or a new notebook
finds them (``airflow_ray_provider.xcom.results.load_result``).

The synthetic file is written on the node that runs ``prepare_data``; on a multi-node cluster
give ``data_path`` on storage every node reads (``s3://…``), as modin's readers run on any node.

Needs the ``examples`` extra and the Ray XCom backend (``make example`` sets both): the
boosters and the validation frame travel between tasks through Ray's object store.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

# The UCI HIGGS layout: the label, 21 low-level kinematic features, 7 high-level ones derived from them.
LOW_LEVEL = [
    "lepton_pt", "lepton_eta", "lepton_phi", "missing_energy_magnitude", "missing_energy_phi",
    *(f"jet{j}_{f}" for j in range(1, 5) for f in ("pt", "eta", "phi", "btag")),
]
HIGH_LEVEL = ["m_jj", "m_jjj", "m_lv", "m_jlv", "m_bb", "m_wbb", "m_wwbb"]
COLUMNS = ["label", *LOW_LEVEL, *HIGH_LEVEL]
SYNTHETIC_VERSION = 2  # part of the cached file's name: a changed generator never reuses an old file


def synthetic_higgs(path: str, rows: int, seed: int = 0) -> None:
    """Write a HIGGS-shaped CSV: same columns, similar value ranges, 53% signal as in HIGGS.

    Signal events have slightly harder, more central jets, more b-tags and heavier invariant
    masses. The classes overlap as much as HIGGS's do: boosted trees reach about 0.73 to 0.74
    accuracy here (HIGGS: about 0.72 to 0.76), not a trivial 1.0.
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    signal = rng.random(rows) < 0.53
    shift = signal.astype("float64")
    data: dict[str, Any] = {"label": shift}
    btag_levels = np.array([0.0, 1.1, 2.2])  # HIGGS's b-tag values
    for name in LOW_LEVEL:
        if name.endswith(("pt", "magnitude")):
            data[name] = rng.lognormal(mean=-0.1 + 0.1 * shift, sigma=0.5, size=rows)
        elif name.endswith("eta"):
            data[name] = rng.normal(scale=1.0 - 0.1 * shift, size=rows)
        elif name.endswith("phi"):
            data[name] = rng.uniform(-np.pi, np.pi, size=rows)
        else:
            u = rng.random(rows)
            level = np.where(signal, np.searchsorted([0.45, 0.75], u), np.searchsorted([0.6, 0.85], u))
            data[name] = btag_levels[level]
    jets = sum(data[f"jet{j}_pt"] for j in range(1, 5))
    for n, name in enumerate(HIGH_LEVEL):
        data[name] = (0.6 + 0.15 * n) * np.sqrt(jets) * rng.lognormal(0.15 * shift, 0.35, size=rows)
    frame = pd.DataFrame(data, columns=COLUMNS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.part"
    frame.to_csv(partial, header=False, index=False, float_format="%.9e")
    os.replace(partial, path)  # readers never see half a file


def check_higgs_layout(path: str) -> None:
    """Refuse a file that is not HIGGS-shaped before any worker reads it (wrong columns would train nonsense)."""
    import pandas as pd

    try:
        head = pd.read_csv(path, header=None, nrows=50)
    except Exception as exc:
        raise ValueError(f"Cannot read HIGGS data at {path!r}: {exc}") from exc
    if head.shape[1] != len(COLUMNS):
        raise ValueError(f"HIGGS data at {path!r} has {head.shape[1]} columns; expected {len(COLUMNS)} "
                         "(the label, then 28 features, no header)")
    if not all(pd.api.types.is_numeric_dtype(t) for t in head.dtypes):
        raise ValueError(f"HIGGS data at {path!r} has non-numeric values in its first rows (a header line?)")
    if not head[0].isin([0.0, 1.0]).all():
        raise ValueError(f"HIGGS data at {path!r}: the first column must be the 0/1 label")


def read_higgs(path: str, rows: int) -> Any:
    """The data as a modin DataFrame, read in parallel by Ray tasks."""
    import modin.config
    import modin.pandas as mpd

    modin.config.Engine.put("ray")  # joins the Ray cluster this task runs in
    return mpd.read_csv(path, header=None, names=COLUMNS, nrows=rows or None, dtype="float32")


def train_valid(frame: Any, valid_fraction: float) -> tuple[Any, Any]:
    """HIGGS's own split: the last rows validate."""
    split = int(len(frame) * (1 - valid_fraction))
    return frame.iloc[:split], frame.iloc[split:]


def actors_for(requested: int, cpus_per_actor: int) -> int:
    """As many training actors as asked for, but never more than the cluster can place at once."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(requested, cpus // cpus_per_actor))


def ray_params_for(params: dict) -> Any:
    """xgboost-ray's actor layout for training and prediction alike."""
    from xgboost_ray import RayParams

    actors = actors_for(params["num_actors"], params["cpus_per_actor"])
    return RayParams(num_actors=actors, cpus_per_actor=params["cpus_per_actor"])


def booster_params(params: dict) -> dict[str, Any]:
    """The same booster for both trainers."""
    return {"objective": "binary:logistic", "eval_metric": ["logloss", "error"], "tree_method": "hist",
            "max_depth": params["max_depth"], "eta": params["eta"]}


def accuracy_of(scores: Any, labels: Any) -> float:
    """Accuracy at the 0.5 threshold."""
    import numpy as np

    return float(np.mean((np.asarray(scores) > 0.5) == np.asarray(labels)))


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ray", "example", "xgboost"],
    params={
        "data_path": Param("", type="string",
                           description="HIGGS CSV path or URL (e.g. s3://bucket/HIGGS.csv.gz); empty: synthetic"),
        "rows": Param(100_000, type="integer", minimum=0,
                      description="rows to generate, or to read from data_path (0: all)"),
        "valid_fraction": Param(0.2, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
        "num_actors": Param(2, type="integer", minimum=1),
        "cpus_per_actor": Param(1, type="integer", minimum=1),
        "rounds": Param(30, type="integer", minimum=1),
        "max_depth": Param(6, type="integer", minimum=1),
        "eta": Param(0.3, type="number", exclusiveMinimum=0),
        "ray_train": Param(True, type="boolean", description="also train with Ray Train's XGBoostTrainer"),
    },
)
def example_ray_xgboost_higgs():
    @task.ray(num_cpus=0)
    def prepare_data(params: dict) -> str:
        """The real data if given (checked), else a synthetic file generated once per row count."""
        path = params["data_path"]
        if not path and params["rows"] < 1:
            raise ValueError("rows must be at least 1 to generate synthetic data (rows=0 means all rows of data_path)")
        if not path:
            name = f"higgs-synthetic-v{SYNTHETIC_VERSION}-{params['rows']}.csv"
            path = os.path.join(tempfile.gettempdir(), "airflow-ray-examples", name)
            if not os.path.exists(path):
                synthetic_higgs(path, params["rows"])
                print(f"generated {params['rows']} HIGGS-shaped rows at {path}")
        check_higgs_layout(path)
        return path

    # num_cpus=0: this task only coordinates; modin's readers and the training actors take the CPUs.
    @task.ray(num_cpus=0, checkpoint=True, multiple_outputs=True)
    def train_xgboost_ray(path: str, params: dict) -> dict:
        from xgboost_ray import RayDMatrix, train

        train_frame, valid_frame = train_valid(read_higgs(path, params["rows"]), params["valid_fraction"])
        ray_params = ray_params_for(params)
        # Central loading: the frames are split into per-actor shards in the object store before the
        # actors start. xgboost-ray 0.1.19's distributed modin loader deadlocks when the actors hold
        # every CPU (it runs modin tasks after they start) and fails when a frame has fewer
        # partitions than actors.
        dtrain = RayDMatrix(train_frame, label="label", distributed=False)
        dvalid = RayDMatrix(valid_frame, label="label", distributed=False)
        for matrix in (dtrain, dvalid):
            matrix.load_data(ray_params.num_actors)
        history: dict = {}
        booster = train(booster_params(params), dtrain, num_boost_round=params["rounds"], evals=[(dvalid, "valid")],
                        evals_result=history, ray_params=ray_params, verbose_eval=False)
        print(f"xgboost-ray trained on {len(train_frame)} rows with {ray_params.num_actors} actors; "
              f"validation error {history['valid']['error'][-1]:.4f}")
        return {"model": booster, "valid": valid_frame._to_pandas(), "actors": ray_params.num_actors,
                "history": {k: [float(x) for x in v] for k, v in history["valid"].items()}}

    @task.ray(num_cpus=0)
    def evaluate(model: Any, valid: Any, params: dict) -> dict:
        """Distributed prediction over the validation rows; accuracy at the 0.5 threshold."""
        from xgboost_ray import RayDMatrix, predict

        features = RayDMatrix(valid.drop(columns=["label"]), distributed=False)
        accuracy = accuracy_of(predict(model, features, ray_params=ray_params_for(params)), valid["label"])
        print(f"xgboost-ray accuracy on {len(valid)} validation rows: {accuracy:.4f}")
        return {"trainer": "xgboost_ray", "accuracy": accuracy, "rows": len(valid)}

    @task.ray(num_cpus=0, checkpoint=True)
    def train_ray_train(path: str, params: dict) -> dict:
        """The same model with Ray Train's XGBoostTrainer (Train V2: a training function per worker)."""
        if not params["ray_train"]:
            return {"trainer": "ray_train", "accuracy": None, "skipped": True}
        return ray_train_xgboost(path, params)

    @task
    def report(xgboost_ray: dict, ray_train: dict, path: str) -> dict:
        other = "skipped" if ray_train["accuracy"] is None else f"{ray_train['accuracy']:.4f}"
        print(f"HIGGS ({path}): accuracy {xgboost_ray['accuracy']:.4f} with xgboost-ray, "
              f"{other} with Ray Train, on {xgboost_ray['rows']} validation rows")
        return {"accuracy": {"xgboost_ray": xgboost_ray["accuracy"], "ray_train": ray_train["accuracy"]},
                "validation_rows": xgboost_ray["rows"], "data": path}

    path = prepare_data()
    trained = train_xgboost_ray(path)
    scored = evaluate(trained["model"], trained["valid"])
    report(scored, train_ray_train(path), path)


def ray_train_loop(config: dict) -> None:
    """Ray Train's per-worker loop: this worker's shards, one shared booster (Ray sets up xgboost's collective)."""
    import ray.train
    import xgboost
    from ray.train.xgboost import RayTrainReportCallback

    shards = {name: ray.train.get_dataset_shard(name).materialize().to_pandas() for name in ("train", "valid")}
    train, valid = (xgboost.DMatrix(f.drop(columns="label"), label=f["label"]) for f in shards.values())
    history: dict = {}
    booster = xgboost.train(config["params"], train, num_boost_round=config["rounds"], evals=[(valid, "valid")],
                            evals_result=history, verbose_eval=False)
    # One report at the end: a report per round waits for the controller's poll (2 s by default) each time.
    metrics = {f"valid-{k}": float(v[-1]) for k, v in history["valid"].items()}
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            booster.save_model(os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


def ray_train_xgboost(path: str, params: dict) -> dict:
    """Train with ``ray.train.xgboost.XGBoostTrainer`` on the same modin-loaded data; the run is stored
    under the task's checkpoint location, so it works on a multi-node cluster with S3 too."""
    import time

    import ray
    import ray.data
    import xgboost
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer

    from airflow_ray_provider.cluster.checkpoint import current

    train_frame, valid_frame = train_valid(read_higgs(path, params["rows"]), params["valid_fraction"])
    workers = actors_for(params["num_actors"], params["cpus_per_actor"])
    storage_path, filesystem = current().tune_storage()
    trainer = XGBoostTrainer(
        ray_train_loop,
        train_loop_config={"rounds": params["rounds"],
                           "params": {**booster_params(params), "nthread": params["cpus_per_actor"]}},
        datasets={"train": ray.data.from_modin(train_frame), "valid": ray.data.from_modin(valid_frame)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": params["cpus_per_actor"]}),
        # A fresh run per try (a reused name would resume the old one); a placement that can never start
        # fails instead of retrying forever.
        run_config=RunConfig(name=f"ray-train-{time.time_ns()}", storage_path=storage_path,
                             storage_filesystem=filesystem, failure_config=FailureConfig(controller_failure_limit=0)),
    )
    result = trainer.fit()
    booster = RayTrainReportCallback.get_model(result.checkpoint)
    valid = valid_frame._to_pandas()
    accuracy = accuracy_of(booster.predict(xgboost.DMatrix(valid.drop(columns=["label"]))), valid["label"])
    print(f"Ray Train trained on {len(train_frame)} rows with {workers} workers; accuracy {accuracy:.4f}")
    return {"trainer": "ray_train", "accuracy": accuracy, "rows": len(valid), "model": booster,
            "valid_error": result.metrics["valid-error"]}


example_ray_xgboost_higgs()
