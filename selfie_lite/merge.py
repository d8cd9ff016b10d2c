"""Stage 4 of a round: merge the round's LoRA adapter into full-precision weights (docs/method.md, "The loop").

Reads: the previous model folder (the base) and round-<i>/adapter/. Writes: round-<i>/model/, a standard HF folder
(safetensors + tokenizer) that is the next round's starting point and, with the adapter disabled, exactly its DPO
reference. Merging into 4-bit weights would re-quantize (lossy), so the base is always loaded in full precision;
a 4-bit run re-quantizes on the next load.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfie_lite.disk import check_free_space, folder_bytes, merged_model_bytes
from selfie_lite.distributed import on_main
from selfie_lite.interrupt import safe_point
from selfie_lite.rundir import fresh_tmp_dir, replace_dir
from selfie_lite.stage import Round


def merge_stage(r: Round) -> dict:
    """Stage 4 of round i: round-<i>/adapter merged into pi_{i-1}'s weights, saved as round-<i>/model (pi_i)."""
    # Several processes (distributed.py): the main process merges and writes the model, the others wait for it.
    return on_main(lambda: merge_round(r.backend, r.prev_dir, r.dir / "adapter", r.dir / "model"))


def merge_round(backend, base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    # Every parameter at the merge's precision (fp32 on a CPU, 16 bit on a GPU), from the base's safetensors
    # headers (a hub id: its cached snapshot); unknown: not checked.
    need = merged_model_bytes(base_dir, backend.device)
    check_free_space(out_dir.parent, need, f"merge the adapter into {out_dir}", "the merged model")
    t0 = time.perf_counter()
    tmp = fresh_tmp_dir(out_dir)
    backend.merge(base_dir, adapter_dir, tmp)
    safe_point("merge", 1)  # a kill here leaves only the temp folder, which the next attempt discards
    replace_dir(tmp, out_dir)
    return {"seconds": round(time.perf_counter() - t0, 3), "model_bytes": folder_bytes(out_dir)}
