"""Training: config (config), loop (loop), objectives (objective, lcm, dreambooth), diffusion math
(diffusion), checkpoints of a run (checkpoint), datasets and buckets (data) and the feature cache (cache)."""
