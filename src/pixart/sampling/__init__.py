"""From noise to latents: samplers and the guided denoising loop (samplers), step caching (step_cache)."""
