"""One aspect-ratio table: training buckets and generation bins against diffusers' own PixArt bins."""

import pytest
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

from pixart.errors import PixArtError
from pixart.model.resolution import bins_for, bucket_table, generation_size, nearest_bin

DIFFUSERS_BINS = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
DIFFUSERS_BINS[2048] = ASPECT_RATIO_2048_BIN


@pytest.mark.parametrize("image_size", sorted(DIFFUSERS_BINS))
def test_generation_bins_are_diffusers_bins_in_their_order(image_size):
    theirs = [(float(ratio), (int(h), int(w))) for ratio, (h, w) in DIFFUSERS_BINS[image_size].items()]
    assert list(bins_for(image_size // 8).items()) == theirs  # same order: ties go to the same bin
    # and every bin is a training bucket of the same size; only 2048 px keeps all 40 ratios.
    buckets = bucket_table(image_size)
    assert all(buckets[ratio] == size for ratio, size in theirs)
    assert len(theirs) == (40 if image_size == 2048 else 33) == len(buckets) - (0 if image_size == 2048 else 7)


def test_nearest_bin_picks_what_diffusers_picks():
    sides = range(64, 4200, 56)
    for image_size, theirs in DIFFUSERS_BINS.items():
        ours = bins_for(image_size // 8)
        for height in sides:
            for width in sides:
                expected = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=theirs)
                assert nearest_bin(height, width, ours) == expected, (image_size, height, width)


def test_sizes_without_bins_generate_as_asked():
    # The demo (VAE factor 4) trains at 64 and 128 px: it has buckets but no generation bins.
    assert bins_for(16, vae_factor=4) is None and bins_for(32, vae_factor=4) is None
    assert bucket_table(64)[1.0] == (64, 64) and bucket_table(128)[0.5] == (88, 176)
    assert generation_size(96, 64, sample_size=32, multiple=8, binning=True, vae_factor=4) == (64, 96)
    assert generation_size(1000, 504, sample_size=128, multiple=16, binning=True) == (704, 1408)
    with pytest.raises(PixArtError, match="no bucket table for resolution 768"):
        bucket_table(768)
