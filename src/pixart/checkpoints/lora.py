"""LoRA through peft: attach adapters to a PixArtTransformer, save them for diffusers users, load them back.

Our model keeps the official fused projections (``attn.qkv`` 3C×C, ``cross_attn.kv_linear`` 2C×C) while
diffusers' ``PixArtTransformer2DModel`` has separate ``to_q``/``to_k``/``to_v``. Both directions are exact:

- a LoRA (A, B) on a fused linear is three LoRAs that share A: ``to_q`` gets (A, B[:C]), ``to_k``
  (A, B[C:2C]), ``to_v`` (A, B[2C:]). That is how :func:`save_lora` writes it.
- separate LoRAs (A_q, B_q), (A_k, B_k), (A_v, B_v) are one LoRA of rank r_q + r_k + r_v on the fused
  linear, with A stacked and B block-diagonal. :func:`load_lora` does that unless the parts share A
  (an adapter we saved), in which case it restores the original rank.

Files are peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) with diffusers'
module names, so ``peft.PeftModel.from_pretrained(diffusers_transformer, folder)`` loads them unchanged.
:func:`load_lora` also reads kohya-style and ComfyUI files: their key rules live in ``lora_formats``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from pixart.checkpoints.diffusers import diffusers_key_map
from pixart.checkpoints.formats import MAX_LORA_SCALE
from pixart.checkpoints.lora_formats import (
    PEFT_PREFIX,
    lora_location,
    pattern_value,
    peft_config,
    read_lora,
    write_peft_folder,
)
from pixart.errors import PixArtError
from pixart.model.config import PixArtConfig

logger = logging.getLogger(__name__)

ADAPTER = "default"
"""peft adapter name we use; a model carries at most one live pixart LoRA."""
TARGET_GROUPS = {
    "attn": ("attn.qkv", "attn.proj"),
    "cross_attn": ("cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
"""Names accepted in ``add_lora(targets=…)`` for the linears of every block."""


def diffusers_module_names(config: PixArtConfig) -> dict[str, tuple[str, ...]]:
    """Our module name → the diffusers module(s) holding its output rows (several for a fused linear)."""
    return {
        ours.removesuffix(".weight"): tuple(t.removesuffix(".weight") for t in theirs)
        for ours, theirs in diffusers_key_map(config)
        if ours.endswith(".weight")
    }


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The model's peft LoRA layers by module name (empty when it has no live adapter)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Turn group names ("attn", "cross_attn", "mlp") and module-name regexes into module names.

    A regex must match a whole module name (``blocks\\.(1[4-9]|2\\d)\\.attn\\.qkv``) or its tail after a
    dot (``attn.qkv``); only linears count. Each entry has to match something.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise PixArtError(f"LoRA targets are empty; give group names ({', '.join(TARGET_GROUPS)}) or module patterns")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for target in targets:
        patterns = [re.escape(t) for t in TARGET_GROUPS[target]] if target in TARGET_GROUPS else [target]
        try:
            matched = {n for n in linears for p in patterns if re.fullmatch(rf"(?:.*\.)?(?:{p})", n)}
        except re.error as err:
            raise PixArtError(f"LoRA target {target!r} is not a valid regular expression: {err}") from None
        if not matched:
            raise PixArtError(
                f"LoRA target {target!r} matches no linear layer; use {', '.join(TARGET_GROUPS)} "
                f"or a module-name pattern such as 'attn.qkv' or 'blocks\\.[0-9]\\.mlp\\.fc1'"
            )
        chosen |= matched
    return sorted(chosen, key=linears.index)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = ("attn", "cross_attn"),
    dropout: float = 0.0,
) -> list[str]:
    """Inject trainable LoRA layers (peft) into ``model`` and freeze everything else.

    ``alpha`` defaults to ``rank`` (scaling 1). B starts at zero, so the model's output is unchanged until
    training moves it. Returns the adapted module names.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PixArtError(f"LoRA rank {rank!r} is invalid; expected a positive integer such as 8 or 16")
    alpha = rank if alpha is None else alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise PixArtError(f"LoRA alpha {alpha!r} is invalid; expected a positive number (commonly equal to the rank)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise PixArtError(f"LoRA dropout {dropout!r} is invalid; expected a number in [0, 1)")
    if lora_layers(model):
        raise PixArtError("the model already has a LoRA adapter; merge it with merge_lora() before adding another")
    names = resolve_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    logger.info("LoRA rank %d, alpha %g on %d linears", rank, alpha, len(names))
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our module names (``blocks.0.attn.qkv.lora_A.weight`` …), for checkpoints."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Put weights from :func:`lora_state_dict` back into the model's live adapter (resuming training)."""
    if not lora_layers(model):
        raise PixArtError("the model has no LoRA adapter; call add_lora() with the checkpoint's rank and targets first")
    expected = lora_state_dict(model)
    for key in sorted(set(expected) ^ set(state_dict)):
        where = "the checkpoint" if key in state_dict else "the model's adapter"
        raise PixArtError(f"LoRA weight {key!r} is only in {where}; add_lora() targets differ from the checkpoint's")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise PixArtError(
                f"LoRA weight {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model; add_lora() rank differs from the checkpoint's"
            )
    set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold live LoRA layers into the base weights and remove them: a plain model again, as fast as the base."""
    for name, layer in lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model


def _scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's LoRA as a peft adapter folder with diffusers' module names.

    Fused projections are written as separate ``to_q``/``to_k``/``to_v`` LoRAs sharing A, so the folder
    loads on diffusers' ``PixArtTransformer2DModel`` with ``peft.PeftModel.from_pretrained``.
    """
    layers = lora_layers(model)
    if not layers:
        raise PixArtError("the model has no LoRA adapter to save; call add_lora() or load_lora(merge=False) first")
    names = diffusers_module_names(model.config)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropout = 0.0
    for name, layer in layers.items():
        if name not in names:
            raise PixArtError(f"LoRA on {name!r} has no diffusers equivalent; only block and embedder linears do")
        a = layer.lora_A[ADAPTER].weight.detach().float().cpu()
        b = layer.lora_B[ADAPTER].weight.detach().float().cpu()
        rank, alpha = layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])
        # A scale set after loading (set_scale) lives only in the layer; bake it into B so the file says it all.
        # (Our layers never use rslora: load_lora folds it into B.)
        b = b * (layer.scaling[ADAPTER] / (alpha / rank))
        drop = layer.lora_dropout[ADAPTER]
        dropout = max(dropout, drop.p if isinstance(drop, nn.Dropout) else 0.0)
        for part, b_part in zip(names[name], b.chunk(len(names[name]), dim=0), strict=True):
            tensors[f"{PEFT_PREFIX}{part}.lora_A.weight"] = a.clone()  # safetensors refuses shared storage
            tensors[f"{PEFT_PREFIX}{part}.lora_B.weight"] = b_part.contiguous()
            ranks[part], alphas[part] = rank, alpha
    write_peft_folder(Path(path), tensors, peft_config(ranks, alphas, dropout))
    logger.info("saved LoRA (%d tensors) to %s", len(tensors), path)
    return Path(path)


