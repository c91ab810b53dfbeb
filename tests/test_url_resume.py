"""Resumable URL ingest against a loopback HTTP server: a run killed mid-download (SIGKILL) resumes, fetches
only the parts it had not finished, and gives the shards of an uninterrupted run; every bad URL is counted
with its reason."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import encoded, noise_image

from clipgen.config import DataConfig
from clipgen.data.ingest import ingest_urls

GOOD, MISSING, SLOW, NOT_IMAGE, CUT_SHORT, HALF_JPEG = 240, 12, 6, 6, 6, 6
TIMEOUT = 1  # seconds; the slow URLs answer after 3


class Handler(http.server.BaseHTTPRequestHandler):
    requests: Counter = Counter()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.lock:
            self.requests[self.path] += 1
        kind, _, name = self.path.strip("/").partition("/")
        seed = int(name.split(".")[0])
        body = encoded(noise_image(seed, (40, 40)), "JPEG")
        if kind == "missing":
            return self.send_error(404)
        if kind == "slow":
            time.sleep(3)
        if kind == "html":
            body = b"<html><body>not an image</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if kind == "html" else "image/jpeg")
        if kind == "half":  # a truncated file, served as if whole
            body = body[: len(body) // 2]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body[: len(body) // 2] if kind == "cut" else body)  # cut: the connection ends early
        except (BrokenPipeError, ConnectionResetError):
            pass  # a slow answer whose client has already given up

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # img2dataset opens 32 connections at once; the default 5 drops some
    daemon_threads = True


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def url_list(tmp_path: Path, base: str) -> tuple[Path, dict[str, list[str]]]:
    urls = {"good": [f"{base}/img/{i}.jpg" for i in range(GOOD)],
            "missing": [f"{base}/missing/{i}.jpg" for i in range(MISSING)],
            "slow": [f"{base}/slow/{i}.jpg" for i in range(SLOW)],
            "html": [f"{base}/html/{i}.jpg" for i in range(NOT_IMAGE)],
            "cut": [f"{base}/cut/{i}.jpg" for i in range(CUT_SHORT)],
            "half": [f"{base}/half/{i}.jpg" for i in range(HALF_JPEG)]}
    rows = [url for group in urls.values() for url in group]
    rows = [rows[(i * 97) % len(rows)] for i in range(len(rows))]  # bad URLs spread over every part
    path = tmp_path / "urls.csv"
    path.write_text("url,caption\n" + "".join(f"{u},picture {i}\n" for i, u in enumerate(rows)))
    return path, urls


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


@pytest.mark.slow
def test_killed_url_ingest_resumes_to_the_same_shards_and_counts_every_failure(tmp_path, server):
    path, urls = url_list(tmp_path, server)
    data = DataConfig(source="urls", path=str(path), caption_column="caption", image_size=32, heldout_fraction=0.1,
                      workers=1, download_part_size=70, download_timeout=TIMEOUT)
    whole = ingest_urls(data, tmp_path / "whole")

    n_rows = sum(len(v) for v in urls.values())
    assert whole["inputs"] == {"tried": n_rows, "kept": GOOD, "skipped": n_rows - GOOD}
    reasons = whole["skipped_by_reason"]
    assert reasons["download failed: http 404"] == MISSING and reasons["download failed: timeout"] == SLOW
    assert reasons["download failed: connection closed early"] == CUT_SHORT, reasons
    by_input = {s["input"]: s["reason"] for s in whole["skipped"]}
    assert set(by_input) == {u for kind, group in urls.items() if kind != "good" for u in group}
    for kind in ("html", "half"):  # downloaded, then refused by the decoder, with its reason
        assert all(not by_input[u].startswith("download failed") for u in urls[kind]), by_input

    # the same run, killed with SIGKILL (its whole process group) once some parts are finished
    Handler.requests.clear()
    root = tmp_path / "resumed"
    code = ("import json, sys; from pathlib import Path; from clipgen.config import DataConfig; "
            "from clipgen.data.ingest import ingest_urls; "
            "ingest_urls(DataConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]))")
    config = {k: v for k, v in asdict(data).items() if k not in ("world", "judge")}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(config), str(root)], start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    staging = root / ".img2dataset"
    deadline = time.monotonic() + 300
    while not list(staging.glob("part-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in staging.glob("part-*"))
    n_parts = len(list((staging / "lists").glob("part-*.parquet")))
    assert 1 <= len(finished) < n_parts, f"killed with {finished} of {n_parts} parts finished"
    assert not (root / "manifest.json").exists()

    import pyarrow.parquet as pq

    fetched = [u for name in finished for u in pq.read_table(staging / "lists" / f"{name}.parquet").column("url").to_pylist()]
    resumed = ingest_urls(data, root)
    assert shard_bytes(root) == shard_bytes(tmp_path / "whole")
    assert {k: v for k, v in resumed.items() if k != "source"} == {k: v for k, v in whole.items() if k != "source"}
    # what a finished part fetched before the kill is not fetched again
    paths = [u.removeprefix(server) for u in fetched]
    assert [Handler.requests[p] for p in paths] == [1] * len(paths)
    assert not staging.exists()  # the shards hold every kept image


@pytest.mark.slow
def test_the_readme_coco_recipe_ingests_a_url_list(tmp_path, server):
    """The README's COCO recipe, step 2, on a loopback copy of img2dataset's mscoco.parquet (URL and TEXT
    columns, one row per caption, so image URLs repeat)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import clipgen

    urls = [f"{server}/img/{i}.jpg" for i in range(20)] + [f"{server}/missing/{i}.jpg" for i in range(2)]
    rows = [(u, f"caption {k} of {u}") for u in urls for k in range(2)]
    listed = tmp_path / "mscoco.parquet"
    pq.write_table(pa.table({"URL": [r[0] for r in rows], "TEXT": [r[1] for r in rows]}), listed)
    clipgen(tmp_path, "run", "pipelines/coco.yaml", "--stages", "ingest", "--set", f"data.path={listed}",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "data.workers=2")
    [manifest] = (tmp_path / "run" / "shards").glob("*/manifest.json")
    manifest = json.loads(manifest.read_text())
    assert manifest["inputs"] == {"tried": 44, "kept": 20, "skipped": 24}
    assert manifest["skipped_by_reason"] == {"download failed: http 404": 4, "duplicate url": 20}
