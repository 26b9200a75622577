"""The embedded synthetic AAPM-like benchmark (phantoms, implants, generator)."""
from .generator import GENERATOR_VERSION, PRESETS, SyntheticPreset, generate

__all__ = ["GENERATOR_VERSION", "PRESETS", "SyntheticPreset", "generate"]
