"""Tiny ERNIE-Image transformers with fixed random weights and inputs, shared by the worker processes.

The real model zero-initialises `adaLN_modulation[-1]` (so every block's gates are 0 and attention never
reaches the output) and `final_linear` (so the output is exactly 0). Both are re-randomised here;
otherwise "identical output" would be trivially true.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

SEED = 20240601


@dataclass(frozen=True)
class Case:
    """A model configuration and the inputs it is run on."""

    model: dict[str, Any]
    image_hw: tuple[int, int]
    text_lens: tuple[int, ...]
    notes: str = field(default="")


_BASE = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_layers=2,
    ffn_hidden_size=128,
    in_channels=8,
    out_channels=8,
    patch_size=1,
    text_in_dim=48,
    rope_theta=256,
    rope_axes_dim=(8, 12, 12),
    eps=1e-6,
    qk_layernorm=True,
)

CASES: dict[str, Case] = {
    "rope_full": Case(
        dict(_BASE), (4, 5), (6, 3), "RoPE on all 32 head channels; CFG-like batch with text padding (masked)"
    ),
    "rope_partial": Case(
        dict(_BASE, rope_axes_dim=(4, 6, 6)), (5, 4), (2, 5), "RoPE on 16 of 32 channels, 16 pass through; masked"
    ),
    "unmasked_long": Case(
        dict(_BASE, num_layers=1), (63, 64), (4,), "4036 tokens, no padding: laser-attention sized, mask dropped"
    ),
}


def build_model(module: ModuleType, case: Case) -> torch.nn.Module:
    """ErnieImageTransformer2DModel from MODULE with seeded weights, zero-initialised layers re-randomised."""
    torch.manual_seed(SEED)
    model = module.ErnieImageTransformer2DModel(**case.model)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for layer in (model.adaLN_modulation[-1], model.final_linear):
            layer.weight.normal_(0.0, 0.05, generator=generator)
            layer.bias.normal_(0.0, 0.05, generator=generator)
    return model.eval()


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Latents, timesteps, padded text states and text lengths for CASE."""
    generator = torch.Generator().manual_seed(SEED + 2)
    batch = len(case.text_lens)
    height, width = case.image_hw
    text_max = max(case.text_lens)
    return {
        "hidden_states": torch.randn(batch, case.model["in_channels"], height, width, generator=generator),
        "timestep": torch.rand(batch, generator=generator) * 1000,
        "text_bth": torch.randn(batch, text_max, case.model["text_in_dim"], generator=generator),
        "text_lens": torch.tensor(case.text_lens, dtype=torch.long),
    }


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
