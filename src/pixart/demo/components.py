"""Builders for the bundled demo pipeline's parts: a small VAE, a small T5 encoder, a small PixArt config.

Every part is a real class users already load (diffusers ``AutoencoderKL``, transformers
``T5EncoderModel`` with ``ByT5Tokenizer``, our ``PixArtTransformer`` saved in the diffusers layout), so
both :class:`pixart.inference.pipeline.PixArtPipeline` and diffusers' ``PixArtSigmaPipeline`` load the result.
ByT5's tokenizer is byte-level: no vocabulary file to ship. The VAE and the text encoder are trained
here (minutes on a CPU) before the transformer's three stages; see ``scripts/train_demo.py`` and
``docs/demo.md``. Everything is deterministic given its seed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixart.model.config import PixArtConfig

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
"""Side of the demo's stage-1/2 images; stage 3 fine-tunes at 128."""
VAE_FACTOR = 4
"""Downsampling of the demo VAE: 64-px images become 16×16 latents (factor 8 would leave 8×8, too few
tokens for a small object's shape after patch 2)."""
T5_WIDTH = 128
"""Feature width of the demo text encoder = the transformer's caption_channels."""
MAX_TOKENS = 96
"""Bytes per caption (ByT5 tokens are bytes, plus one end token): the longest demo caption has 93."""


def demo_transformer_config(image_size: int = IMAGE_SIZE) -> PixArtConfig:
    """The demo transformer: Σ family (null caption = T5 of ""), 2.7 M parameters, head dim 64."""
    # pe_scale follows the official rule that the coordinate range stays that of the first stage:
    # 64 px → 1, 128 px → 2 (as 512 → 1024 in the releases).
    return PixArtConfig(
        family="sigma",
        sample_size=image_size // VAE_FACTOR,
        pe_scale=image_size / IMAGE_SIZE,
        hidden_size=192,
        depth=4,
        num_heads=3,
        caption_channels=T5_WIDTH,
        model_max_length=MAX_TOKENS,
    )


def make_vae(seed: int = 0):
    """A fresh AutoencoderKL with factor 4 (three blocks) and 4 latent channels, as the SD VAE has."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        force_upcast=False,
    )


def make_text_encoder(seed: int = 0):
    """A fresh 2-layer T5 encoder (0.45 M parameters) and ByT5's byte tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=384,  # ByT5: 3 special tokens + 256 bytes, padded up as the released ByT5 is
        d_model=T5_WIDTH,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return ByT5Tokenizer(), T5EncoderModel(config)


