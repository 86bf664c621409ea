"""`pixart serve`: the Gradio page and the JSON API over one PixArtPipeline (app), behind its access rules (guard)."""
