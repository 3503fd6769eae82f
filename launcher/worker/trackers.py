"""The experiment trackers rank 0 reports to besides TensorBoard (tracking.report_to): W&B and MLflow.

Each gets the same series TensorBoard does (`split/name` at each step: train/loss, eval/accuracy, ...) and the
resolved configuration as parameters, dotted keys, secrets masked (launcher.launch.commands.SECRET: a key naming a
token, key, password or credential is sent as ***).
"""

from __future__ import annotations

import os
import time

from launcher.launch.commands import mask
from launcher.tracking import chosen, flat, masked_settings, plain_uri, split_password


class Wandb:
    def __init__(self, project: str, name: str, out_dir: str, params: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints are not the run's output
        self.run = wandb.init(project=project, name=name, dir=out_dir, config=params)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, uri: str, experiment: str, name: str, params: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked: the default here, asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A client of its own, not mlflow's global active run: nothing leaks into the process's other code.
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def tracker_places(tracking, out_dir: str) -> list[tuple[str, str]]:
    """(tracker, where its records went) for the trackers `tracking` names, as the run's last table says them."""
    out = []
    for which in chosen(tracking.report_to):
        if which == "wandb":
            out.append(("wandb", os.path.join(out_dir, "wandb")))
        elif which == "mlflow":
            uri = split_password(tracking.mlflow_uri)[0] if tracking.mlflow_uri else ""
            out.append(("mlflow", uri or os.path.join(os.path.abspath(out_dir), "mlruns")))
    return out


def open_trackers(tracking, recipe: str, out_dir: str, config: dict) -> list:
    """The trackers `tracking` (a TrackingConfig) names, started with `config` (to_dict of the run's) as
    parameters."""
    config = masked_settings(config)
    params = {k: mask(k.rsplit(".", 1)[-1], v) if isinstance(v, str) else v for k, v in flat(config).items()}
    project = tracking.project or recipe
    name = tracking.run_name or os.path.basename(os.path.normpath(out_dir))
    out = []
    for which in chosen(tracking.report_to):
        if which == "wandb":
            out.append(Wandb(project, name, out_dir, params))
        elif which == "mlflow":
            uri = plain_uri(tracking.mlflow_uri) or "file:" + os.path.join(os.path.abspath(out_dir), "mlruns")
            out.append(Mlflow(uri, project, name, params))
    return out
