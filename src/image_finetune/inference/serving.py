"""``serve(cfg)``: a trained checkpoint (or its ONNX export) behind ``POST /predict``, on LitServe.

Two processes do the work, and each checks what it can:

- the HTTP server (uvicorn, inside LitServe) runs ``UploadGuard`` before LitServe's handler: the content type (415),
  the size (413, from ``Content-Length`` before reading and while reading), a client too slow to send its body
  (408 after ``read_timeout`` seconds), an empty body or a form without a ``file``/``image`` field (400). What passes
  is handed on as one JSON field (LitServe passes a JSON body to the workers as it is; a multipart upload over 1 MB
  would reach them as an open temporary file, which cannot cross the process boundary);
- the inference workers (``ClassifierAPI``) decode and preprocess each image with the checkpoint's own
  ``Preprocessing`` (what ``predict.py`` runs: same decoder, same resize), refuse images over the pixel limit from
  their header, and batch the rest (``max_batch_size``, ``batch_timeout``). A bad image is an answer of its own, never
  an exception: LitServe fails the whole batch on one, so the good requests batched with it still get theirs.

Every error is ``{"error": "<one line>"}`` with a 4xx code (5xx only for the server's own failures).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.scan import TOO_LARGE, failure_reason, over_pixel_limit, reason_kind
from image_finetune.inference.classifier import Classifier, label_sets, read_sidecar, to_float, top_k_predictions

try:  # an optional dependency (the ``serve`` extra)
    import litserve as ls
except ImportError as e:
    raise UserError("serve.py needs LitServe: pip install 'image-finetune[serve]'") from e

__all__ = ["ClassifierAPI", "UploadGuard", "serve"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
#: Multipart fields an image may come in (the first one present is used).
IMAGE_FIELDS = ("file", "image")
#: The field ``UploadGuard`` hands an accepted image on in (base64), inside the server.
PAYLOAD_FIELD = "image_base64"


def error_response(status: int, reason: str) -> JSONResponse:
    """The one shape of every error answer: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(str(reason).split())}, status_code=status)


