"""Stage 3 of a round (the only stage of round 0): LoRA DPO on the round's training set (train_stage), built on
train_dpo, which sets up TRL's trainer (trainer.py) and runs it.

Reads: a PeftModel (trainable LoRA adapter on the weights of pi_{i-1}), its tokenizer, and preference pairs
{"pair_id", "prompt", "chosen", "rejected"} (round 0: the human seed pairs; round i: this round's self-labelled
pairs, plus replayed human pairs with robust.gold_replay). The DPO reference is the same PeftModel with its adapter
disabled (no second copy in memory: the adapter is fresh on merged pi_{i-1}), or with robust.train_reference = "sft"
pi_init's log-probs, scored before training in a stage of their own (reference_stage). Who is smoothed is the
round's smoother (smoothing.py). Writes round-<i>/adapter/ and round-<i>/pairs.jsonl.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers import PrinterCallback
from trl import DPOConfig

from selfie_lite import compat, distributed
from selfie_lite.config import TrainConfig
from selfie_lite.errors import RunError, UserError
from selfie_lite.numerics import pick_device, pick_dtype
from selfie_lite.reference import read_reference_table, reference_pass
from selfie_lite.robust import round_learning_rate, round_max_steps, training_pairs
from selfie_lite.smoothing import Smoother, smoother_for
from selfie_lite.stage import Round
from selfie_lite.trainer import PairCollator, SPADPOTrainer, StepLog, to_conversation


@dataclass
class TrainResult:
    # steps, pairs, pairs_dropped, seconds, pairs_per_s, loss_start, loss_end, mean_margin,
    # mean_extrapolated_margin, reward_accuracy, frac_smoothed (pairs smoothed / pairs seen after warm-up)
    metrics: dict
    # pair_id -> {"margin", "extrapolated_margin", "low_confidence", "smoothed", "smoothing",
    #             "chosen_reward", "rejected_reward", "loss", "step"}: the last time the pair was seen
    pair_stats: dict[int, dict] = field(default_factory=dict)
    # The trained adapter's weights (name -> tensor) gathered by an engine that shards them (adapter_weights): what
    # the main process saves. Empty where the model's own weights are whole, and on the other processes.
    adapter: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The public entry point


@contextlib.contextmanager
def _no_dataset_progress_bars():
    # TRL tokenises with datasets.map, which draws a tqdm bar per pass; the CLI has its own progress display.
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _precision(precision: str) -> dict:
    device = pick_device()
    if precision == "fp16" and device != "cuda":
        raise UserError("train.precision = fp16 needs a CUDA GPU", hint="use fp32 (or auto) on a CPU")
    dtype = pick_dtype(precision, device)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def _checkpointing(on: bool) -> dict:
    # Non-reentrant: the reference forward runs under no_grad, where reentrant checkpointing warns and PEFT needs
    # input grads.
    name = compat.checkpointing_arg(DPOConfig)
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def train_dpo(
    model,
    tokenizer,
    pairs: list[dict],
    *,
    beta: float,
    train: TrainConfig,
    smoother: Smoother | None = None,
    epochs: int,
    out_dir: Path,
    seed: int,
    on_step: Callable[[int, int, dict], None] | None = None,
    ref_logps: dict[int, dict] | None = None,
    precompute_reference: bool = True,
    report_to: str | list[str] = "none",
    max_steps: int = -1,
) -> TrainResult:
    """Train the LoRA adapter of `model` (a peft.PeftModel) with DPO on `pairs`, in place.

    smoother: who is smoothed and by how much (smoothing.smoother_for: the paper's low-confidence picker, CREAM's
    given weights); None: plain sigmoid DPO (round 0).
    ref_logps (robust.train_reference = "sft"): pair_id -> precomputed reference log-probs (see
    reference_table), used in the DPO margin instead of the adapter-off model; None = the paper's reference.
    precompute_reference: with the paper's reference (ref_logps None) and no noise detection (smoother.lam == 0), score every pair with the adapter-off model once, before the first step (reference_pass), instead
    of in every step of every epoch; False keeps the per-step reference forward (tests compare the two).
    max_steps > 0 (robust.max_steps): stop after that many optimizer steps, the schedule running over them; -1: the
    epochs decide.
    out_dir is the Trainer's scratch folder: nothing is saved there (save_strategy="no").
    report_to: transformers' experiment trackers for the step logs (`--report-to`: "tensorboard", "wandb").
    Deterministic on CPU for a given seed, model and pairs. Raises RunError if the loss becomes NaN or inf.
    """
    if not pairs:
        raise UserError("no preference pairs to train on")
    ids = [int(p["pair_id"]) for p in pairs]
    if len(set(ids)) != len(ids):
        raise UserError("pair_id values must be unique within a training set")
    if not hasattr(model, "disable_adapter"):
        raise UserError("train_dpo needs a peft.PeftModel with a LoRA adapter (its reference is the adapter off)")

    if max_steps > 0:  # a cap, never more: past the epochs' own step count the trainer would loop over the pairs
        epoch_steps = math.ceil(math.ceil(len(pairs) / train.batch_size) / train.grad_accum)
        max_steps = max_steps if max_steps < epoch_steps * epochs else -1
    cuda = torch.cuda.is_available()
    processes = distributed.world_size()
    batch_size, grad_accum = per_process_batch(train.batch_size, train.grad_accum, processes)
    args = DPOConfig(
        output_dir=str(out_dir),
        # Optimisation
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a share of the steps
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=epochs,
        max_steps=max_steps,  # robust.max_steps (robust.round_max_steps); -1: the epochs decide
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        **_precision(train.precision),
        **_checkpointing(train.gradient_checkpointing),
        # DPO
        beta=beta,
        loss_type="sigmoid",  # not used by our compute_loss; stated so the config reads true
        max_length=train.max_length,
        precompute_ref_log_probs=False,
        disable_dropout=True,  # the reference is the same model: dropout would make pi_theta != pi_ref at step 0
        # Determinism and devices
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        # Quiet: our callback does the logging, the loop does the saving
        report_to=report_to,
        disable_tqdm=True,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sequences longer than max_length lose the end of their response (TRL's "keep_start" truncation).
    collator = PairCollator(pad_token_id=pad_id, max_length=train.max_length)
    step_log = StepLog(on_step)
    with _no_dataset_progress_bars():
        trainer = SPADPOTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=Dataset.from_list([to_conversation(p) for p in pairs]),
            processing_class=tokenizer,
            callbacks=[step_log],
            beta=beta,
            smoother=smoother,
            max_prompt_length=train.max_prompt_length,
            ref_logps=ref_logps,
        )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the progress bar for print(logs)

    start = time.perf_counter()
    smoother = trainer.smoother
    if batch_size != train.batch_size and hasattr(smoother, "picker"):
        smoother.picker.split_batches = True  # the paper's picker sees each process's part of one process's batch
    detect = smoother.lam > 0  # noise detection feeds the low-confidence pick only
    reference_seconds = None
    if ref_logps is None and not detect and precompute_reference:
        trainer.ref_logps = reference_pass(trainer, train.batch_size)
        reference_seconds = time.perf_counter() - start
    trainer.train()
    seconds = time.perf_counter() - start
    adapter = adapter_weights(trainer)

    stats = trainer.pair_stats
    seen, smoothed = trainer.seen_after_warmup, trainer.smoothed_after_warmup
    if distributed.active():  # each process saw its share of the pairs: all of them, on every process
        stats = {}
        for pair_id, s in distributed.gather(sorted(trainer.pair_stats.items())):
            stats.setdefault(pair_id, s)  # a pair twice: accelerate evened out the last batches with repeats
        counts = distributed.gather([(seen, smoothed)])
        seen, smoothed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    n_pairs = len(trainer.train_dataset)
    history = step_log.history

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else math.nan

    metrics = {
        "steps": trainer.state.global_step,
        "pairs": n_pairs,
        "pairs_dropped": len(pairs) - n_pairs,  # 0: long prompts are cut to max_prompt_length, not dropped
        "epochs": epochs,
        "seconds": seconds,
        "pairs_per_s": n_pairs * epochs / seconds if seconds > 0 else math.nan,
        "loss_start": history[0]["loss"] if history else math.nan,
        "loss_end": history[-1]["loss"] if history else math.nan,
        "loss_curve": [round(h["loss"], 5) for h in history],  # every optimizer step's loss, for `report`'s plot
        "margin_start": history[0].get("rewards/margins", math.nan) if history else math.nan,
        # Over every pair, as last seen (the final epoch):
        "mean_margin": mean(s["margin"] for s in stats.values()),
        "mean_extrapolated_margin": mean(s["extrapolated_margin"] for s in stats.values()),
        "reward_accuracy": mean(float(s["margin"] > 0) for s in stats.values()),
        "frac_smoothed": smoothed / seen if seen else 0.0,
        "lam": smoother.lam,
        "alpha": getattr(smoother, "alpha", 0.0),
        "smoothing_source": smoother.name,
        "learning_rate": train.learning_rate,  # the round's peak rate (robust.lr_decay scales it per round)
        "gold_pairs": sum(1 for p in pairs if p.get("gold")),  # replayed human pairs (robust.gold_replay), never smoothed
        "train_reference": "given" if ref_logps is not None else "adapter-off",
        # the adapter-off reference scored once before training (reference_pass): seconds, included in "seconds"
        "reference_pass_seconds": reference_seconds,
        # Several processes: how many, the accumulation each did, and the engine accelerate trained with (DDP is
        # "MULTI_GPU" or "MULTI_CPU"; an accelerate config asking for FSDP or DeepSpeed on a machine without GPUs
        # gets MULTI_CPU: accelerate runs those engines on GPUs only).
        **({"processes": processes, "batch_size_per_process": batch_size, "grad_accum_per_process": grad_accum,
            "engine": str(trainer.accelerator.distributed_type.value)} if processes > 1 else {}),
    }
    return TrainResult(metrics=metrics, pair_stats=dict(stats), adapter=adapter)


def per_process_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """(pairs per micro-step, micro-steps per optimizer step) for each of `processes` processes (TRL's Trainer on the
    launcher's accelerate state), so that every optimizer step sees what one process's would: the accumulation
    divided by the process count where it divides, else the micro-batch. accelerate deals the same shuffled
    micro-batches out, batch j to process j % W, so the W processes' micro-batches of a step are, together, one
    process's (docs/scaling.md). Where neither divides, each process keeps both: the optimizer's batch grows W-fold."""
    if grad_accum % processes == 0:
        return batch_size, grad_accum // processes
    if batch_size % processes == 0:
        return batch_size // processes, grad_accum
    return batch_size, grad_accum


# Module-name parts that FSDP and activation checkpointing put into parameter names; a full state dict has none.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def adapter_weights(trainer) -> dict:
    """The trained adapter (the trainable parameters: LoRA's), whole, on the main process, where the engine shards the
    weights (DeepSpeed ZeRO-3, FSDP): the main process's own copy is then a shard, and saving it would save a
    fragment. {} where the model's own weights are whole (one process, DDP, ZeRO-1/2: save_adapter saves them) and
    on the processes other than the main one."""
    full = gathered_state(trainer)
    if full is None:
        return {}
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    for part in _WRAPPER_PARTS:
        names = [n.replace(part, "") for n in names]
    weights = {n: full[n] for n in names if n in full}
    if distributed.is_main() and len(weights) != len(names):  # never save a partial adapter as if it were whole
        raise RunError(f"the training engine gave back {len(weights)} of the adapter's {len(names)} weights")
    return weights


def gathered_state(trainer) -> dict | None:
    """The model's state dict with every weight whole, gathered on the main process by the engine that shards them
    ({} on the others where the engine gives them none), a collective every process calls; None where the engine
    does not shard the weights. Under FSDP accelerate's get_state_dict gathers; under ZeRO-3 it would gather the
    frozen base model too (a 16-bit copy of all of it in the main process's memory, every round) and refuses unless
    the config asks for 16-bit saving, so DeepSpeed's own consolidation (the call accelerate makes) is asked for the
    trainable weights alone."""
    from accelerate.utils import DistributedType

    acc, engine = trainer.accelerator, trainer.model_wrapped
    if acc.distributed_type == DistributedType.DEEPSPEED and \
            acc.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True) or {}
    if acc.distributed_type == DistributedType.FSDP:
        return acc.get_state_dict(engine) or {}
    return None


# ---------------------------------------------------------------------------------------------
# The stage


def train_stage(r: Round) -> dict:
    """Stage 3 of round i (the only stage of round 0): a fresh LoRA adapter on pi_{i-1}, trained with DPO (E4, E5) on
    the round's training set (robust.training_pairs: the seed pairs in round 0, else the self-labelled pairs plus the
    counter-measures'), at the round's learning rate (robust.lr_decay). Reference: the adapter-disabled model, or
    with robust.train_reference = "sft" in rounds >= 1 pi_init's log-probs from round-<i>/train_reference_logps.json.
    Writes round-<i>/adapter/ and round-<i>/pairs.jsonl (each training pair with its final-epoch statistics)."""
    import dataclasses

    from selfie_lite.disk import adapter_bytes, check_free_space, format_bytes, merged_model_bytes
    from selfie_lite.interrupt import safe_point
    from selfie_lite.rundir import atomic_write_jsonl, fresh_tmp_dir, replace_dir

    cfg, backend, progress, i = r.cfg, r.backend, r.progress, r.index
    pairs = training_pairs(r)
    model, tok = backend.load(r.prev_dir, trainable=True)
    model = backend.add_lora(model, cfg.lora, seed=cfg.random_seed + i)
    # Room for what this round writes after training (its adapter, then the merged model), checked before the
    # training that a full disk would otherwise throw away.
    adapter, merged = adapter_bytes(model), merged_model_bytes(r.prev_dir, backend.device)
    check_free_space(r.dir, adapter + (merged or 0), f"train round {i} and merge it",
                     f"adapter {format_bytes(adapter)} + merged model {format_bytes(merged or 0)}")
    seed_round = i == 0
    task = progress.start("train (seed DPO)" if seed_round else "train (SPA DPO)", total=1, unit="steps")

    def on_step(step, total, logs):
        progress.set_total(task, total)
        progress.advance(task, 1)
        safe_point("train", step)

    lr = round_learning_rate(cfg.train.learning_rate, cfg.robust.lr_decay, i)
    train = cfg.train if lr == cfg.train.learning_rate else dataclasses.replace(cfg.train, learning_rate=lr)
    sft_ref = not seed_round and cfg.robust.train_reference == "sft"
    smoother = smoother_for(cfg, i, pairs)
    # The Trainer's scratch folder (nothing is saved there); another process's is outside the run folder.
    out_dir = r.dir / "trainer" if distributed.is_main() else Path(tempfile.mkdtemp(prefix="selfie-lite-trainer-"))
    result = train_dpo(
        model, tok, pairs, beta=cfg.beta, train=train, smoother=smoother, max_steps=round_max_steps(cfg.robust.max_steps, i),
        epochs=cfg.train.seed_epochs if seed_round else cfg.train.round_epochs,
        out_dir=out_dir, seed=cfg.random_seed + i, on_step=on_step,
        ref_logps=read_reference_table(r.dir) if sft_ref else None,
        report_to=getattr(getattr(progress, "tracker", None), "report_to", "none"),
    )
    if distributed.is_main():  # the others trained the same adapter (DDP) and wait for it at the loop's barrier
        tmp = fresh_tmp_dir(r.dir / "adapter")  # the adapter first: the training is lost until it is on disk
        backend.save_adapter(model, tmp, weights=result.adapter)
        replace_dir(tmp, r.dir / "adapter")
    progress.finish(task)
    with contextlib.suppress(OSError):
        out_dir.rmdir()  # the Trainer's output_dir: empty, since nothing is saved through it
    backend.free(model)
    rows = [dict(p, **result.pair_stats.get(p["pair_id"], {})) for p in pairs]
    if distributed.is_main():
        atomic_write_jsonl(r.dir / "pairs.jsonl", rows)
    return result.metrics
