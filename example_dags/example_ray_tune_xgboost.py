"""A resumable Ray Tune search: XGBoost on scikit-learn's breast-cancer data, ASHA early stopping.

``search`` runs the experiment under its own checkpoint location
(``checkpoint.current().tune_storage()``: the ray connection's checkpoint store, S3 or local).
If the task dies mid-search (its worker, its node, or the whole Ray cluster) Airflow retries
it and ``Tuner.restore`` carries on with the same experiment: finished trials are kept, and
unfinished ones continue. It returns the best config, its validation metrics and the best
trial's booster; ``evaluate`` scores that booster on rows the search never saw.

The sampler is seeded (the ``seed`` Param), so a rerun tries the same configurations; which
trials ASHA stops early still depends on the order their results arrive in.

Needs the ``examples`` extra and the Ray XCom backend (``make example`` sets both).
"""

from __future__ import annotations

import datetime
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

EXPERIMENT = "xgboost-breast-cancer"
GRACE_ROUNDS = 2  # ASHA's first rung; rungs are multiples of it, and so are the checkpoints


def breast_cancer_splits() -> dict[str, Any]:
    """Fixed train / validation / test splits: the search sees the first two, ``evaluate`` the third."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_train, x_valid, y_train, y_valid = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                          random_state=0)
    return {"train": (x_train, y_train), "valid": (x_valid, y_valid), "test": (x_test, y_test)}


def train_breast_cancer(config: dict[str, Any]) -> None:
    """One Tune trial; reports eval-logloss / eval-error every round and a checkpoint every ``GRACE_ROUNDS``."""
    import xgboost as xgb
    from ray.tune.integration.xgboost import TuneReportCheckpointCallback

    data = breast_cancer_splits()
    train, valid = (xgb.DMatrix(x, label=y) for x, y in (data["train"], data["valid"]))
    params = {"objective": "binary:logistic", "eval_metric": ["logloss", "error"], "nthread": 1,
              **{k: v for k, v in config.items() if k != "rounds"}}
    xgb.train(params, train, num_boost_round=config["rounds"], evals=[(valid, "eval")], verbose_eval=False,
              # A checkpoint at every ASHA rung (2, 4, 8, ...): a stopped trial keeps its last model.
              callbacks=[TuneReportCheckpointCallback(frequency=GRACE_ROUNDS)])


def resumable_variant_generator() -> type:
    """Ray 2.60's ``BasicVariantGenerator`` with a concurrency cap that survives ``Tuner.restore``.

    The generator saves its set of live trials with its state, and that set can hold trials the
    experiment state already records as finished. After a restore they never finish again, so the
    cap never admits another trial and the resumed search hangs (seen here: 4 of 8 trials done,
    nothing running, for 10 minutes). The restored generator starts that count afresh; the trials
    Tune restores as unfinished run anyway, so a resume may briefly run more than the cap.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class ResumableVariantGenerator(BasicVariantGenerator):
        def set_state(self, state: dict) -> None:
            super().set_state(state)
            self._live_trials = set()

    return ResumableVariantGenerator


