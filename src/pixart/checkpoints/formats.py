"""Names of the checkpoint formats and image sizes, apart from the converters so `pixart convert --help` and
`pixart export --help` can list them without importing torch."""

from pixart.model.config import FAMILY

FORMATS = ("diffusers", "official", "pixart")
"""What ``pixart convert --to`` writes: a diffusers folder, the official ``.pth``, our ``.safetensors``."""

IMAGE_SIZES = tuple(sorted({side for family in FAMILY.values() for side in family.pe_scales}))
"""Image sides (px) some release was trained at: 256, 512, 1024, 2048."""

LORA_FORMATS = ("peft", "kohya", "comfyui")
"""What ``pixart lora convert|merge --to`` writes (:mod:`pixart.checkpoints.lora_formats` also detects them)."""

MAX_LORA_SCALE = 10.0
"""LoRAs are trained at scale 1 and used from about -2 to 2; far beyond 10 the merged weights swamp the model's own
and every image comes out black."""
