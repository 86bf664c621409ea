"""Read a W&B offline run or a TensorBoard log back with the loggers' own formats, as JSON on standard output.

    python tests/log_readers.py wandb RUN_FOLDER        # {"project", "config", "values", "files"}
    python tests/log_readers.py tensorboard LOG_FOLDER  # {"images": {tag: [png base64]}, "texts", "scalars"}

test_generation_log.py runs this in a process of its own rather than importing W&B's and TensorBoard's protobuf
modules into the test process: in the CI's pytest-xdist worker that had run the OpenVINO tests before, the worker
died of a SIGSEGV in its main thread right after such a read (seen with strace), which a fresh process avoids.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from pathlib import Path


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file: LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_folder.glob("run-*.wandb")
    data, pos, chunks, records = path.read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def wandb_run(run_folder: Path) -> dict:
    """The run's project, config, logged values (last value per key) and logged tables' files (name → local path)."""
    config, values, files, projects = {}, {}, {}, set()
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            projects.add(record.run.project)
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            for item in record.history.item:
                values["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "artifact":  # a logged wandb.Table goes in a run_table artifact, its images beside it
            files |= {entry.path: entry.local_path for entry in record.artifact.manifest.contents}
    [project] = projects
    return {"project": project, "config": config, "values": values, "files": files}


def tensorboard_run(folder: Path) -> dict:
    """The one run under ``folder``: its images (PNG bytes, base64), texts (torch's add_text) and scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = folder.iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    images = {
        tag: [base64.b64encode(image.encoded_image_string).decode() for image in events.Images(tag)]
        for tag in tags["images"]
    }
    texts = {  # add_text writes a tensor tagged TAG/text_summary
        tag.removesuffix("/text_summary"): [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
        for tag in tags["tensors"]
        if tag.endswith("/text_summary")
    }
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in tags["scalars"]}
    return {"images": images, "texts": texts, "scalars": scalars}


if __name__ == "__main__":
    kind, folder = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"wandb": wandb_run, "tensorboard": tensorboard_run}[kind](folder)))
