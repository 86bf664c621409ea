"""The bundled demo: a procedural "shapes" dataset (:mod:`.shapes`) and a prompt-following checker (:mod:`.checker`)."""

from pathlib import Path

BUNDLE = Path(__file__).parent.parent / "assets" / "demo"
"""The bundled demo pipeline folder (diffusers layout), used when no model is named. Defined here, away from
the pipeline, so the CLI can check a request against it without importing torch."""

DEMO_NAME = "demo"
"""What every command that takes a model (``--model``, ``--base``, a recipe's ``model.source``) accepts for BUNDLE."""


def resolve_demo(model):
    """BUNDLE for the name ``demo``, else ``model`` unchanged. The name wins over a folder ``demo`` here (the README's
    examples write their images to one); ``./demo`` names such a folder."""
    return BUNDLE if model is not None and str(model) == DEMO_NAME else model


BUNDLED_LORAS = {"demo-lcm": BUNDLE.parent / "demo-lcm-lora"}
"""LoRAs shipped with the demo, by the name ``--lora`` takes: ``demo-lcm`` samples the demo in 4 steps with
``--sampler lcm`` (recipe ``demo-lcm-lora``, ``scripts/train_demo_lcm.sh``)."""

BUNDLED_CONTROLNETS = {"demo-layout": BUNDLE.parent / "demo-controlnet-layout" / "controlnet.safetensors"}
"""ControlNets shipped with the demo, by the name ``--controlnet`` takes: ``demo-layout`` places the demo's shapes
where a layout map (``--control-type layout``, or white shapes drawn on black with ``none``) shows them (recipe
``demo-controlnet``, ``scripts/train_demo_controlnet.sh``)."""
