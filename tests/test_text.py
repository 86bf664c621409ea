"""Text encoding matches diffusers' PixArt pipelines: same cleaning, same features, same masks."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.tiny import build_pipeline, save_pipeline

from pixart.errors import PixArtError
from pixart.model.text import DEFAULT_MAX_TOKENS, TextEncoder, preprocess_caption, quantize_int8_dynamic

NASTY_CAPTIONS = [
    "A Cat   on a Mat ",
    "Visit https://example.com/page?x=1 for <b>free shipping</b> @seller #12 ***SALE***",
    "“Quoted” ‘text’ — with a dash…and dots.. 1920x1080 img_2024_01_02_final.png",
    "漢字 mixed with English &amp; entities &quot;here&quot; \\n newline",
    "this-is-my-cute-cat_photo page 12 jc6640 download free",
    "'  leading quote and trailing plus+",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffusers_pipe():
    return build_pipeline("alpha")


@pytest.mark.parametrize("clean", [True, False])
def test_caption_preprocessing_matches_diffusers(diffusers_pipe, clean):
    expected = diffusers_pipe._text_preprocessing(NASTY_CAPTIONS, clean_caption=clean)
    assert [preprocess_caption(c, clean) for c in NASTY_CAPTIONS] == expected


def test_cleaning_removes_urls_html_and_cjk():
    cleaned = preprocess_caption("A <i>Red</i> fox 狐狸 at https://foo.com @bob")
    assert cleaned == "a red fox at"


def test_encode_matches_diffusers_encode_prompt(diffusers_pipe):
    encoder = TextEncoder(diffusers_pipe.tokenizer, diffusers_pipe.text_encoder)
    prompts = ["A red fox in the snow", "", "A red fox in the snow"]
    features, mask = encoder.encode(prompts, max_length=20)
    ref, ref_mask, _, _ = diffusers_pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=20, clean_caption=True
    )
    assert features.shape == (3, 20, 32) and mask.dtype == torch.long
    torch.testing.assert_close(features, ref)
    assert torch.equal(mask, ref_mask.long())
    assert mask[1].sum() == 1  # "" is just the end-of-sequence token


def test_trim_skips_padding_and_keeps_every_tokens_features(diffusers_pipe):
    """diffusers pads to max_sequence_length; trimmed, T5 reads each caption alone at its own length, and every
    token's features and mask are diffusers' own."""
    encoder = TextEncoder(diffusers_pipe.tokenizer, diffusers_pipe.text_encoder)
    prompts = ["A red fox in the snow", "", "a cat"]  # 21 byte tokens + </s> at the longest
    seen = []
    hook = encoder.model.register_forward_hook(lambda m, args, kwargs_out: seen.append(tuple(args[0].shape)))
    try:
        features, mask = encoder.encode(prompts, max_length=40, trim=True)
    finally:
        hook.remove()
    ref, ref_mask, _, _ = diffusers_pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=40, clean_caption=True
    )
    assert seen == [(1, 22), (1, 1), (1, 6)] and features.shape == (3, 40, 32)
    assert torch.equal(mask, ref_mask.long()) and not features[~mask.bool()].any()  # padding: zero, masked
    torch.testing.assert_close(features[mask.bool()], ref[mask.bool()])
    # A caption longer than max_length is still cut there, with the warning.
    _, long_mask = encoder.encode(["x" * 60, "a"], max_length=40, trim=True)
    assert long_mask.shape == (2, 40) and long_mask[0].sum() == 40


def test_duplicate_prompts_encoded_once(diffusers_pipe):
    encoder = TextEncoder(diffusers_pipe.tokenizer, diffusers_pipe.text_encoder)
    seen = []
    hook = encoder.model.register_forward_hook(lambda m, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        encoder.encode(["same", "other", "same", "SAME "], max_length=8)
    finally:
        hook.remove()
    assert seen == [2]


def test_truncation_is_warned_with_dropped_count(diffusers_pipe, caplog):
    encoder = TextEncoder(diffusers_pipe.tokenizer, diffusers_pipe.text_encoder)
    with caplog.at_level(logging.WARNING, logger="pixart.model.text"):
        _, mask = encoder.encode(["abcdefghij"], max_length=6, clean=False)  # 10 byte tokens + </s>: keeps 5 + </s>
    assert mask.sum() == 6
    assert "5 token(s) dropped" in caplog.text


def test_from_pretrained_reads_a_pipeline_folder(tmp_path, diffusers_pipe):
    folder = save_pipeline(tmp_path / "pipe", "sigma")
    encoder = TextEncoder.from_pretrained(folder)
    reference = TextEncoder(diffusers_pipe.tokenizer, diffusers_pipe.text_encoder)
    features, _ = encoder.encode(["hello"], max_length=8)
    torch.testing.assert_close(features, reference.encode(["hello"], max_length=8)[0])  # same seed → same weights
    assert encoder.width == 32 and DEFAULT_MAX_TOKENS == {"alpha": 120, "sigma": 300}


def test_streaming_t5_from_disk_gives_the_same_features(tmp_path):
    folder = save_pipeline(tmp_path / "pipe", "alpha")
    streamed = TextEncoder.from_pretrained(folder, stream=True)
    assert streamed.model.shared.weight.device.type == "meta"  # nothing resident until a layer runs
    features, mask = streamed.encode(["a lighthouse at dusk"], max_length=24)
    expected, expected_mask = TextEncoder.from_pretrained(folder).encode(["a lighthouse at dusk"], max_length=24)
    assert torch.equal(features, expected) and torch.equal(mask, expected_mask)
    with pytest.raises(PixArtError, match="streaming T5 from disk works on CPU without quantization only"):
        TextEncoder.from_pretrained(folder, stream=True, quantization="int8-dynamic")


def test_int8_dynamic_quantization_stays_close(diffusers_pipe):
    pipe = build_pipeline("alpha")
    tokenizer, model = pipe.tokenizer, pipe.text_encoder
    full = TextEncoder(tokenizer, model).encode(["a small test caption"], max_length=24)[0]
    quantized = TextEncoder(tokenizer, quantize_int8_dynamic(model)).encode(["a small test caption"], max_length=24)[0]
    assert not torch.equal(full, quantized)
    assert (full - quantized).abs().mean() < 0.05 * full.abs().mean()


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(PixArtError, match="cannot load the T5 text encoder"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(PixArtError, match="needs CUDA"):
        TextEncoder.from_pretrained(tmp_path, quantization="8bit")
    with pytest.raises(PixArtError, match="unknown T5 quantization"):
        TextEncoder.from_pretrained(tmp_path, quantization="int3")
