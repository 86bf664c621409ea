"""The T5 text side of PixArt: caption cleaning, tokenisation and encoding to (features, mask).

Captions are preprocessed the way diffusers' PixArt pipelines do it, so features match theirs: always
lower-cased and stripped; with ``clean=True`` (the default) also the DeepFloyd-IF cleaning (URLs, HTML,
@names, CJK, odd punctuation, mojibake via ftfy), applied twice as diffusers does. The full cleaning
needs the ``clean`` extra (ftfy, beautifulsoup4); without it only lower-casing and stripping happen.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import re
import tempfile
import urllib.parse as ul
from pathlib import Path

import torch
import torch.nn.functional as F

from pixart.errors import PixArtError, first_line
from pixart.model.config import FAMILY

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {name: family.max_tokens for name, family in FAMILY.items()}


def saved_text_width(root: Path) -> int | None:
    """The feature width (d_model) of the T5 in a pipeline folder's text_encoder/, read without loading it."""
    try:
        return json.loads((root / "text_encoder" / "config.json").read_text()).get("d_model")
    except (OSError, ValueError):
        return None


def check_text_width(caption_channels: int, root: Path, what: str) -> None:
    """Refuse a transformer whose caption projection does not take the width of the pipeline's T5 features."""
    width = saved_text_width(root)
    if width is not None and width != caption_channels:
        raise PixArtError(
            f"{what} expects {caption_channels}-wide text features but {str(root)!r} has a {width}-wide text "
            "encoder; use a transformer and a model of the same release"
        )


"""T5 tokens per caption each family was trained with, by family name (see ``Family.max_tokens``)."""

QUANTIZATIONS = ("int8-dynamic", "8bit", "4bit")
"""Ways to shrink T5: dynamic int8 linears on CPU (torch), or bitsandbytes 8/4-bit (CUDA only)."""

