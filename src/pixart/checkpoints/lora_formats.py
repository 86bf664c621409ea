"""LoRA files in the formats people share for PixArt: detect the format from the keys, read, convert, merge.

Every format names one LoRA per linear with a *stem* (the module), a *role* (down = peft's ``lora_A``, up =
``lora_B``) and an optional scalar ``alpha`` (the update is ``alpha / rank · up @ down``; no alpha means
alpha = rank). What differs is the stem, as each writer names PixArt's modules:

- **peft / diffusers** (peft ``save_pretrained``, diffusers and SimpleTuner training scripts): diffusers'
  module names, dotted, under ``base_model.model.`` or ``transformer.`` — ``transformer_blocks.0.attn1.to_q``
  + ``.lora_A.weight`` / ``.lora_B.weight``; alpha in ``adapter_config.json`` or a ``<stem>.alpha`` tensor.
- **kohya** (OneTrainer's and ai-toolkit's ``lora_transformer`` prefix; SimpleTuner's LyCORIS ``lycoris_``
  prefix; ComfyUI also maps ``lora_unet_`` + the official names): the module name with dots turned to
  underscores after the prefix — ``lora_transformer_transformer_blocks_0_attn1_to_q`` or
  ``lora_unet_blocks_0_attn_qkv`` + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
- **comfyui** (ComfyUI's generic names for its native PixArt model; city96's ComfyUI_ExtraModels without the
  prefix): the official module names, fused projections included — ``diffusion_model.blocks.0.attn.qkv`` +
  ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` (``lora_A``/``lora_B`` are read too).

Everything is read into one form, :class:`Pair` per diffusers-named linear: a LoRA on a fused official
layer (``attn.qkv``, ``cross_attn.kv_linear``) becomes one pair per part sharing ``down``, with ``up`` split
by rows, which is exact. LyCORIS LoHa / LoKr tensors (``hada_w1_a`` …, ``lokr_w1`` …, under any stem above) are
read as the plain LoRA of the same update (:func:`lycoris_as_lora`); DoRA and conv-only parts are refused with one
line naming the format.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pixart.checkpoints.diffusers import diffusers_key_map
from pixart.checkpoints.formats import LORA_FORMATS as FORMATS
from pixart.demo import BUNDLED_LORAS
from pixart.errors import PixArtError
from pixart.files import atomic_write, plain_modes
from pixart.model.config import PixArtConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel.save_pretrained writes keys under this prefix

# Stem prefixes of each format, and whose module names follow them (see the module docstring for the writers).
STEM_PREFIXES = {
    "peft": (("", "diffusers"),),
    "kohya": (
        ("lora_transformer_", "diffusers"),
        ("lycoris_", "diffusers"),
        ("lora_unet_", "diffusers"),
        ("lora_unet_", "official"),
    ),
    "comfyui": (("diffusion_model.", "official"), ("", "official")),
}
ROLES = {
    "lora_A.weight": "down",
    "lora_A.default.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora_B.default.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
# Tensor names of adapters that are not a plain LoRA (LyCORIS, peft's DoRA): refused, never half-applied.
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
ROLES.update({name: name for name in LOHA + LOKR})  # LyCORIS tensors keep their names as roles
# Tensor names of adapters that are not a LoRA in disguise (conv-only Tucker cores, peft's DoRA): refused.
REFUSED = {
    **dict.fromkeys(("hada_t1", "hada_t2", "lokr_t2"), "LyCORIS Tucker (conv)"),
    **dict.fromkeys(("dora_scale", "lora_magnitude_vector.weight"), "DoRA"),
    "lora_mid.weight": "LyCORIS LoCon (conv mid)",
}


@dataclass(frozen=True)
class Pair:
    """One LoRA on one diffusers-named linear: its weight changes by ``alpha / rank · up @ down``."""

    down: torch.Tensor  # (rank, in): peft's lora_A, kohya's lora_down
    up: torch.Tensor  # (out, rank): peft's lora_B, kohya's lora_up
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def module_names(depth: int) -> dict[str, tuple[str, ...]]:
    """Official module name → the diffusers module(s) holding its output rows, for any PixArt with ``depth`` blocks."""
    # micro-conditions: a superset of both families; one block at least, so a config exists for a LoRA without any
    config = PixArtConfig(depth=max(depth, 1), micro_conditions=True)
    return {
        ours.removesuffix(".weight"): tuple(t.removesuffix(".weight") for t in theirs)
        for ours, theirs in diffusers_key_map(config)
        if ours.endswith(".weight")
    }


def stems(depth: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every stem a format may use → (format, the diffusers modules it covers, in row order)."""
    names = module_names(depth)
    table = {
        "diffusers": {d: (d,) for parts in names.values() for d in parts},
        "official": names,
    }
    found = {}
    for fmt, prefixes in STEM_PREFIXES.items():
        for prefix, naming in prefixes:
            for name, parts in table[naming].items():
                # kohya-style prefixes end in '_' and go with underscored names; the others keep the dots
                stem = prefix + (name.replace(".", "_") if prefix.endswith("_") else name)
                found.setdefault(stem, (fmt, parts))
    return found


