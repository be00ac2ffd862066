"""`python serve.py`: answers equal predict.py's, hostile requests get a 4xx and one line, the server keeps serving.

One server for the whole module, started as a user starts it (a subprocess) and stopped in teardown; the ONNX
backend's worker is driven in this process.
"""

from __future__ import annotations

import base64
import csv
import json
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from messy_folder import bomb_png, truncated_jpeg

from image_finetune.core.errors import ConfigError, UserError
from image_finetune.inference.export import export_classifier
from image_finetune.inference.serving import PAYLOAD_FIELD, ClassifierAPI, serve

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the load test's server and request helpers
from load_test import ServerProcess, chunked_upload, multipart, oversized_upload, post, stalled_upload  # noqa: E402

pytest_plugins = ["trained"]  # the shared `trained` fixture

#: Settings that make the limits cheap to reach: 1 MB requests, 1 s to send a body; batches of up to 4.
LIMITS = ["max_request_mb=1", "read_timeout=1", "max_batch_size=4", "batch_timeout=0.05", "top_k=3", "access_log=false"]


@pytest.fixture(scope="module")
def servers():
    """Started servers by backend; every one is stopped when the module ends, whatever the tests did."""
    started: dict[str, ServerProcess] = {}
    yield started
    for server in started.values():
        server.stop()


def start(servers: dict, backend: str, model: Path, run_dir: Path) -> ServerProcess:
    if backend not in servers:
        server = ServerProcess(
            f"ckpt_path={model}", f"backend={backend}", "accelerator=cpu", f"hydra.run.dir={run_dir}", *LIMITS,
            log_path=run_dir.with_suffix(".log"),
        )  # fmt: skip
        servers[backend] = server
        server.wait_healthy(deadline_s=240)
    return servers[backend]


@pytest.fixture
def torch_server(trained, servers, tmp_path_factory) -> ServerProcess:
    return start(servers, "torch", trained.checkpoint, tmp_path_factory.mktemp("serve") / "torch")


def sample_images(trained) -> list[Path]:
    """A JPEG and a PNG of each class."""
    return [trained.images / f"class_{c}" / name for c in range(3) for name in ("img_000.jpg", "img_001.png")]


def predict_py(trained, images: list[Path], run_dir: Path, monkeypatch) -> dict[str, dict[str, float]]:
    """``python predict.py`` on these files (run in this process, as tests/test_predict.py does): label -> p."""
    listing = run_dir / "inputs.txt"
    run_dir.mkdir(parents=True)
    listing.write_text("\n".join(map(str, images)))
    argv = ["predict.py", f"ckpt_path={trained.checkpoint}", f"input={listing}", "num_workers=0", "device=cpu",
            "top_k=3", "progress=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    runpy.run_path(str(REPO / "predict.py"), run_name="__main__")
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {row["path"]: {row[f"label_{i}"]: float(row[f"probability_{i}"]) for i in (1, 2, 3)} for row in rows}


def as_probabilities(answer: dict) -> dict[str, float]:
    assert set(answer) == {"labels", "probabilities"} and len(answer["labels"]) == 3
    assert answer["probabilities"] == sorted(answer["probabilities"], reverse=True)
    return dict(zip(answer["labels"], answer["probabilities"]))


def assert_close(got: dict[str, float], expected: dict[str, float], tolerance: float) -> None:
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) <= tolerance, (got, expected)