def _adapter_parts(tensors: dict[str, torch.Tensor], config: dict, where: str) -> dict[str, tuple]:
    """diffusers module name → (A, B, scaling) with the rank checked against the config."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not match:
            raise PixArtError(
                f"{where} holds {key!r}, which is not a LoRA weight in peft/diffusers naming ('<module>.lora_A.weight')"
            )
        pairs.setdefault(match[1], {})[match[2]] = value
    if not pairs:
        raise PixArtError(f"{where} holds no LoRA weights")
    parts = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise PixArtError(f"{where}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PixArtError(
                f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected (r, in) and (out, r)"
            )
        rank = a.shape[0]
        # Without a config (diffusers' pytorch_lora_weights), diffusers takes alpha = rank.
        expected = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        if expected != rank:
            raise PixArtError(f"{where}: {module} has rank {rank} but its adapter config says r={expected}")
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        parts[module] = (a.float(), b.float(), _scaling(rank, alpha, bool(config.get("use_rslora"))))
    return parts


def _fuse(model: nn.Module, parts: dict[str, tuple], where: str) -> dict[str, tuple]:
    """Group diffusers-named LoRAs onto our modules: our name → (A, B, rank, alpha)."""
    owner = {}
    for ours, theirs in diffusers_module_names(model.config).items():
        for index, name in enumerate(theirs):
            owner[name] = (ours, index, len(theirs))
    grouped: dict[str, dict[int, tuple]] = {}
    for module, part in parts.items():
        if module not in owner:
            cfg = model.config
            raise PixArtError(
                f"{where} targets {module!r}, which this {cfg.family} model ({cfg.depth} blocks) does not have"
            )
        ours, index, _ = owner[module]
        grouped.setdefault(ours, {})[index] = part
    fused = {}
    for ours, found in grouped.items():
        linear = _base_linear(model, ours)
        n_parts = len(diffusers_module_names(model.config)[ours])
        rows = linear.out_features // n_parts
        for index, (a, b, _) in found.items():
            if a.shape[1] != linear.in_features or b.shape[0] != rows:
                name = diffusers_module_names(model.config)[ours][index]
                raise PixArtError(
                    f"{where}: {name} LoRA maps {a.shape[1]}→{b.shape[0]} features but the model's layer "
                    f"maps {linear.in_features}→{rows}; the LoRA was trained for a different model size"
                )
        a0, _, s0 = next(iter(found.values()))
        shared = len(found) == n_parts and all(torch.equal(a, a0) and s == s0 for a, _, s in found.values())
        if shared:  # one LoRA on the fused layer (how we save): keep its rank; alpha=rank·scaling keeps the scale
            b = torch.cat([found[i][1] for i in range(n_parts)])
            fused[ours] = (a0, b, a0.shape[0], s0 * a0.shape[0])
            continue
        # Separate q/k/v LoRAs: one LoRA of the summed rank, B block-diagonal with each part's scaling folded in.
        a = torch.cat([found[i][0] for i in sorted(found)])
        b = torch.zeros(linear.out_features, a.shape[0])
        col = 0
        for i in sorted(found):
            a_i, b_i, s_i = found[i]
            b[i * rows : (i + 1) * rows, col : col + a_i.shape[0]] = b_i * s_i
            col += a_i.shape[0]
        fused[ours] = (a, b, a.shape[0], float(a.shape[0]))
    return fused


def _base_linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, merge: bool = False) -> nn.Module:
    """Apply a LoRA adapter (ours, or trained with diffusers/peft on to_q/to_k/to_v) to ``model``.

    ``merge=True`` adds ``scale · B·A`` into the weights (no runtime cost: the generation fast path; several
    LoRAs can be merged one after another). Otherwise the adapter is injected as live peft layers that can
    be trained further, rescaled or saved. Accepts a peft adapter folder or a ``.safetensors`` file.
    """
    check_lora_scale(scale)
    path = Path(path)
    tensors, config = read_lora(path)  # any known format, as peft tensors and config
    where = f"LoRA {str(path)!r}"
    fused = _fuse(model, _adapter_parts(tensors, config, where), where)
    if merge:
        _merge(model, fused, scale)
        logger.info("merged LoRA %s (scale %g) into %d linears", path, scale, len(fused))
        return model
    if lora_layers(model):
        raise PixArtError(f"the model already has a live LoRA; load {str(path)!r} with merge=True or call merge_lora()")
    lora_config = LoraConfig(
        r=next(iter(fused.values()))[2],
        target_modules=list(fused),
        rank_pattern={re.escape(n): f[2] for n, f in fused.items()},
        alpha_pattern={re.escape(n): f[3] for n, f in fused.items()},
        bias="none",
    )
    inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER)
    state = {}
    for name, (a, b, _, _) in fused.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"peft did not take every LoRA weight: {result.unexpected_keys or missing}")
    for layer in lora_layers(model).values():
        layer.set_scale(ADAPTER, scale)
    logger.info("loaded LoRA %s (scale %g) on %d linears", path, scale, len(fused))
    return model


def _delta(parts: tuple, scale: float) -> torch.Tensor:
    """One layer's ``scale · B·A`` with its alpha / rank, from its fused (A, B, rank, alpha)."""
    a, b, rank, alpha = parts
    return (b @ a) * (scale * alpha / rank)


