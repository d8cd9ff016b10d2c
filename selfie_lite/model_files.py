"""A model folder checked before any weight loads: it exists and holds safetensors weights (never a pickle), their
headers are sound and their values finite, the LoRA targets exist, and the chat template works. The checks read
headers and a few sampled bytes, so a 7B model is checked in seconds; torch and transformers are not imported."""

from __future__ import annotations

import json
from pathlib import Path

from selfie_lite import hub
from selfie_lite.config import LoraConfig
from selfie_lite.errors import UserError, describe, first_line


def check_model_source(model_dir: str | Path) -> None:
    """Fail before loading anything: a missing folder, a hub id while offline, pickled weights only, a config.json
    that is not JSON, a safetensors file that is truncated or not one (headers and lengths only: cheap on a 7B
    model, and run before every load)."""
    from selfie_lite import gguf

    if gguf.is_gguf_model(model_dir):  # a .gguf file, a folder holding one, builtin:NAME: converted on resolve
        return gguf.check_gguf_model(model_dir)  # (gguf.resolve_model); the file and the gguf package, here
    path = Path(model_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model folder {model_dir} is a file, expected a model folder (config.json, "
                            "*.safetensors, tokenizer files)")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)")
        try:
            config = json.loads((path / "config.json").read_bytes())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path / 'config.json'} is not valid JSON ({first_line(e)})",
                            hint="download or copy the model again") from None
        if not isinstance(config, dict):
            raise UserError(f"{path / 'config.json'} is not a model config (a JSON object)")
        has_st = any(path.glob("*.safetensors"))
        if not has_st:
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise UserError(
                    f"{path} holds only pickled weights (.bin/.pt); selfie-lite loads safetensors only",
                    hint="convert it once: AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True)",
                )
            raise UserError(f"{path} has no *.safetensors weights")
        safetensors_headers(path)
        return
    if not hub.looks_like_hub_id(str(model_dir)):
        raise UserError(f"model folder {model_dir} does not exist")
    if hub.offline():
        raise UserError(
            f"{model_dir!r} is a hub model but the hub is offline (HF_HUB_OFFLINE=1)",
            hint="download it once with network access (huggingface-cli download), or pass a local folder",
        )


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses headers over 100 MB too


