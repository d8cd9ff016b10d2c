"""The one interface every stage talks to. Stages never import transformers or unsloth themselves.

A backend loads a model folder (optionally 4-bit), attaches LoRA, generates, scores sequence log-probs,
saves an adapter and merges it into full-precision weights. `hf` (transformers + PEFT + bitsandbytes) runs
anywhere; `unsloth` is the fast GPU path behind the same methods; testing.FakeBackend scripts sampling and scoring.
A backend written from scratch implements every member below: the judge loads a tokenizer alone (load_tokenizer),
and the trainer, the merge and the disk estimates read `device`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from selfie_lite.config import LoraConfig


class Backend(Protocol):
    name: str  # "hf", "unsloth": printed at the start of a run and recorded in summary.json
    device: str  # "cuda" or "cpu": where models load; the merge's precision and the disk estimates follow it

    def load_tokenizer(self, model_dir: str | Path) -> Any:
        """The model folder's tokenizer with a chat template (the run's chat_template file when given), a pad token
        set; a UserError when it has no chat template."""

    def load(self, model_dir: str | Path, *, trainable: bool = False) -> tuple[Any, Any]:
        """(model, tokenizer). trainable=True prepares the model for LoRA training (4-bit: k-bit prep)."""

    def add_lora(self, model: Any, lora: LoraConfig, seed: int) -> Any:
        """A PeftModel with a fresh trainable adapter; the adapter-disabled model is the DPO reference."""

    def generate(self, model, tokenizer, prompts: list[str], *, num_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int, seed: int, on_batch=None) -> list[dict]:
        """Per prompt: {"prompt", "prompt_ids", "responses": [str]*K, "response_ids": [[int]]*K}."""

    def sequence_logps(self, model, sequences: list[tuple[list[int], list[int]]], *, batch_size: int,
                       on_batch=None) -> list[float]:
        """Sum of log p(response token | prefix) for each (prompt_ids, response_ids)."""

    def save_adapter(self, model, out_dir: Path, weights: dict | None = None) -> None: ...

    def merge(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
        """Adapter merged into full-precision weights, saved as a standard HF folder (safetensors)."""

    def free(self, *objs) -> None: ...
