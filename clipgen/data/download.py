"""Resumable download of a URL list with img2dataset, in parts that a killed run keeps.

The list is cut into parts of ``data.download_part_size`` rows (``staging/lists/part-NNNNN.parquet``), and
each part is one img2dataset call in a process of its own (img2dataset installs a signal handler, which
only works on a process's main thread, and task runners call from worker threads). A part downloads into
``.part-NNNNN.tmp-PID`` and is renamed to ``part-NNNNN`` when finished, so a folder of that name is always
whole. A rerun after a kill downloads only the parts that have no such folder. The shards are written
from all parts in URL order, so they do not depend on how the list was cut or on when a run was killed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from clipgen.artifacts import file_digest
from clipgen.config import DataConfig
from clipgen.data.shards import Skipped
from clipgen.errors import IngestError

LISTS = "lists"


class Part(NamedTuple):
    index: int
    url_list: Path  # this part's rows, as parquet
    folder: Path  # where its finished download lives

    @property
    def label(self) -> str:  # the task run's name
        return f"download {self.folder.name}"


class DownloadedRow(NamedTuple):
    url: str
    caption: str | None
    source: tuple[str, int, int]  # the image member's byte range inside an img2dataset tar


def split_url_list(data: DataConfig, url_list: Path, input_format: str, staging: Path) -> list[Part]:
    """Cut the URL list into parts (kept from an earlier run of the same list and part size)."""
    lists = staging / LISTS
    stamp = {"sha256": file_digest(url_list), "part_size": data.download_part_size,
             "columns": [data.url_column, data.caption_column]}
    stamp_file = lists / "source.json"
    if not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp:
        shutil.rmtree(staging, ignore_errors=True)  # another list or cut: nothing downloaded can be reused
        table = _read_url_list(url_list, input_format, [c for c in stamp["columns"] if c is not None])
        if table.num_rows == 0:
            raise IngestError(f"data.path {str(url_list)!r} lists no URLs")
        lists.mkdir(parents=True)
        size = data.download_part_size
        for start in range(0, table.num_rows, size):
            pq.write_table(table.slice(start, size), lists / f"part-{start // size:05d}.parquet")
        stamp_file.write_text(json.dumps(stamp))  # last: the cut is whole once this exists
    for stale in staging.glob(".part-*.tmp-*"):  # left by a killed run: never trusted
        shutil.rmtree(stale, ignore_errors=True)
    return [Part(i, path, staging / path.stem) for i, path in enumerate(sorted(lists.glob("part-*.parquet")))]


def _read_url_list(path: Path, input_format: str, columns: list[str]):
    if input_format == "parquet":
        table = pq.read_table(path, columns=columns)
    else:
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if input_format == "tsv" else ","),
                              convert_options=pcsv.ConvertOptions(include_columns=columns,
                                                                  column_types={c: pa.string() for c in columns}))
    return table.cast(pa.schema([(c, pa.string()) for c in columns]))


def download_part(data: DataConfig, part: Part) -> bool:
    """Download one part unless a finished copy exists; True if it downloaded now."""
    if part.folder.is_dir():
        return False
    args = [sys.executable, "-m", "clipgen.data.download", str(part.url_list), str(part.folder),
            "--config", json.dumps({k: getattr(data, k) for k in DOWNLOAD_KEYS})]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise IngestError(f"img2dataset failed on {part.url_list.name}: {result.stderr.strip()[-2000:]}")
    return True


DOWNLOAD_KEYS = ("url_column", "caption_column", "image_size", "workers", "download_timeout")


def _download_into(url_list: Path, final: Path, settings: dict[str, Any]) -> None:
    """(In the part's own process.) Download ``url_list`` with img2dataset, then rename into ``final``."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    download = import_img2dataset()
    kwargs = dict(
        url_list=str(url_list), input_format="parquet", url_col=settings["url_column"],
        caption_col=settings["caption_column"], output_format="webdataset", output_folder=str(tmp),
        # Raw bytes: our own decoder applies EXIF rotation, 16-bit scaling, alpha-on-white and the
        # decompression-bomb check, exactly as for folders (cv2 in img2dataset does not).
        disable_all_reencoding=True, image_size=settings["image_size"], resize_mode="center_crop",
        resize_only_if_bigger=False, processes_count=settings["workers"], thread_count=32,
        timeout=settings["download_timeout"], extract_exif=False, compute_hash=None, enable_wandb=False,
    )
    if "disable_all_reporting" in inspect.signature(download).parameters:
        kwargs["disable_all_reporting"] = True
    download(**kwargs)
    os.replace(tmp, final)


def import_img2dataset() -> Callable[..., Any]:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would phone home on import
    try:
        with warnings.catch_warnings():  # its `import imghdr` warns on every import; not ours to fix
            warnings.filterwarnings("ignore", "'imghdr' is deprecated", DeprecationWarning)
            from img2dataset import download
    except ImportError as exc:
        raise IngestError(f"img2dataset is needed for data.source: urls but cannot be imported ({exc}); "
                            "run `make install`") from exc
    return download


# -------------------------------------------------------------------------------------- results
def read_download_results(folder: Path) -> tuple[list[DownloadedRow], list[Skipped]]:
    """img2dataset's successes in one part (located inside its tars) and its failures (as skipped inputs)."""
    rows: list[DownloadedRow] = []
    skipped: list[Skipped] = []
    for table_path in sorted(folder.glob("*.parquet")):
        members = _tar_members(table_path.with_suffix(".tar"))
        for row in pq.read_table(table_path).to_pylist():
            if row["status"] != "success" or row["key"] not in members:
                skipped.append(Skipped(row["url"], failure_reason(row.get("error_message"))))
            else:
                rows.append(DownloadedRow(row["url"], row.get("caption"), members[row["key"]]))
    return rows, skipped


def failure_reason(message: str | None) -> str:
    """img2dataset's error text as a reason that counts alike across URLs: 'download failed: http 404'."""
    text = (message or "missing from img2dataset output").lower()
    if match := re.search(r"http error (\d{3})", text):
        kind = f"http {match.group(1)}"
    elif "timed out" in text or "timeout" in text:
        kind = "timeout"
    elif "incompleteread" in text or "incomplete read" in text:
        kind = "connection closed early"
    elif "connection refused" in text or "connection reset" in text:
        kind = "connection refused or reset"
    elif "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        kind = "unknown host"
    else:  # keep the message, without the URL or path that makes each one unique
        kind = re.sub(r"\S+://\S+|/\S+", "<url>", message or "missing from img2dataset output")[:120]
    return f"download failed: {kind}"


def _tar_members(tar_path: Path) -> dict[str, tuple[str, int, int]]:
    """img2dataset key -> byte range of its image member (captions and json are ours to ignore)."""
    if not tar_path.is_file():
        return {}
    members = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if member.isfile() and ext not in ("json", "txt"):
                members[key] = (str(tar_path), member.offset_data, member.size)
    return members


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="download one URL list part (run by download_part)")
    parser.add_argument("url_list", type=Path)
    parser.add_argument("final", type=Path)
    parser.add_argument("--config", required=True, help="JSON of the data settings in DOWNLOAD_KEYS")
    args = parser.parse_args(argv)
    _download_into(args.url_list, args.final, json.loads(args.config))


if __name__ == "__main__":
    main()
