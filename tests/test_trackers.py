"""Experiment trackers beside TensorBoard: W&B offline and an MLflow file store get the series
metrics.jsonl has, and the resolved configuration as parameters, with secrets masked."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from tests.conftest import RECIPE, ROOT, launcher_cli, run, tiny_args, why_failed

TOKEN_RECIPE = str(ROOT / "tests" / "helpers" / "token_cls.py")

pytest.importorskip("wandb", reason="the tracking extra (pip install 'launcher[tracking]') is not installed")
pytest.importorskip("mlflow", reason="the tracking extra (pip install 'launcher[tracking]') is not installed")


def wandb_history(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """The series and the config of an offline W&B run, read from its .wandb file (W&B's record log: 7-byte
    header, then protobuf Records in 32 KiB blocks, each piece behind a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, block, records, partial = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        piece, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(piece)
        elif kind in (2, 3):
            partial = (b"" if kind == 2 else partial) + piece
        elif kind == 4:
            records.append(partial + piece)
    series: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif record.WhichOneof("record_type") in ("config", "run"):  # the run record carries the initial config
            update = record.config.update if record.HasField("config") else record.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    return series, config


def mlflow_history(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """The series and parameters of the one run in output_dir/mlruns (MLflow's file store: a file per metric,
    lines "timestamp value step")."""
    (run,) = [p.parent for p in (run_dir / "mlruns").glob("*/*/meta.yaml") if (p.parent / "metrics").is_dir()]
    series = {}
    for f in (run / "metrics").rglob("*"):
        if f.is_file():
            rows = [line.split() for line in f.read_text().splitlines()]
            series[str(f.relative_to(run / "metrics"))] = [(int(s), float(v)) for _, v, s in rows]
    params = {str(f.relative_to(run / "params")): f.read_text() for f in (run / "params").rglob("*") if f.is_file()}
    return series, params


def jsonl_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k not in ("step", "split", "epoch", "time") and isinstance(v, (int, float)):
                series.setdefault(f"{r['split']}/{k}", []).append((r["step"], v))
    return series


def test_wandb_offline_and_mlflow_get_the_series_of_metrics_jsonl_and_the_configuration(
    tiny_model, tiny_data, tmp_path
):
    out = tmp_path / "run"
    settings = tiny_args(tiny_model, tiny_data, out, "train.max_steps=4", "train.eval_every=2",
                         "tracking.report_to=wandb,mlflow", "tracking.project=trackers-test")  # fmt: skip
    proc = run(["python", RECIPE, *settings], cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, why_failed(proc)
    said = {
        line.split()[0]: line.split()[1]
        for line in proc.stdout.splitlines()
        if line.startswith(("  wandb", "  mlflow"))
    }
    assert said == {"wandb": str(out / "wandb"), "mlflow": str(out / "mlruns")}, proc.stdout[-2000:]
    assert (out / "wandb").is_dir() and (out / "mlruns").is_dir()
    expected = jsonl_series(out)
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/accuracy"} <= set(expected)
    assert [s for s, _ in expected["train/loss"]] == [1, 2, 3, 4] and len(expected["eval/accuracy"]) == 2
    for name, (series, params) in {"wandb": wandb_history(out), "mlflow": mlflow_history(out)}.items():
        assert set(series) == set(expected), name
        for key, points in expected.items():
            assert [s for s, _ in series[key]] == [s for s, _ in points], (name, key)
            assert [v for _, v in series[key]] == pytest.approx([v for _, v in points], rel=1e-6), (name, key)
        assert str(params["train.lr"]) in ("0.001", "1e-3", "0.001\n"), (name, params.get("train.lr"))
        assert params["strategy.name"] in ("ddp", "auto") and params["tracking.project"] == "trackers-test"


def test_secret_parameters_are_masked_before_any_tracker_sees_them(tmp_path):
    from launcher.config import TrackingConfig
    from launcher.worker.trackers import open_trackers

    tracking = TrackingConfig(report_to="mlflow")
    config = {"model": "m", "data": {"hf_token": "hf_abc123", "api_key": "sk-1"}, "train": {"lr": 0.1}}
    (tracker,) = open_trackers(tracking, "recipe", str(tmp_path), config)
    tracker.close()
    _, params = mlflow_history(tmp_path)
    assert params["data.hf_token"] == "***" and params["data.api_key"] == "***" and params["train.lr"] == "0.1"
    assert not any("hf_abc123" in p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_bad_tracker_settings_are_usage_errors_naming_the_setting(tmp_path):
    from launcher.tracking import problems

    assert problems("tensorboard") == [] and problems("") == []
    assert problems("neptune") == ["tracking.report_to=neptune: no tracker named neptune; choose wandb, mlflow or both"]
    home = {"HOME": str(tmp_path)}  # no ~/.netrc login there
    assert "W&B has no credentials here" in problems("wandb", environ=home)[0]
    assert problems("wandb,mlflow", environ={**home, "WANDB_MODE": "offline"}) == []
    proc = launcher_cli(["run", RECIPE, "tracking.report_to=wandb,comet", "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 2 and "tracking.report_to=wandb,comet: no tracker named comet" in proc.stderr, proc.stderr


def test_a_password_in_the_mlflow_uri_reaches_the_ranks_and_is_written_nowhere(tiny_model, tiny_data, tmp_path):
    """`launcher run` with tracking.mlflow_uri=https://alice:PASSWORD@host: the dry run and every file of the run
    (plan, checkpoint manifest, logs, metrics) show it masked; each rank has it in MLflow's own variable."""
    import hashlib

    secret = "s3cret-Pa55"
    uri = f"https://alice:{secret}@mlflow.example:5000/track"
    out = tmp_path / "run"
    args = tiny_args(
        tiny_model, tiny_data, out, "train.max_steps=2", "checkpoint.every_steps=2", f"tracking.mlflow_uri={uri}"
    )
    dry = launcher_cli(["run", TOKEN_RECIPE, "--nproc", "2", "--dry-run", *args], cwd=tmp_path)
    assert dry.returncode == 0 and secret not in dry.stdout + dry.stderr, dry.stderr
    assert '"mlflow_uri": "https://alice:***@mlflow.example:5000/track"' in dry.stdout
    proc = run(["launcher", "run", TOKEN_RECIPE, "--nproc", "2", *args], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    assert secret not in proc.stdout + proc.stderr
    written = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert written == [], written
    want = hashlib.sha256(secret.encode()).hexdigest()
    assert [(out / f"mlflow_tracking_password-rank{r}.sha256").read_text() for r in (0, 1)] == [want, want]
    assert json.loads((out / "config.json").read_text())["config"]["tracking"]["mlflow_uri"] == (
        "https://alice:***@mlflow.example:5000/track"
    )