def search_space(rounds: int) -> dict[str, Any]:
    """Tune's param_space; module-level so a seeded sample can be drawn again outside the search."""
    from ray import tune

    return {
        "max_depth": tune.randint(1, 9),
        "min_child_weight": tune.choice([1, 2, 3]),
        "subsample": tune.uniform(0.5, 1.0),
        # xgboost's default eta is 0.3; far below 0.01 a few dozen rounds barely learn.
        "eta": tune.loguniform(1e-2, 3e-1),
        "rounds": rounds,
    }


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ray", "example", "tune"],
    params={
        "num_samples": Param(16, type="integer", minimum=1, description="configurations to try"),
        "rounds": Param(40, type="integer", minimum=GRACE_ROUNDS, multipleOf=GRACE_ROUNDS,
                        description="boosting rounds for a trial ASHA does not stop"),
        "max_concurrent_trials": Param(2, type="integer", minimum=1),
        "seed": Param(0, type="integer", description="seeds the sampler: a rerun tries the same configurations"),
    },
)
def example_ray_tune_xgboost():
    # The task only drives Tune (num_cpus=0); each trial takes one CPU. A lost driver is Airflow's to
    # retry (ray_max_retries=0), and the retry resumes the experiment from the checkpoint store.
    @task.ray(num_cpus=0, checkpoint=True, multiple_outputs=True, retries=2,
              retry_delay=datetime.timedelta(seconds=5), ray_max_retries=0)
    def search(params: dict) -> dict:
        from ray import tune
        from ray.tune.integration.xgboost import TuneReportCheckpointCallback
        from ray.tune.schedulers import ASHAScheduler

        from airflow_ray_provider.cluster.checkpoint import current

        ResumableVariantGenerator = resumable_variant_generator()
        checkpoint = current()
        storage_path, filesystem = checkpoint.tune_storage()
        trainable = tune.with_resources(train_breast_cancer, {"CPU": 1})
        experiment = f"{storage_path}/{EXPERIMENT}"
        if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=filesystem)
            kept = [r for r in tuner.get_results() if r.metrics and r.metrics.get("done")]
            print(f"Resuming the Tune experiment at {checkpoint.uri}/tune/{EXPERIMENT}: "
                  f"{len(kept)} finished trials kept")
        else:
            kept = []
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(params["rounds"]),
                tune_config=tune.TuneConfig(
                    metric="eval-logloss", mode="min", num_samples=params["num_samples"],
                    # Tune ignores max_concurrent_trials once a search_alg is given: the cap goes here.
                    search_alg=ResumableVariantGenerator(max_concurrent=params["max_concurrent_trials"],
                                                         random_state=params["seed"]),
                    scheduler=ASHAScheduler(max_t=params["rounds"], grace_period=GRACE_ROUNDS, reduction_factor=2),
                ),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path,
                                          storage_filesystem=filesystem),
            )
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"{len(results.errors)} of {len(results)} trials failed: {results.errors[0]}")
        best = results.get_best_result()
        if best.checkpoint is None:
            raise RuntimeError(f"The best trial ({best.path}) saved no model checkpoint")
        config = {k: v for k, v in best.config.items() if k != "rounds"}
        print(f"best of {len(results)} trials: {config}, eval-logloss {best.metrics['eval-logloss']:.4f}")
        return {
            "config": config,
            "logloss": float(best.metrics["eval-logloss"]),
            "accuracy": 1.0 - float(best.metrics["eval-error"]),
            "rounds": int(best.metrics["training_iteration"]),
            "model": TuneReportCheckpointCallback.get_model(best.checkpoint),
            "trials": len(results),
            # Every trial, best first: what was tried and how far ASHA let it run.
            "leaderboard": sorted(({"config": {k: v for k, v in r.config.items() if k != "rounds"},
                                    "logloss": float(r.metrics["eval-logloss"]),
                                    "rounds": int(r.metrics["training_iteration"])} for r in results),
                                  key=lambda row: row["logloss"]),
            "kept_trials": sorted(r.metrics["trial_id"] for r in kept),
        }

    @task.ray
    def evaluate(model: Any, config: dict) -> dict:
        """Score the chosen model on the held-out test rows (what a model registry would record)."""
        import numpy as np
        import xgboost as xgb

        x_test, y_test = breast_cancer_splits()["test"]
        accuracy = float(np.mean((model.predict(xgb.DMatrix(x_test)) > 0.5) == y_test))
        print(f"test accuracy {accuracy:.4f} for {config}")
        return {"test_accuracy": accuracy, "test_rows": len(y_test), "config": config}

    @task
    def report(scored: dict, logloss: float, trials: int) -> str:
        line = (f"Tune: best of {trials} trials has validation logloss {logloss:.4f}, "
                f"test accuracy {scored['test_accuracy']:.4f} ({scored['config']})")
        print(line)
        return line

    best = search()
    report(evaluate(best["model"], best["config"]), best["logloss"], best["trials"])


example_ray_tune_xgboost()
