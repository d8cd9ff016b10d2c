"""Pick a backend: `auto` takes Unsloth when a CUDA GPU and the package are both present, else transformers."""

from __future__ import annotations

from selfie_lite.config import RunConfig
from selfie_lite.errors import UserError, first_line


def unsloth_available() -> bool:
    """Importing unsloth on a machine without a GPU raises NotImplementedError, not ImportError."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def get_backend(cfg: RunConfig):
    """Returns (backend, why) so the CLI can say which one it picked."""
    choice = cfg.backend
    if choice == "auto":
        choice = "unsloth" if unsloth_available() else "hf"
        why = "auto: CUDA GPU and unsloth found" if choice == "unsloth" else "auto: no CUDA GPU with unsloth"
    else:
        why = "asked for"
    if choice == "unsloth":
        try:
            from selfie_lite.backends.unsloth import UnslothBackend
        except ImportError as e:
            if cfg.backend == "auto":  # auto never fails: it falls back to transformers and says why
                from selfie_lite.backends.hf import HFBackend

                return HFBackend(cfg), f"auto: unsloth failed to import ({first_line(e)[:120]})"
            raise UserError(f"unsloth is not available: {e}", hint="pip install 'selfie-lite[gpu]' on a CUDA machine",
                            key="backend") from None
        return UnslothBackend(cfg), why
    from selfie_lite.backends.hf import HFBackend

    return HFBackend(cfg), why
