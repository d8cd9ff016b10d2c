"""Content hashes of model folders and run files that stay cheap for a 7B model.

Small files (the tiny preset, test models) are hashed whole. A 7B model is ~15 GB: reading it all would add a minute
to every resume and every merge, so a file over FULL_HASH_BYTES contributes its safetensors header (names, dtypes,
shapes, offsets) and 64 blocks of 64 KiB spread evenly over it (4 MB read per file). Two fine-tunes of one base
differ in nearly every weight, so a sampled block tells them apart; sizes and mtimes would not do, since a plain `cp`
changes mtimes and a fine-tune keeps the sizes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 64 * 2**20  # files up to this size are hashed whole
SAMPLE_BLOCKS, BLOCK_BYTES = 64, 64 * 2**10


def update_with_file(h, path: Path, name: str) -> None:
    """Add `name`, the file's size and its content (whole, or header and sampled blocks: see above) to hash h."""
    size = path.stat().st_size
    h.update(f"{name}:{size}\n".encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return
        header_len = int.from_bytes(fh.read(8), "little")
        h.update(fh.read(min(header_len, size - 8)))
        for k in range(SAMPLE_BLOCKS):
            fh.seek(k * (size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
            h.update(fh.read(BLOCK_BYTES))


def model_fingerprint(model_dir) -> str | None:
    """A content hash of a local model folder: config.json plus every *.safetensors file; None for a hub id."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        if f.is_file():
            update_with_file(h, f, f.name)
    return "sha256:" + h.hexdigest()
