"""The built-in metrics log: one JSON object per logged step in RUN/logs/metrics.jsonl.

The trainer writes it through accelerate's tracker interface when TensorBoard, the default logger, is not
installed (the base install lacks it), so a first run still records its loss curve. Read it with
``pandas.read_json(path, lines=True)`` or any JSON-lines tool.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.jsonl"


def tensorboard_installed() -> bool:
    """Whether accelerate's TensorBoard tracker can write: it needs torch's writer or tensorboardX to import."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


class JsonLinesTracker(GeneralTracker):
    """Appends ``{"step": N, <metric>: value, …}`` lines to a file (main process only, accelerate's default)."""

    name = "jsonl"
    requires_logging_directory = False  # told its file when built, as accelerate does not pass custom trackers one

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        # Opened per call so every line is on disk at once, and a resumed run appends to the same file.
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")
