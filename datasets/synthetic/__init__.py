"""The embedded synthetic AAPM-like benchmark (phantoms, implants, generator) and benchmarks simulated on the
user's own clean CT (``clean_ct``)."""
from .clean_ct import generate_from_clean_images
from .generator import GENERATOR_VERSION, PRESETS, SyntheticPreset, expected_fingerprint, folder_fingerprint, generate

__all__ = ["GENERATOR_VERSION", "PRESETS", "SyntheticPreset", "expected_fingerprint", "folder_fingerprint", "generate",
           "generate_from_clean_images"]