def images_tensor(folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """The images of a shapes imagefolder as (N, 3, H, W) in [-1, 1], in metadata order."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][:limit]
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def captions(folder: str | Path) -> list[str]:
    """The captions and class labels of a shapes imagefolder (the text encoder's pretraining text)."""
    rows = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows] + [r["label"] for r in rows]


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3, crop: int = 32,
              seed: int = 0):  # fmt: skip
    """Fit the VAE to images (N, 3, H, W) in [-1, 1]: L1 + MSE reconstruction and a small KL (as SD's VAE).

    It trains on random ``crop``-px crops: the network is convolutional, and a quarter of the pixels
    is a quarter of the CPU time for the same edges and colours.

    Sets ``scaling_factor`` to 1 / std of the latents, the rule SD's 0.18215 came from, so the
    diffusion sees unit-variance latents. Returns the VAE in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)]
        top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        batch = batch[..., top : top + crop, left : left + crop]
        loss, _, kl = vae_loss(vae, batch, gen)
        optimizer_step(optimizer, schedule, vae.parameters(), loss)
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f kl %.3f", step + 1, steps, loss.item(), kl.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


def optimizer_step(optimizer, schedule, parameters, loss: torch.Tensor) -> None:
    """One step of the demo parts' pretraining: backward, gradient norm clipped to 1, optimizer and schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator):
    """The VAE's training loss on images in [-1, 1]: L1 + MSE of a sampled reconstruction and 1e-4 × KL per
    latent value. Returns (loss, posterior, kl)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    recon = vae.decode(z).sample
    kl = posterior.kl().mean() / z[0].numel()
    return (recon - images).abs().mean() + F.mse_loss(recon, images) + 1e-4 * kl, posterior, kl


@torch.no_grad()
def roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] encoded (posterior mean) and decoded again."""
    out = [vae.decode(vae.encode(images[i : i + 128]).latent_dist.mean).sample for i in range(0, len(images), 128)]
    return torch.cat(out).clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] as PIL images."""
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image batches in [-1, 1]."""
    mse = F.mse_loss((a + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def caption_places(folder: str | Path) -> tuple[list[str], list[list[int]]]:
    """The captions of a shapes imagefolder and, for each, :func:`shapes.place_labels`: the text encoder's
    layout objective."""
    from pixart.demo.shapes import Scene, place_labels

    rows = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [place_labels(r["text"], Scene.from_dict(r)) for r in rows]


def pretrain_text_encoder(tokenizer, model, texts: list[str], steps: int, batch_size: int = 64, lr: float = 2e-3,
                          mask_rate: float = 0.3, seed: int = 0, places: tuple[list[str], list[list[int]]] | None = None
                          ) -> torch.nn.Module:  # fmt: skip
    """Byte-level masked-language-model pretraining, so each byte's feature knows the word it sits in;
    with `places` (captions and their :func:`caption_places` labels), also the layout objective.

    A random T5 mixes neighbouring bytes arbitrarily; after this, every byte of "red" carries "red",
    which the transformer's cross-attention can read with one head. The prediction head is the input
    embedding (tied), so nothing but the encoder is kept.

    The layout objective is a linear probe on the same features, trained with them: for every byte
    of an object's words, where the caption puts that object (left, right, top, bottom, centre). Masked
    bytes alone leave which object a relation puts first readable only non-linearly (a probe of the
    MLM-only encoder: 83% linear, 99.5% with an MLP), and cross-attention matches queries to keys
    linearly; a released T5-XXL has read enough text to know what "A above B" says, a 0.4 M-parameter
    encoder trained on 16 000 captions has not. The probe is dropped afterwards. Returns the encoder in
    eval mode.
    """
    from pixart.demo.shapes import PLACES

    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(model.config.d_model, len(PLACES)) if places else None
    parameters = list(model.parameters()) + (list(head.parameters()) if head else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    mask_id = 2  # ByT5's <unk>: never a real byte, so it marks the masked positions
    model.train()
    for step in range(steps):
        picked = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=gen).tolist()]
        tokens = tokenizer(picked, padding="longest", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        ids, attention = tokens.input_ids, tokens.attention_mask
        masked = (torch.rand(ids.shape, generator=gen) < mask_rate) & (ids > 2)
        hidden = model(input_ids=ids.masked_fill(masked, mask_id), attention_mask=attention).last_hidden_state
        # T5's tied head rescales by d_model^-0.5 first; without it the logits start near ±70 nats.
        logits = hidden[masked] * model.config.d_model**-0.5 @ model.shared.weight.T
        loss = F.cross_entropy(logits, ids[masked])
        message = ""
        if head is not None:
            place_loss, place_accuracy = _place_loss(tokenizer, model, head, places, batch_size, gen)
            loss = loss + place_loss
            message = f" place loss {place_loss.item():.3f} object-byte place accuracy {place_accuracy:.3f}"
        optimizer_step(optimizer, schedule, parameters, loss)
        if step % 100 == 0 or step == steps - 1:
            accuracy = (logits.argmax(-1) == ids[masked]).float().mean().item()
            log.info("t5 step %d/%d loss %.3f masked-byte accuracy %.3f%s", step + 1, steps, loss.item(), accuracy,
                     message)  # fmt: skip
    return model.eval().requires_grad_(False)


def _place_loss(tokenizer, model, head, places, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the linear place probe on a batch of unmasked captions, and its accuracy on object bytes."""
    texts, labels = places
    picked = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
    tokens = tokenizer([texts[i] for i in picked], padding="longest", max_length=MAX_TOKENS, truncation=True,
                       return_tensors="pt")  # fmt: skip
    target = torch.full(tokens.input_ids.shape, -100)
    for row, i in enumerate(picked):
        n = min(len(labels[i]), target.shape[1] - 1)  # the last position holds </s> when truncated
        target[row, :n] = torch.tensor(labels[i][:n])
    hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    logits = head(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    named = target > 0
    return loss, (logits.argmax(-1)[named] == target[named]).float().mean().item()


def scheduler():
    """The released pipelines' scheduler: 1000 linear betas 1e-4…0.02, DPM-Solver++ 2M."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000
    )


def save_base_pipeline(folder: str | Path, tokenizer, text_encoder, vae) -> Path:
    """Write tokenizer/, text_encoder/, vae/, scheduler/ and a Σ model_index.json: the base that
    ``pixart train`` (model.pipeline) and ``pixart.checkpoints.export.export_pipeline`` read."""
    import diffusers

    folder = Path(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    scheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "PixArtSigmaPipeline",
        "_diffusers_version": diffusers.__version__,
        "tokenizer": ["transformers", "ByT5Tokenizer"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "transformer": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
