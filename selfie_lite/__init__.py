"""selfie-lite: Spread Preference Annotation (SPA) on one GPU, or on a CPU with the tiny preset."""

from selfie_lite.numerics import pin_mkl_reproducibility

# Before torch runs anything: MKL reads its reproducibility mode once, at its first call (see numerics.py).
pin_mkl_reproducibility()

__version__ = "0.1.0"
