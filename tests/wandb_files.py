"""Read back what the real wandb library wrote for an offline run (no mocks, no account).

An offline run folder holds ``run-<id>.wandb``: W&B's record log (a 7-byte header, then
32 KiB blocks of records, each a 7-byte header -- checksum, length, type -- and a chunk of a
serialised ``wandb_internal_pb2.Record``) and ``files/media/...`` for images and tables.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, chunks = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """The run's name, group, config, summary, metric definitions and exit code."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        (path,) = self.dir.glob("*.wandb")
        self.config: dict = {}
        self.summary: dict = {}
        self.metric_summaries: dict = {}
        self.exit_code = None
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.name, self.group = record.run.display_name, record.run.run_group
            elif kind == "config":
                for item in record.config.update:
                    self.config[_key(item)] = json.loads(item.value_json)
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[_key(item)] = json.loads(item.value_json)
            elif kind == "metric" and record.metric.name:
                self.metric_summaries[record.metric.name] = record.metric.summary
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def media(self, pattern: str) -> list[Path]:
        return sorted((self.dir / "files" / "media").rglob(pattern))
