"""The built-in tiny preset: a synthetic task with an exact oracle, a gold preference set and a small SFT
model, all built offline so that SPA runs (and is measured) on a CPU with no hub."""

from selfie_lite.tiny.build import (
    TinyPreset,
    build_tiny,
    data_hash,
    default_cache_dir,
    generate_data,
    sft_report,
)
from selfie_lite.tiny.task import GOOD_SCORE, make_prompt, parse_prompt, score, score_details

__all__ = [
    "GOOD_SCORE",
    "TinyPreset",
    "build_tiny",
    "data_hash",
    "default_cache_dir",
    "generate_data",
    "make_prompt",
    "parse_prompt",
    "score",
    "score_details",
    "sft_report",
]