def _depth(keys) -> int:
    indices = [int(m[1]) for k in keys for m in re.finditer(r"blocks[._](\d+)[._]", k)]
    return max(indices, default=-1) + 1


def _split(key: str) -> tuple[str, str | None]:
    for suffix, role in (*ROLES.items(), *REFUSED.items()):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return key, None


def pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha pattern rule: a pattern key matches a module name or its tail after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_config(config: dict, where: str) -> None:
    """Refuse peft adapter configs that are not a plain LoRA on weights."""
    if not config:
        return
    if config.get("peft_type", "LORA") != "LORA":
        raise PixArtError(f"{where} is a {config['peft_type']} adapter; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise PixArtError(f"{where} is a DoRA adapter (use_dora=true); only plain LoRA is supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise PixArtError(f"{where} trains biases (bias={config.get('bias')!r}); only bias='none' is supported")


def lora_location(path: Path) -> Path:
    """Where a LoRA given as a path or a bundled LoRA's name (``demo-lcm``) is: an existing folder or file, or the
    one-line error. Commands check their ``--lora`` with it before loading a model."""
    if not path.exists() and str(path) in BUNDLED_LORAS:
        return BUNDLED_LORAS[str(path)]
    if not (path.is_dir() or path.is_file()):
        raise PixArtError(
            f"LoRA {str(path)!r} does not exist; expected a peft adapter folder or a .safetensors file, "
            f"or a bundled LoRA: {', '.join(BUNDLED_LORAS)}"
        )
    return path


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file's tensors with peft/diffusers prefixes removed, and its peft config (or {} when absent).
    A bundled LoRA's name (``demo-lcm``) reads the shipped adapter."""
    path = lora_location(path)
    if path.is_dir():
        candidates = (path / WEIGHTS_NAME, path / "pytorch_lora_weights.safetensors")  # peft's, diffusers' names
        weights = next((c for c in candidates if c.exists()), None)
        if weights is None:
            raise PixArtError(f"LoRA folder {str(path)!r} has no {WEIGHTS_NAME}; expected a peft adapter folder")
        config_path = path / CONFIG_NAME
    else:
        weights, config_path = path, path.parent / CONFIG_NAME
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise PixArtError(f"LoRA file {str(weights)!r} is not a readable safetensors file ({err})") from None
    config: dict = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise PixArtError(f"LoRA config {str(config_path)!r} is not valid JSON ({err})") from None
    stripped = {}
    for key, value in tensors.items():
        for prefix in (PEFT_PREFIX, "transformer."):
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped, config


def _factors(found: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as (left, right) with left @ right = the factor: its low-rank pair, or it and an identity."""
    if f"{name}_a" in found:
        return found[f"{name}_a"].float(), found[f"{name}_b"].float()
    full = found[name].float()
    if full.shape[0] <= full.shape[1]:  # the identity on the shorter side keeps the rank smallest
        return torch.eye(full.shape[0]), full
    return full, torch.eye(full.shape[1])


def lycoris_as_lora(found: dict[str, torch.Tensor], stem: str, where: str) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa or LoKr as the plain LoRA with the same update (LyCORIS' and ComfyUI's scale rules).

    LoHa ``(w1a @ w1b) ∘ (w2a @ w2b) · alpha/r`` is the LoRA of rank r² with up = the row-wise Kronecker
    product of w1a and w2a, down = the column-wise one of w1b and w2b. LoKr ``kron(w1, w2) · alpha/r`` (r the
    rank of w2's pair, else w1's; scale 1 when both are full) is ``kron(L1, L2) @ kron(R1, R2)`` for any
    Li @ Ri = wi. Exact up to float rounding; the scale is folded into up, so alpha = the new rank.
    """
    alpha = float(found["alpha"]) if "alpha" in found else None
    try:
        if "hada_w1_a" in found:
            w1a, w1b, w2a, w2b = (found[n].float() for n in LOHA)
            scale = alpha / w1b.shape[0] if alpha is not None else 1.0
            up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
            down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
        else:
            (l1, r1), (l2, r2) = _factors(found, "lokr_w1"), _factors(found, "lokr_w2")
            rank = next((found[n].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if n in found), None)
            scale = alpha / rank if alpha is not None and rank is not None else 1.0
            up, down = torch.kron(l1, l2), torch.kron(r1, r2)
    except (KeyError, RuntimeError, IndexError) as err:
        raise PixArtError(f"{where}: {stem} is an incomplete or malformed LyCORIS LoHa/LoKr ({err})") from None
    return {"down": down, "up": up * scale, "alpha": torch.tensor(float(down.shape[0]))}


def parse_pairs(tensors: dict[str, torch.Tensor], config: dict, where: str) -> tuple[dict[str, Pair], str]:
    """Read tensors of any known format into one :class:`Pair` per diffusers module, and name the format."""
    table = stems(_depth(tensors))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    formats, unknown = set(), []
    for key, value in tensors.items():
        stem, role = _split(key)
        if role in REFUSED.values():
            raise PixArtError(f"{where} is a {role} adapter ({key!r}); only plain LoRA is supported")
        if role is None or stem not in table:
            unknown.append(key)
            continue
        formats.add(table[stem][0])
        grouped.setdefault(stem, {})[role] = value
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise PixArtError(
            f"{where} holds {', '.join(map(repr, unknown[:3]))}{more}, which is not a LoRA weight of a PixArt "
            f"module in peft/diffusers, kohya or ComfyUI naming"
        )
    if not grouped:
        raise PixArtError(f"{where} holds no LoRA weights")
    pairs: dict[str, Pair] = {}
    for stem, found in grouped.items():
        if any(role in found for role in LOHA + LOKR):
            found = lycoris_as_lora(found, stem, where)
        if "down" not in found or "up" not in found:
            raise PixArtError(f"{where}: {stem} lacks its {'up' if 'down' in found else 'down'} (lora_B/A) weight")
        down, up = found["down"].float(), found["up"].float()
        parts = table[stem][1]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or up.shape[0] % len(parts):
            raise PixArtError(
                f"{where}: {stem} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                f"expected (r, in) and (out, r) with out split in {len(parts)}"
            )
        for name, up_part in zip(parts, up.chunk(len(parts)), strict=True):
            if name in pairs:
                raise PixArtError(f"{where} holds two LoRAs for {name} (one of them as {stem})")
            if "alpha" in found:
                alpha = float(found["alpha"])
            else:  # peft keeps alpha in its config; no alpha anywhere means alpha = rank, as every writer does
                alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", down.shape[0]))
                if config.get("use_rslora"):  # rsLoRA scales by alpha/sqrt(r): the same update as alpha·sqrt(r)/r
                    alpha = alpha * math.sqrt(down.shape[0])
            pairs[name] = Pair(down, up_part.contiguous(), float(alpha))
    return pairs, "+".join(sorted(formats))


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file of any known format as peft tensors (diffusers names, ``lora_A``/``lora_B``) and a peft config.

    What :func:`pixart.checkpoints.lora.load_lora` reads: a peft/diffusers adapter comes back as it is, any
    other format converted, with each module's alpha in the config's ``alpha_pattern``.
    """
    path = Path(path)
    tensors, config = read_adapter(path)
    where = f"LoRA {str(path)!r}"
    check_config(config, where)
    pairs, fmt = parse_pairs(tensors, config, where)
    if fmt == "peft" and not any(k.endswith(".alpha") for k in tensors):
        return tensors, config
    out: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = pair.down, pair.up
    return out, {"alpha_pattern": {re.escape(name): pair.alpha for name, pair in pairs.items()}}


def read_pairs(path: str | os.PathLike) -> dict[str, Pair]:
    """A LoRA file of any known format as one :class:`Pair` per diffusers module."""
    path = Path(path)
    tensors, config = read_adapter(path)
    where = f"LoRA {str(path)!r}"
    check_config(config, where)
    return parse_pairs(tensors, config, where)[0]


def peft_config(ranks: dict[str, int], alphas: dict[str, float], dropout: float = 0.0) -> LoraConfig:
    """A peft LoraConfig for these modules: the commonest rank and alpha, patterns for the others."""
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(k): v for k, v in ranks.items() if v != rank},
        alpha_pattern={re.escape(k): v for k, v in alphas.items() if v != alpha},
        bias="none",
    )


def write_peft_folder(path: Path, tensors: dict[str, torch.Tensor], config: LoraConfig) -> Path:
    """Write a peft adapter folder (config + weights), each file swapped in atomically."""
    if path.exists() and not path.is_dir():
        raise PixArtError(f"LoRA output {str(path)!r} is a file; give a folder path (it gets {CONFIG_NAME} + weights)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp") as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        plain_modes(Path(tmp))
        path.mkdir(exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # each file swaps in atomically: never a half-written adapter
            os.replace(os.path.join(tmp, name), path / name)
    return path


def to_peft(pairs: dict[str, Pair]) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Pairs as a peft adapter (``PeftModel.from_pretrained`` on diffusers' PixArtTransformer2DModel loads it)."""
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pair.down.clone()  # safetensors refuses shared storage
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pair.up.contiguous()
    ranks = {name: pair.rank for name, pair in pairs.items()}
    return tensors, peft_config(ranks, {name: pair.alpha for name, pair in pairs.items()})


def to_kohya(pairs: dict[str, Pair]) -> dict[str, torch.Tensor]:
    """Pairs in OneTrainer's kohya naming (``lora_transformer_`` + diffusers module name, ``.alpha`` each)."""
    tensors = {}
    for name, pair in pairs.items():
        stem = "lora_transformer_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = pair.down.clone()  # parts of a fused LoRA share down
        tensors[f"{stem}.lora_up.weight"] = pair.up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(pair.alpha)
    return tensors


def fuse(pairs: Sequence[Pair | None], rows: int) -> Pair:
    """One LoRA on a fused linear from LoRAs on its parts (None: no LoRA there, zero rows).

    Parts that share ``down`` and alpha (a fused LoRA split, as peft/kohya writers store ours) fuse back
    exactly; others become one LoRA of the summed rank, ``down`` stacked and ``up`` block-diagonal with each
    part's alpha/rank folded in (alpha = the summed rank).
    """
    present = [p for p in pairs if p is not None]
    first = present[0]
    if len(present) == len(pairs) and all(torch.equal(p.down, first.down) and p.alpha == first.alpha for p in present):
        return Pair(first.down, torch.cat([p.up for p in present]), first.alpha)
    down = torch.cat([p.down for p in present])
    up = torch.zeros(rows * len(pairs), down.shape[0])
    col = 0
    for index, pair in enumerate(pairs):
        if pair is not None:
            up[index * rows : (index + 1) * rows, col : col + pair.rank] = pair.up * (pair.alpha / pair.rank)
            col += pair.rank
    return Pair(down, up, float(down.shape[0]))


def to_comfyui(pairs: dict[str, Pair]) -> dict[str, torch.Tensor]:
    """Pairs under ComfyUI's names for its native PixArt (official modules, fused qkv and kv)."""
    tensors = {}
    for ours, parts in module_names(_depth(pairs)).items():
        found = [pairs.get(name) for name in parts]
        if not any(found):
            continue
        rows = next(p.up.shape[0] for p in found if p is not None)
        pair = found[0] if len(parts) == 1 else fuse(found, rows)
        stem = f"diffusion_model.{ours}"
        tensors[f"{stem}.lora_down.weight"] = pair.down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = pair.up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(pair.alpha)
    return tensors


def write_lora(pairs: dict[str, Pair], dest: str | os.PathLike, fmt: str) -> Path:
    """Write pairs in ``fmt``: peft → an adapter folder, kohya / comfyui → one ``.safetensors`` file."""
    dest = Path(dest)
    if fmt == "peft":
        return write_peft_folder(dest, *to_peft(pairs))
    if fmt not in FORMATS:
        raise PixArtError(f"LoRA format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    if dest.suffix != ".safetensors" or dest.is_dir():
        raise PixArtError(f"LoRA output {str(dest)!r} must be a .safetensors file for --to {fmt}")
    tensors = to_kohya(pairs) if fmt == "kohya" else to_comfyui(pairs)
    return atomic_write(dest, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def convert_lora(source: str | os.PathLike, dest: str | os.PathLike, fmt: str) -> Path:
    """Rewrite a LoRA of any known format in ``fmt`` (one of :data:`FORMATS`); the weights it applies are unchanged."""
    return write_lora(read_pairs(source), dest, fmt)


def merge_pairs(loras: Sequence[tuple[dict[str, Pair], float]]) -> dict[str, Pair]:
    """One LoRA applying each of ``loras`` at its scale: ranks add up, each ``up`` carries its scale·alpha/rank."""
    merged: dict[str, list[Pair]] = {}
    for pairs, scale in loras:
        for name, pair in pairs.items():
            merged.setdefault(name, []).append(Pair(pair.down, pair.up * (scale * pair.alpha / pair.rank), 1.0))
    out = {}
    for name, parts in merged.items():
        down = torch.cat([p.down for p in parts])
        out[name] = Pair(down, torch.cat([p.up for p in parts], dim=1), float(down.shape[0]))
    return out


def merge_loras(specs: Sequence[tuple[str, float]], dest: str | os.PathLike, fmt: str = "peft") -> Path:
    """Merge LoRAs ``[(path, scale), …]`` of any known formats into one, written in ``fmt``."""
    if len(specs) < 2:
        raise PixArtError(f"LoRA merge needs at least two LoRAs, got {len(specs)}")
    for path, scale in specs:
        if not math.isfinite(scale):
            raise PixArtError(f"LoRA scale {scale!r} for {path!r} is invalid; expected a finite number such as 0.7")
    loras = [(read_pairs(path), scale) for path, scale in specs]
    shapes: dict[str, set[tuple[int, int]]] = {}
    for pairs, _ in loras:
        for name, pair in pairs.items():
            shapes.setdefault(name, set()).add((pair.down.shape[1], pair.up.shape[0]))
    clash = next((name for name, found in shapes.items() if len(found) > 1), None)
    if clash:
        raise PixArtError(
            f"LoRAs {', '.join(p for p, _ in specs)} disagree on the shape of {clash}; are they for one model?"
        )
    return write_lora(merge_pairs(loras), dest, fmt)
