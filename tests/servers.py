"""Real servers on localhost for the remote-storage tests and benchmark: an HTTP file server that
honours (or, like Python's own http.server, ignores) Range and counts the bytes it sends, moto's
S3 server, and the archive of large files they serve."""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler plus single-range requests (the part fsspec asks for)."""

    def log_message(self, *args):  # quiet
        pass

    def copyfile(self, source, outputfile):  # count what reaches the client
        data = source.read()
        self.server.sent += len(data)
        outputfile.write(data)

    def do_HEAD(self):
        self.server.paths.append(self.path)
        return super().do_HEAD()

    def do_GET(self):
        self.server.requests += 1
        self.server.paths.append(self.path)
        match = _RANGE.match(self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not self.server.ranges or match is None or not path.is_file():
            return super().do_GET()
        size = path.stat().st_size
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        if self.server.short_ranges and len(body) > 1 << 16:   # a faulty proxy: one byte short
            body = body[:-1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.server.sent += len(body)
        self.wfile.write(body)


class FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    sent = 0
    requests = 0

    def __init__(self, root: Path, ranges: bool, short_ranges: bool = False):
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.ranges, self.short_ranges = ranges, short_ranges
        self.paths: list[str] = []   # every path asked for (GET and HEAD), in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def file_server(root: Path, ranges: bool = True, short_ranges: bool = False):
    """Serve `root` over HTTP; yields the server (`.url`, `.sent` bytes, `.requests`).
    `short_ranges`: answer ranges over 64 KiB with one byte less (a faulty proxy)."""
    server = FileServer(root, ranges, short_ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server():
    """moto's S3 server on localhost, with fsspec/boto pointed at it by the usual variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(endpoint: str, local: Path, bucket: str, prefix: str = "") -> None:
    """Copy a local folder tree into a bucket (created) under `prefix`."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = "/".join(filter(None, [prefix, path.relative_to(local).as_posix()]))
            client.upload_file(str(path), bucket, key)


def big_run(folder: Path, rounds: int = 3, shape=(512, 1024)) -> tuple[Path, Path]:
    """Rounds of two float32 layers and their uint8 masks (5 MiB a round by default), as
    safetensors files (folder/st) and as torch zips (folder/pt)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    st, pt = folder / "st", folder / "pt"
    st.mkdir(parents=True)
    pt.mkdir()
    for r in range(rounds):
        tensors = {}
        for layer in ("enc", "dec"):
            tensors[f"{layer}.weight"] = rng.normal(size=shape).astype(np.float32)
            tensors[f"{layer}.weight_mask"] = (rng.random(shape) < 0.8 ** r).astype(np.uint8)
        save_file(tensors, str(st / f"round_{r}.safetensors"))
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}},
                   pt / f"{r}checkpoint.pth.tar")
    return st, pt

