"""Randomness for DP noise and Poisson sampling: seeded from the OS's CSPRNG, never guessable."""

from __future__ import annotations

import os

import torch


def fresh_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the OS's CSPRNG, never from a guessable seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


__all__ = ["fresh_generator"]
