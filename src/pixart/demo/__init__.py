"""The bundled demo: a procedural "shapes" dataset (:mod:`.shapes`) and a prompt-following checker (:mod:`.checker`)."""

from pathlib import Path

BUNDLE = Path(__file__).parent.parent / "assets" / "demo"
"""The bundled demo pipeline folder (diffusers layout), used when no model is named. Defined here, away from
the pipeline, so the CLI can check a request against it without importing torch."""
