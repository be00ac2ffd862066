"""Load test of ``serve.py`` on localhost: throughput and latency at several concurrencies, then hostile requests.

    PYTHONPATH=src python benchmarks/load_test.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \\
        --images data/digits [--requests 200] [--concurrency 1 8 32] [--max-seconds 300] [--backend torch]

Starts ``python serve.py`` on a free port (127.0.0.1 only) and stops it at the end, whatever happens. Bounded: at most
``--requests`` requests per phase and ``--max-seconds`` in all (a phase past the deadline stops early and says so);
every request has a timeout. Reports, per concurrency, images/s and p50/p99 latency, beside ``predict.py``'s batch
throughput on the same model and images in the same run (its ``classify_files``, in this process, batch 64, no
worker processes, timed after one warm-up batch). Then a hostile phase (not an image, truncated, empty, wrong content
type, over the size limit, a decompression bomb, a client that stalls mid-body) mixed with good requests, and checks:
every good request answered 200, every hostile one its 4xx, the server's RSS back near its baseline, /health still
200 and a last request answered (nothing stuck). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python serve.py ARGS`` on a free port, in its own process group so that stopping it stops its workers too."""

    def __init__(self, *args: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # a file, not a pipe (a full pipe blocks the server); closed in stop
        command = [sys.executable, str(REPO / "serve.py"), *args, f"port={self.port}"]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_healthy(self, deadline_s: float = 300.0) -> None:
        """Poll ``/health`` until 200; raises with the server's log if it exits or the deadline passes."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)  # a polling interval, not a synchronisation: the loop ends on the answer
        raise TimeoutError(f"serve.py not healthy after {deadline_s:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        """Resident memory of the server and all its processes (HTTP servers, workers), in MB."""
        import psutil

        root = psutil.Process(self.process.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total / 2**20

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (serve.py shuts its workers down), then SIGKILL to the whole group if it has not ended in time."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (none after a clean shutdown)
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        return self.process.returncode


def post(url: str, body: bytes, content_type: str | None, timeout: float = 60.0) -> tuple[int, dict]:
    """POST raw bytes; (status, JSON answer) for 2xx and 4xx/5xx alike."""
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def multipart(data: bytes, field: str = "file", filename: str = "image.jpg") -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = "----image-finetune-load-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 30.0) -> tuple[int, dict]:
    """Send exactly these bytes (headers as given, maybe a body shorter than announced) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def stalled_upload(port: int, timeout: float = 60.0) -> tuple[int, dict]:
    """Announce 1,000 bytes, send 10 and stop: the server must answer 408 after its read_timeout, not wait for ever."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    return raw_request(port, head, b"\x89PNG\r\n\x1a\n\0\0", timeout)


def oversized_upload(port: int, size: int) -> tuple[int, dict]:
    """Announce ``size`` bytes and send none: refused from the header alone (413)."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    return raw_request(port, head)


def chunked_upload(port: int, size: int) -> tuple[int, dict]:
    """A chunked body (no Content-Length) of ``size`` bytes and one more: counted while read, refused with 413.

    The terminating chunk is never sent, so the server has read all there is when it answers (unread bytes would
    make it reset the connection before the answer is read)."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    body = f"{size:x}\r\n".encode() + b"\0" * size + b"\r\n1\r\n\0\r\n"
    return raw_request(port, head, body)


def hostile_cases(port: int, url: str, images: Sequence[Path], tmp: Path) -> dict[str, tuple[int, object]]:
    """name -> (expected status, a function sending it and returning (status, answer))."""
    sys.path.insert(0, str(REPO / "tests"))
    from messy_folder import bomb_png, truncated_jpeg

    good = images[0].read_bytes()
    cut = truncated_jpeg(tmp / "cut.jpg").read_bytes()
    bomb = bomb_png(tmp / "bomb.png", side=10_000).read_bytes()  # 100 Mpx: over the limit, under Pillow's refusal
    return {
        "not an image": (400, lambda: post(url, *multipart(b"hello, not a picture"))),
        "truncated": (400, lambda: post(url, cut, "image/jpeg")),
        "empty body": (400, lambda: post(url, b"", "image/png")),
        "wrong content type": (415, lambda: post(url, good, "text/plain")),
        "over max_request_mb": (413, lambda: oversized_upload(port, 10**10)),
        "decompression bomb": (413, lambda: post(url, *multipart(bomb, "image", "bomb.png"))),
        "stalled client": (408, lambda: stalled_upload(port)),
    }


def run_phase(url: str, bodies: Sequence[tuple[bytes, str]], concurrency: int, deadline: float) -> dict:
    """Send every body once with ``concurrency`` clients; latencies of the 200s, and the other answers."""
    latencies: list[float] = []
    failures: list[tuple[int, dict]] = []

    def one(body: tuple[bytes, str]) -> None:
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        status, answer = post(url, *body)
        if status == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failures.append((status, answer))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    elapsed = time.perf_counter() - start
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": done,
        "img_s": done / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else float("nan"),
        "failures": failures,
        "cut_short": done + len(failures) < len(bodies),
    }


def predict_throughput(ckpt: Path, images: Sequence[Path], batch_size: int = 64) -> float:
    """images/s of predict.py's batch path (``classify_files``) on the same files, after one warm-up batch."""
    from image_finetune.inference.classifier import Classifier
    from image_finetune.inference.predict import classify_files

    classifier = Classifier.from_checkpoint(ckpt, device="cpu")
    inputs = [(str(p), None) for p in images]
    classify_files(classifier, inputs[:batch_size], top_k=5, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    classify_files(classifier, inputs, top_k=5, batch_size=batch_size, progress=False)
    return len(inputs) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ckpt", type=Path, required=True, help="training checkpoint (or model.onnx with --backend onnx)"
    )
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-seconds", type=float, default=300.0, help="the whole test, server start included")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve.py override (repeatable)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    suffixes = {".jpg", ".jpeg", ".png"}
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in suffixes)[: args.requests]
    if not images:
        parser.error(f"no .jpg/.png images under {args.images}")
    bodies = [multipart(images[i % len(images)].read_bytes()) for i in range(args.requests)]
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = ServerProcess(
            f"ckpt_path={args.ckpt}", f"backend={args.backend}", "access_log=false", "log_level=warning",
            "read_timeout=2", f"hydra.run.dir={tmp / 'run'}", *args.server_arg, log_path=tmp / "server.log",
        )  # fmt: skip
        try:
            server.wait_healthy(max(1.0, deadline - time.monotonic()))
            run_phase(server.url, bodies[:8], 1, deadline)  # warm-up: first batches allocate
            baseline = server.rss_mb()
            phases = [run_phase(server.url, bodies, c, deadline) for c in args.concurrency]
            cases = hostile_cases(server.port, server.url, images, tmp)
            hostile: dict[str, tuple[int, dict]] = {}
            with ThreadPoolExecutor(len(cases) + 4) as pool:  # hostile requests and good ones at the same time
                futures = {name: pool.submit(send) for name, (_, send) in cases.items()}
                good = run_phase(server.url, bodies[:32], 4, deadline)
                hostile = {name: f.result() for name, f in futures.items()}
            after = server.rss_mb()
            health_status = urllib.request.urlopen(f"{server.url}/health", timeout=10).status
            last_status, _ = post(server.url, *bodies[0], timeout=30)
        finally:
            code = server.stop()
    throughput = predict_throughput(args.ckpt, images) if args.backend == "torch" else float("nan")
    print(f"| concurrency | requests | img/s | p50 ms | p99 ms |  (predict.py batch 64: {throughput:.1f} img/s)")
    print("|---:|---:|---:|---:|---:|")
    for p in phases:
        print(f"| {p['concurrency']} | {p['requests']} | {p['img_s']:.1f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} |")
        checks[f"concurrency {p['concurrency']}: every good request answered 200"] = not p["failures"]
        checks[f"concurrency {p['concurrency']}: finished before --max-seconds"] = not p["cut_short"]
    for name, (expected, _) in cases.items():
        status, answer = hostile[name]
        ok = status == expected and set(answer) == {"error"} and "\n" not in answer["error"]
        checks[f"hostile '{name}': {expected} + one-line error (got {status}: {answer.get('error')!r})"] = ok
    checks["good requests beside the hostile ones all answered 200"] = not good["failures"] and not good["cut_short"]
    checks[f"RSS back near baseline ({baseline:.0f} MB -> {after:.0f} MB, within +25%)"] = after <= 1.25 * baseline
    checks[f"nothing stuck: /health {health_status}, a last request {last_status}"] = (health_status, last_status) == (
        200,
        200,
    )
    checks[f"server stopped cleanly on SIGTERM (exit {code})"] = code == 0
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