class UploadGuard:
    """ASGI middleware for ``POST <path>``: refuse what is not one bounded image upload before any worker sees it.

    Accepts ``multipart/form-data`` with a ``file`` or ``image`` field, or a raw body with an ``image/*`` content
    type. Other paths and methods pass through untouched.
    """

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int, read_timeout: float) -> None:
        self.app, self.path, self.max_bytes, self.read_timeout = app, path, max_bytes, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            image = await self._read_image(scope, receive)
        except HTTPException as e:
            await error_response(e.status_code, str(e.detail))(scope, receive, send)
            return
        if image is None:  # the client went away
            return
        body = json.dumps({PAYLOAD_FIELD: base64.b64encode(image).decode("ascii")}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, if the client goes away meanwhile
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def _read_image(self, scope: Scope, receive: Receive) -> bytes | None:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        multipart = media_type == "multipart/form-data"
        if not (multipart or media_type.startswith("image/")):
            raise HTTPException(
                415,
                f"content type {media_type or 'missing'!r}: send the image as multipart/form-data (field "
                f"'file' or 'image') or as the raw body with an image/* content type",
            )
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise HTTPException(413, f"request of {int(length):,} bytes is over the limit of {self.max_bytes:,} bytes")
        body = await self._read_body(receive)
        if body is None:
            return None
        if not body:
            raise HTTPException(400, "empty body: send an image")
        if not multipart:
            return body
        return await self._form_image(scope, content_type, body)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, within ``read_timeout`` seconds and ``max_bytes``; None when the client disconnects."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.read_timeout:g} s (read_timeout)"
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise HTTPException(413, f"request is over the limit of {self.max_bytes:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _form_image(scope: Scope, content_type: str, body: bytes) -> bytes:
        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({**scope, "headers": [(b"content-type", content_type.encode("latin-1"))]}, replay)
        try:
            async with request.form(max_files=len(IMAGE_FIELDS), max_fields=16) as form:
                field = next((name for name in IMAGE_FIELDS if name in form), None)
                if field is None:
                    raise HTTPException(400, f"the form has no {' or '.join(map(repr, IMAGE_FIELDS))} field")
                upload = form[field]
                if not isinstance(upload, UploadFile):
                    raise HTTPException(400, f"form field {field!r} is text, not a file upload")
                image = await upload.read()
        except MultiPartException as e:
            raise HTTPException(400, f"malformed multipart body: {e.message}") from None
        if not image:
            raise HTTPException(400, f"form field {field!r} is an empty file: send an image")
        return image


async def json_http_error(request: Request, exc: Exception) -> JSONResponse:
    """LitServe's own errors (504 timeout, 500) and FastAPI's (404, 405) in the same ``{"error": ...}`` shape."""
    status = getattr(exc, "status_code", 500)
    return error_response(status, str(getattr(exc, "detail", "") or "internal server error"))


@dataclass(frozen=True)
class Rejected:
    """A request whose image cannot be classified: its answer, carried through the batch in place of a prediction."""

    status: int
    reason: str


@dataclass
class LoadedModel:
    """What a worker classifies with, whichever the backend: the input preprocessing and NCHW uint8 -> probabilities."""

    class_names: list[str]
    preprocessing: Preprocessing
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    threshold: float | list[float] | None = None
    """Multi-label: the decision threshold(s) stored with the model (the answer's ``label_set``); None: single-label."""


def load_torch(path: str, device: str, cfg: dict[str, Any]) -> LoadedModel:
    """The checkpoint as ``predict.py`` loads it (``Classifier``: its preprocessing, ``tta``, overrides)."""
    classifier = Classifier.from_checkpoint(
        path, device, image_size=cfg.get("image_size"), crop_ratio=cfg.get("crop_ratio"), tta=cfg.get("tta")
    )
    threshold = classifier.threshold if classifier.multilabel else None
    return LoadedModel(classifier.class_names, classifier.input_preprocessing, classifier.probabilities, threshold)


def load_onnx(path: str, threads: int | None = None) -> LoadedModel:
    """An ``export.py format=onnx`` file and its JSON: onnxruntime on the CPU runs the network, no torch model."""
    meta = read_sidecar(path)
    if meta["format"] != "onnx":
        raise ConfigError(f"backend=onnx but {path} is a {meta['format']} export: export it with format=onnx")
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'image-finetune[export]'") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output_name, input_name = meta.get("output_name", "logits"), meta.get("input_name", "images")

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        logits = session.run([output_name], {input_name: to_float(images).numpy()})[0]
        scores = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        return scores.sigmoid() if meta.get("task") == "multilabel" else scores.softmax(dim=-1)

    threshold = meta.get("threshold") if meta.get("task") == "multilabel" else None
    return LoadedModel(
        list(meta["class_names"]), Preprocessing.from_dict(meta["preprocessing"]), probabilities, threshold
    )


class ClassifierAPI(ls.LitAPI):
    """One inference worker: ``setup`` loads the model on its device; requests are decoded, batched and classified."""

    def __init__(self, backend: str, path: str, options: dict[str, Any], *, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.backend, self.path, self.options = backend, path, options
        self.top_k = int(options["top_k"])

    def setup(self, device: str) -> None:
        threads = self.options.get("threads")
        if str(device).startswith("cpu") and threads:
            torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them
        if self.backend == "onnx":
            self.model = load_onnx(self.path, threads)
        else:
            self.model = load_torch(self.path, device, self.options)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe then passes the JSON
        try:
            data = base64.b64decode(request[PAYLOAD_FIELD], validate=True)
        except (KeyError, TypeError, ValueError):
            return Rejected(400, "the request carries no image")
        try:
            with Image.open(io.BytesIO(data)) as header:  # the header only: refuse a bomb before decoding it
                too_large = over_pixel_limit(header.size)  # Pillow itself decodes up to twice its limit
            if too_large is not None:
                return Rejected(413, f"cannot classify the image: {too_large}")
            return self.model.preprocessing.load(data)
        except Exception as e:  # whatever the decoder raised: the reason in the folder scan's (and predict.py's) words
            reason = failure_reason(e)
            return Rejected(413 if reason_kind(reason) == TOO_LARGE else 400, f"cannot classify the image: {reason}")

    def batch(self, inputs: list[torch.Tensor | Rejected]) -> list[torch.Tensor | Rejected]:
        return list(inputs)  # stacked in predict, without the rejected ones

    def predict(self, x: Any) -> Any:
        items = x if isinstance(x, list) else [x]  # a list when batching (max_batch_size > 1)
        results: list[dict[str, Any] | Rejected] = list(items)
        good = [i for i, item in enumerate(items) if not isinstance(item, Rejected)]
        if good:
            probabilities = self.model.probabilities(torch.stack([items[i] for i in good]))
            for i, p in zip(good, top_k_predictions(probabilities, self.model.class_names, self.top_k)):
                results[i] = {"labels": list(p.labels), "probabilities": list(p.probabilities)}
            if self.model.threshold is not None:  # multi-label: every label over its threshold, in label order
                sets = label_sets(probabilities, self.model.class_names, self.model.threshold)
                for i, chosen in zip(good, sets):
                    results[i]["label_set"] = list(chosen)
        return results if isinstance(x, list) else results[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def encode_response(self, output: dict[str, Any] | Rejected) -> Any:
        if isinstance(output, Rejected):
            return error_response(output.status, output.reason)
        return output


_MAIN_PID = os.getpid()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``docker stop``) shuts down as Ctrl-C does: LitServe then stops its workers too.

    The HTTP servers are forked from this process and inherit the handler; uvicorn re-raises the signal once it has
    stopped, and there it only needs to end the process quietly.
    """
    if os.getpid() != _MAIN_PID:
        raise SystemExit(0)
    raise KeyboardInterrupt


def check_options(cfg: DictConfig) -> None:
    """The settings a typo would turn into a server that cannot work, each refused in one line before starting."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend={cfg.backend!r}: choose one of {list(BACKENDS)}")
    for key in ("top_k", "max_batch_size", "workers_per_device", "port"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} must be a whole number of at least 1")
    for key in ("max_request_mb", "read_timeout", "timeout"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive number")
    if not isinstance(cfg.batch_timeout, (int, float)) or not 0 <= cfg.batch_timeout < cfg.timeout:
        raise ConfigError(f"batch_timeout={cfg.batch_timeout!r} must be at least 0 and below timeout={cfg.timeout}")
    if not 1024 <= cfg.port <= 65535:
        raise ConfigError(f"port={cfg.port} must be from 1024 to 65535")
    if cfg.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise ConfigError(f"host={cfg.host!r}: choose 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface)")
    if cfg.backend == "onnx" and cfg.accelerator not in ("cpu", "auto"):
        raise ConfigError(f"backend=onnx runs on the CPU (onnxruntime): use accelerator=cpu, not {cfg.accelerator!r}")


def serve(cfg: DictConfig, *, run: bool = True) -> Any:
    """Serve ``cfg.ckpt_path`` until interrupted; with ``run=False``, return the ``LitServer`` unstarted (tests)."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is required: python serve.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt "
            "(or backend=onnx ckpt_path=<export dir>/model.onnx)"
        )
    check_options(cfg)
    options = {k: cfg.get(k) for k in ("top_k", "image_size", "crop_ratio", "tta")}
    accelerator = "cpu" if cfg.backend == "onnx" else cfg.accelerator
    if accelerator == "cpu":
        options["threads"] = max(1, (os.cpu_count() or 1) // cfg.workers_per_device)
    # Load once here, so that every mistake (a missing or foreign file, a bad override) is one line before any
    # worker starts; the workers load their own copy on their device.
    if cfg.backend == "onnx":
        path = str(cfg.ckpt_path)
        model = load_onnx(path)
    else:
        path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
        assert path is not None
        model = load_torch(path, "cpu", options)
    metadata = {
        "source": os.path.abspath(path),
        "backend": cfg.backend,
        "class_names": model.class_names,
        "top_k": cfg.top_k,
        "preprocessing": model.preprocessing.as_dict(),
    }
    del model
    api = ClassifierAPI(
        cfg.backend, path, options, max_batch_size=cfg.max_batch_size, batch_timeout=float(cfg.batch_timeout)
    )
    guard = {"path": "/predict", "max_bytes": int(cfg.max_request_mb * 2**20), "read_timeout": float(cfg.read_timeout)}
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=cfg.devices,
        workers_per_device=cfg.workers_per_device,
        timeout=float(cfg.timeout),
        model_metadata=metadata,
        middlewares=[(UploadGuard, guard)],
    )
    server.app.add_exception_handler(HTTPException, json_http_error)
    if not run:
        return server
    log.info(
        "serving %s (%s, %d classes) at http://%s:%d/predict; %d worker(s) per device, batches of up to %d",
        path, cfg.backend, len(metadata["class_names"]), cfg.host, cfg.port, cfg.workers_per_device, cfg.max_batch_size,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    server.run(
        host=cfg.host,
        port=cfg.port,
        generate_client_file=False,  # LitServe would write client.py into the current folder
        log_level=cfg.log_level,
        timeout_keep_alive=cfg.keep_alive_timeout,  # uvicorn: idle keep-alive connections are closed after this
        access_log=cfg.access_log,
    )
    return server