def safetensors_headers(folder: Path) -> dict[Path, dict]:
    """Each *.safetensors file's header ({tensor: {dtype, shape, data_offsets}}), read without the weights, after
    checking that the file is whole: an 8-byte length, a JSON header of that length, and data that reaches the last
    tensor's end offset. A shard index (model.safetensors.index.json) must name only shards that are there.
    Written here rather than with safetensors.safe_open, which maps the file and says only "invalid header" or
    fails later, on a read past the end, for a truncated copy."""
    fix = "download or copy the model again (the copy is incomplete or damaged)"
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{f} is truncated or not a safetensors file ({size:,} bytes)", hint=fix)
            try:
                header = json.loads(fh.read(n))
                tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
                for v in tensors.values():
                    str(v["dtype"]), list(v["shape"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
                raise UserError(f"{f} is damaged: its safetensors header is not valid", hint=fix) from None
        if 8 + n + end > size:
            raise UserError(f"{f} is truncated: {size:,} bytes, but its tensors need {8 + n + end:,}", hint=fix)
        out[f] = tensors
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a valid shard index", hint=fix) from None
        missing = sorted(s for s in shards if not (Path(folder) / s).is_file())
        if missing:
            raise UserError(f"{Path(folder)} is missing the weight shard {missing[0]} that {index.name} names"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), hint=fix)
    return out


# Non-finite values in the float dtypes safetensors stores (F8 types are rare in SFT models and are skipped).
FULL_CHECK_BYTES = 64 * 2**20  # weight files up to this size are checked whole (the tiny preset, test models)
SAMPLE_BYTES = 64 * 2**10  # else the first and last 64 KiB of every tensor: ~40 MB read for a 7B model


def nonfinite_weights(folder: Path, headers: dict[Path, dict] | None = None) -> tuple[Path, str] | None:
    """(file, tensor) of the first tensor found holding NaN or inf, else None; without loading the model.

    A diverged fine-tune or a bad conversion leaves whole tensors NaN, which the start of a tensor shows; reading a
    7B model whole (15 GB) to find a lone NaN would cost a minute before every run, so over FULL_CHECK_BYTES each
    tensor's first and last SAMPLE_BYTES are read (a sample: a few scattered NaN can pass, and then the loss check
    in training stops the run)."""
    import numpy as np

    kinds = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    for f, tensors in (headers if headers is not None else safetensors_headers(folder)).items():
        whole = f.stat().st_size <= FULL_CHECK_BYTES
        with open(f, "rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
            for name, t in tensors.items():
                kind = kinds.get(t["dtype"])
                if kind is None:
                    continue
                a, b = (data_start + int(x) for x in t["data_offsets"])
                size = np.dtype(kind).itemsize
                spans = [(a, b)] if whole or b - a <= 2 * SAMPLE_BYTES else [(a, a + SAMPLE_BYTES), (b - SAMPLE_BYTES, b)]
                for lo, hi in spans:
                    fh.seek(lo)
                    x = np.frombuffer(fh.read((hi - lo) // size * size), dtype=kind)
                    # bfloat16 has no numpy type: all-ones exponent bits (0x7F80) mean inf or NaN.
                    bad = ((x & 0x7F80) == 0x7F80).any() if t["dtype"] == "BF16" else not np.isfinite(x).all()
                    if bad:
                        return f, name
    return None


def check_model_files(model_dir: Path, lora: LoraConfig, trust_remote_code: bool = False) -> None:
    """The preflight's checks of a local model folder beyond check_model_source, still without loading a weight:
    tokenizer files present and readable, LoRA targets that exist (from the tensor names in the safetensors
    headers), no NaN or inf in the weights (nonfinite_weights)."""
    folder = Path(model_dir)
    vocab = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*tiktoken*")
    if not trust_remote_code and not any(any(folder.glob(pattern)) for pattern in vocab):
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)",
                        hint="copy the tokenizer files of the model it was fine-tuned from into the folder")
    if (folder / "tokenizer.json").is_file():
        try:
            json.loads((folder / "tokenizer.json").read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{folder / 'tokenizer.json'} is not valid JSON ({first_line(e)})",
                            hint="download or copy the tokenizer again") from None
    headers = safetensors_headers(folder)
    leaves = {name.rsplit(".", 2)[-2] for tensors in headers.values() for name in tensors if "." in name}
    check_lora_targets(lora, leaves, f"the model in {folder}")
    bad = nonfinite_weights(folder, headers)  # the headers read above: each file's header is read once here
    if bad is not None:
        raise UserError(f"{bad[0]}: tensor {bad[1]} holds NaN or infinite values",
                        hint="the weights are broken (a diverged fine-tune or a bad conversion): use another checkpoint")


def check_lora_targets(lora: LoraConfig, present: set[str], where: str = "this model") -> list[str]:
    """The configured LoRA targets present among the model's module names (`present`: the last part of each
    module's name, as PEFT matches them). None present is an error; with targets of the user's own choosing (not the
    default list, which covers several families of models), each one must exist, or it would be dropped silently."""
    targets = [t for t in lora.target_modules if t in present]
    linear = sorted(p for p in present if "proj" in p or p in ("fc1", "fc2", "c_attn", "c_proj", "c_fc", "dense"))
    hint = f"set lora.target_modules to some of: {', '.join(linear[:12])}" if linear else None
    if not targets:
        raise UserError(f"none of the LoRA targets {lora.target_modules} exist in {where}", hint=hint)
    missing = [t for t in lora.target_modules if t not in present]
    if missing and lora.target_modules != LoraConfig().target_modules:
        raise UserError(f"lora.target_modules names {', '.join(missing)}, which {where} does not have", hint=hint)
    return targets


def check_chat_template(tok, where: str) -> None:
    """Lay out a one-turn conversation as sampling and training will (chat.py): a template with a Jinja syntax
    error, or one that raises on a plain user/assistant exchange, is found before the run starts."""
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids

    try:
        chat_prompt_ids(tok, "Hello?")
        chat_response_ids(tok, "Hello?", "Hi.")
    except Exception as e:  # jinja2's TemplateSyntaxError / TemplateError, or what the template raises itself
        line = getattr(e, "lineno", None)
        raise UserError(f"the chat template {where} does not work: {describe(e)}"
                        + (f" (template line {line})" if line else ""),
                        hint="fix the template, or pass a working one with --chat-template FILE") from None


def read_chat_template(path: str) -> str:
    """A chat_template file's text: a Jinja template, UTF-8 (as Jinja reads it)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", hint="save the template as UTF-8", key="chat_template") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})", key="chat_template") from None
