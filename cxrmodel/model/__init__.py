"""Models: loading checkpoints (hub, local, bundled), dual encoders, LoRA, the exact fast paths, `Encoder`."""
