"""Disk space: what a stage will write (from safetensors headers, no weights loaded) against what the disk has free,
checked before the stage starts rather than failing half-way through a merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfie_lite.errors import RunError


def format_bytes(n: float) -> str:
    """1.9 MB, 14.2 GB: a tiny-preset model must not read as 0.00 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def free_bytes(folder: Path) -> tuple[int, Path]:
    """Free space on the disk that holds `folder` (or its nearest existing parent), and that parent."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def check_free_space(folder: Path, needed_bytes: int | None, what: str, parts: str = "") -> None:
    """Refuse to start `what` when the disk under `folder` has less than needed_bytes free. None: the need is not
    known (no local weights to measure), so nothing is checked rather than a made-up number."""
    if not needed_bytes:
        return
    free, probe = free_bytes(folder)
    if free < needed_bytes:
        raise RunError(
            f"not enough disk space to {what}: need {format_bytes(needed_bytes)}{f' ({parts})' if parts else ''} "
            f"in {probe}, {format_bytes(free)} free",
            hint="free some space or point --out at a larger disk, then add --resume",
        )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def local_model_dir(model) -> Path | None:
    """A model's local folder: the folder itself, or a hub id's snapshot in the Hugging Face cache (no download);
    None when neither is there."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        return None


def model_params(model) -> int | None:
    """Parameters stored in a model's *.safetensors files, from their headers (a few kB read, no weights loaded).
    A 4-bit checkpoint counts its packed bytes, so it reads low: merges load it in 16 bit anyway."""
    folder = local_model_dir(model)
    if folder is None:
        return None
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")) or b"{}")
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t.get("shape", []):
                    n *= d
                total += n
    return total or None


def merged_model_bytes(base_model, device: str = "cpu") -> int | None:
    """What merging an adapter into `base_model` writes: every parameter at the merge's precision (fp32 on a CPU,
    16 bit on a GPU: merge.py), plus 10% for the tokenizer and headroom. None: unknown (no local weights)."""
    n = model_params(base_model)
    return None if n is None else int(n * (2 if device == "cuda" else 4) * 1.1)


def adapter_bytes(model) -> int:
    """Bytes of a PEFT model's trainable (LoRA) parameters, as save_adapter writes them, plus 10%."""
    return int(1.1 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