@torch.no_grad()
def _merge(model: nn.Module, fused: dict[str, tuple], scale: float) -> None:
    """Add ``scale · B·A`` (with each layer's alpha / rank) into the base weights."""
    for name, parts in fused.items():
        weight = _base_linear(model, name).weight
        weight.add_(_delta(parts, scale).to(weight.device, weight.dtype))


class LoraSwitch:
    """Several LoRAs read once for one model, any of them merged on demand: a server's per-request choice.

    :meth:`use` puts back the base weights of every layer the LoRAs touch, then merges the chosen ones in order
    exactly as ``load_lora(merge=True)`` does, so the weights (and images) are bit-identical to loading the
    model with those LoRAs. Restoring, not subtracting, keeps rounding from piling up over many switches. The
    base copies live on the CPU so an accelerator holds only the model. ``base``: the same network in fp32 when
    ``model`` runs in bf16 or fp16; its weights are the copies, merged in fp32 and cast, as
    :meth:`pixart.inference.pipeline.PixArtPipeline.from_pretrained` merges LoRAs before its cast.
    """

    def __init__(self, model: nn.Module, loras: dict[str, str | os.PathLike], base: nn.Module | None = None):
        self.model = model
        self.fused = {}
        for name, path in loras.items():
            where = f"LoRA {str(path)!r}"
            tensors, config = read_lora(Path(path))
            self.fused[name] = _fuse(model, _adapter_parts(tensors, config, where), where)
        touched = {layer for fused in self.fused.values() for layer in fused}
        source = model if base is None else base
        self.base = {n: _base_linear(source, n).weight.detach().to("cpu", copy=True) for n in sorted(touched)}
        self.current: tuple[tuple[str, float], ...] | None = ()
        """The (name, scale) LoRAs merged now; None while a switch is under way (or failed half-way)."""

    @torch.no_grad()
    def use(self, chosen: Sequence[tuple[str, float]]) -> None:
        """Make the model the base with these (name, scale) LoRAs merged in this order; () is the base."""
        chosen = tuple((name, float(scale)) for name, scale in chosen)
        if chosen == self.current:
            return
        self.current = None  # a switch that fails half-way leaves no claim on what the weights hold
        for layer, weight in self.base.items():
            merged = weight.clone()  # in the base's precision, in _merge's order; cast once into the model
            for name, scale in chosen:
                if layer in self.fused[name]:
                    merged.add_(_delta(self.fused[name][layer], scale).to(merged.device, merged.dtype))
            _base_linear(self.model, layer).weight.copy_(merged)
        self.current = chosen


def check_lora_scale(scale: object) -> None:
    """Refuse a LoRA scale that is not a finite number within ±:data:`MAX_LORA_SCALE`."""
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or abs(scale) > MAX_LORA_SCALE:
        raise PixArtError(
            f"LoRA scale {scale!r} is invalid; expected a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} "
            "such as 1.0 or 0.7"
        )


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """Split a command-line ``PATH[:SCALE]`` into (path, scale); without a numeric suffix the scale is 1. A path
    that does not exist (nor names a bundled LoRA) is refused here, before any model loads."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            pass  # a ':' that belongs to the path
        else:
            check_lora_scale(scale)
            lora_location(Path(path))
            return path, scale
    if not spec:
        raise PixArtError("--lora is empty; expected PATH or PATH:SCALE with SCALE a number like 0.8")
    lora_location(Path(spec))
    return spec, 1.0
