"""selfie-lite: Spread Preference Annotation (SPA) on one GPU, or on a CPU with the tiny preset."""

__version__ = "0.1.0"
