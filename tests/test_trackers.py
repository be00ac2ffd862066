"""Experiment trackers: W&B (offline, read back from its run files) and MLflow (SQLite store, read back through
MLflow's client) get the metrics, the config and the images, and a resumed run continues their run."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from support import FAST

from image_finetune.core.cli import user_errors
from image_finetune.ops.loggers import RUN_DIR_TAG, finish_wandb_run, mlflow_logger, wandb_logger
from image_finetune.training.train import train

pytestmark = pytest.mark.usefixtures("pretrained")


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks,
    each record ``crc32 | length (2 bytes, little-endian) | type (1 = full, 2 = first, 3 = middle, 4 = last)``)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record wandb-core is still writing: the file's live tail, not a record
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0 and length == 0:
            break
    return records


def finished_wandb_records(path: Path, deadline_s: float = 120) -> list:
    """The records of a run file once its ``exit`` record is on disk: wandb-core (a separate process) may still be
    writing the file's tail when ``wandb.finish()`` returns, so a read right away can see half a record."""
    end = time.monotonic() + deadline_s
    while True:
        records = wandb_records(path)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > end:
            return records
        time.sleep(0.2)


def wandb_history(records: list) -> list[dict[str, object]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


@pytest.mark.slow
def test_wandb_and_mlflow_get_metrics_config_and_images_and_a_resumed_run_continues_them(
    compose_cfg, image_folder, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    common = [
        "data=imagefolder",
        f"data.root={image_folder}",
        "logger=[tensorboard,wandb,mlflow]",
        "finetune=full",
        "test=false",
        *FAST,
    ]
    train(compose_cfg(*common, "trainer.max_epochs=1", output_dir=run_dir))
    finish_wandb_run()  # what the end of a job does (Hydra callback multirun.FinishTrackers)
    train(compose_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last", output_dir=run_dir))
    finish_wandb_run()  # flushes the run files

    # W&B: two processes' offline files, one run id (the run dir's), both epochs' val metrics, the config, the images
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    files = [next(d.glob("run-*.wandb")) for d in offline]
    assert files[0].name == files[1].name
    records = {f: finished_wandb_records(f) for f in files}
    assert all(r[-1].WhichOneof("record_type") == "exit" for r in records.values()), "W&B never finished its files"
    history = [row for f in files for row in wandb_history(records[f])]
    assert [row["epoch"] for row in history if "val/acc" in row] == [0, 1]
    config = [r for f in files for r in records[f] if r.WhichOneof("record_type") == "config"]
    assert any(item.key == "model" and "resnet18" in item.value_json for r in config for item in r.config.update)
    images = {
        p.parent.name + "/" + p.name.split("_")[0]
        for d in offline
        for p in (d / "files" / "media" / "images").rglob("*.png")
    }
    assert {"train/augmented", "val/confusion", "val/misclassified"} <= images

    # MLflow: one run for the run dir, both epochs, the flattened config as params, the images as artifacts
    client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-finetune")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_DIR_TAG] == str(run_dir.resolve())
    run_id = runs[0].info.run_id
    assert len(client.get_metric_history(run_id, "val/acc")) == 2  # one per epoch, across both processes
    assert runs[0].data.params["model/backbone/name"] == "resnet18"
    artifacts = [a.path for a in client.list_artifacts(run_id, "images")]
    for tag in ("train~augmented_batch", "val~confusion_matrix", "val~misclassified"):
        assert any(tag in a for a in artifacts), (tag, artifacts)


@pytest.mark.parametrize(("factory", "extra"), [(wandb_logger, "wandb"), (mlflow_logger, "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(factory, extra, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a))
    with pytest.raises(SystemExit) as exit_info, user_errors():
        factory(run_dir=tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: logger={extra} needs the {extra} package: pip install -e '.[{extra}]' (or pip install {extra})"
    )