# DeepFloyd-IF caption cleaning as (pattern, replacement) steps, in the order diffusers applies them.
_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_BEFORE_HTML = (
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + r"))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + r"))", ""),
)
_DASHES = (
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_AFTER_HTML = (
    (r"@[\w\d]+\b", ""),  # @nicknames
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A, main), Yijing
    (r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+", ""),
    (_DASHES, "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " "),  # decorative punctuation: ***SALE***
    (r"\s+\.\s+", " "),
)
_AFTER_FTFY = (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def full_cleaning_available() -> bool:
    """Whether the optional ``clean`` extra (ftfy, beautifulsoup4) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("ftfy", "bs4"))


def _sub_all(rules: tuple[tuple[str, str], ...], text: str) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


def _clean_once(caption: str) -> str:
    import ftfy
    from bs4 import BeautifulSoup

    caption = ul.unquote_plus(str(caption)).strip().lower()
    caption = _sub_all(_BEFORE_HTML, caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _sub_all(_AFTER_HTML, caption)
    # snake_or-kebab-case file-name-like captions become words; a dash or two stays
    if len(re.findall(r"[-_]", caption)) > 3:
        caption = re.sub(r"[-_]", " ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    return _sub_all(_AFTER_FTFY, caption).strip()


def preprocess_caption(caption: str, clean: bool = True) -> str:
    """A caption as T5 should see it: lower-cased and stripped, plus the full cleaning when asked and available."""
    if clean and full_cleaning_available():
        # Twice, as diffusers does: one pass can expose patterns (e.g. nested quotes) for the next.
        return _clean_once(_clean_once(caption))
    return caption.lower().strip()


def check_quantization(quantization: str | None, device: torch.device) -> None:
    """Refuse a T5 quantization that cannot run on ``device``, before anything is loaded."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise PixArtError(f"unknown T5 quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    if quantization in ("8bit", "4bit") and device.type != "cuda":
        raise PixArtError(f"T5 {quantization} quantization (bitsandbytes) needs CUDA; on CPU use int8-dynamic")
    if quantization == "int8-dynamic" and device.type != "cpu":
        raise PixArtError(f"dynamic int8 quantization of T5 runs on CPU only, not {device.type}")


class TextEncoder:
    """A T5 tokenizer and encoder that turn captions into the (features, mask) a PixArt transformer reads."""

    def __init__(self, tokenizer, model: torch.nn.Module, device: str | torch.device | None = None):
        """``device``: where inputs go; needed only when the weights are streamed from disk (on "meta")."""
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self._device = torch.device(device) if device is not None else None
        self._offload_dir = None  # the temporary folder of a streamed encoder, removed with it

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        subfolder: str | None = "text_encoder",
        tokenizer_subfolder: str | None = "tokenizer",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        stream: bool = False,
    ) -> TextEncoder:
        """Load tokenizer and T5 encoder, by default from a diffusers pipeline folder or hub id.

        ``quantization``: None, "int8-dynamic" (CPU), "8bit" or "4bit" (bitsandbytes, CUDA only).
        ``stream``: keep the weights on disk and read each layer only while it runs (accelerate disk
        offload), so encoding needs memory for one layer rather than all of T5 (≈19 GB in fp32 for
        T5-XXL); slower, and for CPU without quantization only.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        device = torch.device(device or "cpu")
        check_quantization(quantization, device)
        if stream and (quantization is not None or device.type != "cpu"):
            raise PixArtError("streaming T5 from disk works on CPU without quantization only")
        model_kwargs: dict = {"dtype": dtype} if dtype is not None else {}
        offload_dir = None
        if stream:
            # Weights stored as safetensors are read in place; the folder only receives what is not.
            offload_dir = tempfile.TemporaryDirectory(prefix="pixart-t5-")
            model_kwargs.update(device_map={"": "disk"}, offload_folder=offload_dir.name)
        if quantization in ("8bit", "4bit"):
            if importlib.util.find_spec("bitsandbytes") is None:
                raise PixArtError(f"T5 {quantization} quantization needs bitsandbytes: pip install bitsandbytes")
            from transformers import BitsAndBytesConfig

            bits = {"load_in_8bit": True} if quantization == "8bit" else {"load_in_4bit": True}
            model_kwargs.update(quantization_config=BitsAndBytesConfig(**bits), device_map={"": device.index or 0})
        source = str(path_or_hub_id)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **_sub(tokenizer_subfolder))
            # safetensors only: a pickled .bin could run code when loaded (the hub fetch skips them too)
            model = T5EncoderModel.from_pretrained(source, **_sub(subfolder), use_safetensors=True, **model_kwargs)
        except OSError as err:
            raise PixArtError(f"cannot load the T5 text encoder from {source!r}: {first_line(err)}") from None
        if quantization not in ("8bit", "4bit") and not stream:
            model = model.to(device)
        if quantization == "int8-dynamic":
            model = quantize_int8_dynamic(model)
        encoder = cls(tokenizer, model, device=device)
        encoder._offload_dir = offload_dir
        return encoder

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder (e.g. between CPU and GPU for model offload); returns self."""
        self.model.to(device)
        self._device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        return self._device or next(self.model.parameters(), torch.empty(0)).device

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def width(self) -> int:
        """Feature channels per token (4096 for T5-XXL); must equal the transformer's caption_channels."""
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(
        self, prompts: list[str], max_length: int, clean: bool = True, batch_size: int = 16, trim: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions to features (B, max_length, C) and mask (B, max_length) long, 1 = token, 0 = padding.

        Captions are padded to max_length; longer ones are truncated with a warning saying how many
        tokens were dropped. Duplicate captions are encoded once. ``trim``: T5 reads each caption on its own,
        at its own token count (at most max_length), not padded, and the rows past it are zero features,
        masked. Every reader masks padding (T5's own attention, the transformer's cross-attention), so the
        tokens' features are the same as padded, to rounding, and a caption's features depend on nothing else
        in the call.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(max_length, int) or max_length < 1:
            raise PixArtError(f"max tokens must be a positive integer, got {max_length!r}")
        texts = [preprocess_caption(p, clean) for p in prompts]
        unique = list(dict.fromkeys(texts))
        if trim:
            counts = [min(max_length, len(ids)) for ids in self.tokenizer(unique, add_special_tokens=True).input_ids]
            chunks = [([text], count) for text, count in zip(unique, counts, strict=True)]
        else:
            chunks = [(unique[i : i + batch_size], max_length) for i in range(0, len(unique), batch_size)]
        features, masks = [], []
        for chunk, length in chunks:
            self._warn_truncation(chunk, max_length)
            tokens = self.tokenizer(
                chunk,
                padding="max_length",
                max_length=length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            features.append(F.pad(self.model(ids, attention_mask=mask)[0], (0, 0, 0, max_length - length)))
            masks.append(F.pad(mask.long(), (0, max_length - length)))
        index = torch.tensor([unique.index(t) for t in texts], device=self.device)
        return torch.cat(features)[index], torch.cat(masks)[index]

    def _warn_truncation(self, texts: list[str], max_length: int) -> None:
        for text in texts:
            dropped = len(self.tokenizer(text, add_special_tokens=True).input_ids) - max_length
            if dropped > 0:
                log.warning(
                    "caption truncated to %d tokens, %d token(s) dropped: %r", max_length, dropped, _preview(text)
                )


def quantize_int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """Int8 weights for every nn.Linear, activations quantised on the fly: ~4× less T5 memory on CPU."""
    from pixart.model.quantize import quantize_int8

    return quantize_int8(model)


def _sub(subfolder: str | None) -> dict:
    return {"subfolder": subfolder} if subfolder else {}


def _preview(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
