"""The built-in smol preset: SmolLM2-135M-Instruct (a real chat model, run on a CPU) on verifiable instruction
following in the style of IFEval, with a programmatic checker as the oracle and a gold preference set labelled by
it, built once per model from the model's own answers and several editors' rewrites (build.py)."""

from selfie_lite.smol.build import (
    SOURCE,
    BuildSizes,
    SmolPreset,
    build_smol,
    default_cache_dir,
    generate_prompts,
)
from selfie_lite.smol.checker import IFEvalScorer, score, score_details, summarize
from selfie_lite.smol.task import make_prompt, parse_prompt

__all__ = [
    "SOURCE",
    "BuildSizes",
    "IFEvalScorer",
    "SmolPreset",
    "build_smol",
    "default_cache_dir",
    "generate_prompts",
    "make_prompt",
    "parse_prompt",
    "score",
    "score_details",
    "summarize",
]
