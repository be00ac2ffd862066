"""Send images to ``python serve.py`` and print its answers, with only the standard library.

    python serve.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python examples/serve_client.py photo.jpg [more.jpg ...] [--url http://127.0.0.1:8000] [--raw]

Each file goes as a multipart upload (field ``file``), or with ``--raw`` as the request body with an image content
type. A file the server refuses prints its one-line reason (``photo.txt: 415 content type ...``); the exit code is
1 when any file was refused, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def classify(url: str, path: Path, raw: bool = False, timeout: float = 60.0) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for one image file."""
    data = path.read_bytes()
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not raw:
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        data = head + data + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(f"{url.rstrip('/')}/predict", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--raw", action="store_true", help="send the bytes as the body, not as a multipart upload")
    args = parser.parse_args()
    refused = 0
    for path in args.images:
        status, answer = classify(args.url, path, args.raw)
        if status == 200:
            print(f"{path}: " + ", ".join(f"{k} {p:.3f}" for k, p in zip(answer["labels"], answer["probabilities"])))
        else:
            refused += 1
            print(f"{path}: {status} {answer.get('error', answer)}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
