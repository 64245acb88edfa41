"""Torch tier: CPU numerics of the diffusers patches against the real diffusers 0.38.0 wheel."""