def test_answers_equal_predict_py_for_every_way_of_sending(trained, torch_server, tmp_path, monkeypatch):
    images = sample_images(trained)
    expected = predict_py(trained, images, tmp_path / "predict", monkeypatch)
    ways = [
        lambda p: multipart(p.read_bytes(), "file", p.name),
        lambda p: multipart(p.read_bytes(), "image", p.name),
        lambda p: (p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg"),
    ]
    requests = [(p, way(p)) for way in ways for p in images]
    with ThreadPoolExecutor(8) as pool:  # at once, so that the worker batches them
        answers = list(pool.map(lambda item: post(torch_server.url, *item[1]), requests))
    for (path, _), (status, answer) in zip(requests, answers):
        assert status == 200, answer
        assert_close(as_probabilities(answer), expected[str(path)], 1e-5)


def test_hostile_requests_get_their_4xx_and_one_line_and_the_server_keeps_serving(trained, torch_server, tmp_path):
    url, port = torch_server.url, torch_server.port
    good = sample_images(trained)[0]
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    bomb = bomb_png(tmp_path / "bomb.png", side=10_000).read_bytes()  # 100 Mpx: over the limit Pillow only warns at
    cases = {
        "not an image": (lambda: post(url, *multipart(b"hello, not a picture")), 400, "cannot classify the image: not an image"),
        "truncated": (lambda: post(url, cut, "image/jpeg"), 400, "cannot classify the image: truncated"),
        "empty body": (lambda: post(url, b"", "image/png"), 400, "empty body: send an image"),
        "empty file": (lambda: post(url, *multipart(b"")), 400, "form field 'file' is an empty file: send an image"),
        "no image field": (lambda: post(url, *multipart(good.read_bytes(), "photo")), 400, "the form has no 'file' or 'image' field"),
        "wrong content type": (lambda: post(url, good.read_bytes(), "text/plain"), 415, "content type 'text/plain': send the image as multipart/form-data (field 'file' or 'image') or as the raw body with an image/* content type"),
        "no content type": (lambda: post(url, good.read_bytes(), None), 415, "content type 'application/x-www-form-urlencoded': send the image"),
        "announced too large": (lambda: oversized_upload(port, 10**10), 413, "request of 10,000,000,000 bytes is over the limit of 1,048,576 bytes"),
        "sent too large": (lambda: chunked_upload(port, 2**20), 413, "request is over the limit of 1,048,576 bytes"),
        "decompression bomb": (lambda: post(url, *multipart(bomb, "image", "bomb.png")), 413, "cannot classify the image: too large (decompression bomb): 10000x10000 = 100,000,000 px, over PIL.Image.MAX_IMAGE_PIXELS = 89,478,485"),
        "stalled client": (lambda: stalled_upload(port, timeout=30), 408, "the request body did not arrive within 1 s (read_timeout)"),
    }  # fmt: skip
    with ThreadPoolExecutor(len(cases) + 4) as pool:  # hostile and good requests together, some in the same batch
        futures = {name: pool.submit(send) for name, (send, _, _) in cases.items()}
        good_answers = list(pool.map(lambda _: post(url, *multipart(good.read_bytes())), range(4)))
        answers = {name: future.result() for name, future in futures.items()}
    for name, (_, status, message) in cases.items():
        got_status, answer = answers[name]
        assert got_status == status, (name, answer)
        assert set(answer) == {"error"} and "\n" not in answer["error"], (name, answer)
        assert message is None or answer["error"].startswith(message), (name, answer)
    assert [status for status, _ in good_answers] == [200] * 4
    status, answer = post(url, *multipart(good.read_bytes()))  # still serving afterwards
    assert status == 200 and answer["labels"][0].startswith("class_")
    assert "Traceback" not in torch_server.log()


def test_onnx_backend_answers_as_the_checkpoint(trained, tmp_path, monkeypatch):
    """The worker of ``backend=onnx`` driven in this process, as LitServe drives it (decode, batch, predict, unbatch,
    encode): a second server start would cost more than the rest of the module, and the HTTP side is the same."""
    model = export_classifier(trained.classifier, "onnx", tmp_path / "model.onnx", source=str(trained.checkpoint))
    api = ClassifierAPI("onnx", str(model), {"top_k": 3}, max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")
    images = sample_images(trained)
    expected = predict_py(trained, images, tmp_path / "predict", monkeypatch)
    requests = [{PAYLOAD_FIELD: base64.b64encode(p.read_bytes()).decode()} for p in images]
    requests.append({PAYLOAD_FIELD: base64.b64encode(b"hello").decode()})  # a bad image in the same batch
    answers = [
        api.encode_response(y) for y in api.unbatch(api.predict(api.batch(list(map(api.decode_request, requests)))))
    ]
    for path, answer in zip(images, answers):
        assert_close(as_probabilities(answer), expected[str(path)], 1e-4)  # export.py's own tolerance for the file
    assert answers[-1].status_code == 400
    assert json.loads(answers[-1].body) == {"error": "cannot classify the image: not an image"}


def test_mistakes_are_one_line_before_anything_starts(trained, compose_cfg, tmp_path):
    with pytest.raises(UserError, match=r"^ckpt_path='.*nope.ckpt': no checkpoint at "):
        serve(compose_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}", config_name="serve"), run=False)
    with pytest.raises(ConfigError, match=r"^backend='tensorflow': choose one of \['torch', 'onnx'\]$"):
        serve(compose_cfg(f"ckpt_path={trained.checkpoint}", "backend=tensorflow", config_name="serve"), run=False)
    with pytest.raises(UserError, match=r"model.onnx.json is missing"):
        serve(compose_cfg(f"ckpt_path={tmp_path / 'model.onnx'}", "backend=onnx", config_name="serve"), run=False)
    with pytest.raises(ConfigError, match=r"^batch_timeout=60 must be at least 0 and below timeout=30$"):
        serve(compose_cfg(f"ckpt_path={trained.checkpoint}", "batch_timeout=60", config_name="serve"), run=False)
