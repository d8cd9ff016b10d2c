"""The DPO reference's log-probs, scored once instead of in every training step: pi_init's for
robust.train_reference = "sft" (a stage of its own, before training, one model in memory at a time as the judge
does), or the adapter-off model's when nothing else needs its logits (train_dpo's reference_pass). Each entry holds
the token counts it was scored on, which the trainer checks against what it sees."""

from __future__ import annotations

from pathlib import Path

import torch

from selfie_lite import distributed
from selfie_lite.chat import end_of_turn_ids, template_ids, through_end_of_turn
from selfie_lite.config import RunConfig, TrainConfig
from selfie_lite.loss import last_hidden, sequence_logps
from selfie_lite.robust import training_pairs
from selfie_lite.stage import Round
from selfie_lite.trainer import SPADPOTrainer, to_conversation


def training_sequences(tokenizer, pairs: list[dict], train: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """[(prompt_ids, chosen_ids)] * N + [(prompt_ids, rejected_ids)] * N: the tokens the trainer scores, for
    reference log-probs computed outside it (robust.train_reference = "sft").

    Mirrors what train_dpo feeds the model: TRL's conversational tokenisation (the completion starts where the
    tokenised prompt and prompt + completion diverge, and ends at its end of turn), the prompt cut to its last
    max_prompt_length tokens (SPADPOTrainer._prepare_dataset), then prompt + completion cut to max_length (the
    collator's keep_start).
    tests/test_robust.py checks it against the trainer's own batches; the trainer also checks every pair's
    token counts against it at run time.
    """

    def ids(messages, **kw) -> list[int]:
        return template_ids(tokenizer, messages, **kw)

    def prefix(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    chosen, rejected = [], []
    stops = end_of_turn_ids(tokenizer)
    for p in pairs:
        conv = to_conversation(p)
        prompt = ids(conv["prompt"], add_generation_prompt=True)
        with_c, with_r = ids(conv["prompt"] + conv["chosen"]), ids(conv["prompt"] + conv["rejected"])
        cut = min(prefix(prompt, with_c), prefix(prompt, with_r))
        head = prompt[:cut][-train.max_prompt_length:] if train.max_prompt_length else prompt[:cut]
        room = max(0, train.max_length - len(head))
        chosen.append((head, through_end_of_turn(with_c[cut:], stops)[:room]))
        rejected.append((head, through_end_of_turn(with_r[cut:], stops)[:room]))
    return chosen + rejected


def reference_table(pairs: list[dict], logps: list[float], sequences) -> dict[int, dict]:
    """pair_id -> {"chosen", "rejected", "chosen_tokens", "rejected_tokens"} from log-probs scored on
    training_sequences(pairs) (chosen rows first, then rejected rows), as train_dpo's ref_logps wants it."""
    n = len(pairs)
    return {int(p["pair_id"]): {"chosen": logps[i], "rejected": logps[n + i],
                                "chosen_tokens": len(sequences[i][1]), "rejected_tokens": len(sequences[n + i][1])}
            for i, p in enumerate(pairs)}


REFERENCE_TABLE = "train_reference_logps.json"  # in round-<i>/: pi_init's log-probs of every training pair


def reference_stage(r: Round) -> dict:
    """robust.train_reference = "sft", rounds >= 1, before training: pi_init's log-probs of the training set
    (robust.training_pairs), the fixed DPO reference of docs/method.md, "Counter-measures against drift"."""
    return reference_logps(r.cfg, r.dir, r.backend, r.init_dir, training_pairs(r), r.progress)


def reference_logps(cfg: RunConfig, round_dir: Path, backend, init_dir: Path, pairs: list[dict],
                    progress=None) -> dict:
    """robust.train_reference = "sft": score every training pair (chosen and rejected) with pi_init, loaded alone
    and freed afterwards, on exactly the tokens the trainer will score (train.training_sequences).

    Reads: the training pairs (self-labelled + replayed). Writes: round-<i>/train_reference_logps.json (atomic),
    {pair_id: {"chosen", "rejected", "chosen_tokens", "rejected_tokens"}}; the loop then marks the stage done, so a
    resumed round reuses the file."""
    import time

    from selfie_lite.judge import score_with
    from selfie_lite.rundir import atomic_write_json

    t0 = time.perf_counter()
    sequences = training_sequences(backend.load_tokenizer(init_dir), pairs, cfg.train)
    logps, seconds = score_with(backend, init_dir, sequences, cfg.judge.batch_size, progress, "reference (pi_init)")
    table = reference_table(pairs, logps, sequences)
    if distributed.is_main():
        atomic_write_json(round_dir / REFERENCE_TABLE, {str(k): v for k, v in table.items()})
    return {"pairs": len(pairs), "sequences": len(sequences), "model": str(init_dir),
            "seconds": round(time.perf_counter() - t0, 3), "scoring_seconds": round(seconds, 3)}


def read_reference_table(round_dir: Path) -> dict[int, dict]:
    from selfie_lite.rundir import read_json

    return {int(k): v for k, v in read_json(round_dir / REFERENCE_TABLE).items()}


def reference_pass(trainer: SPADPOTrainer, batch_size: int) -> dict[int, dict]:
    """The DPO reference's log-probs of every training pair, scored once before training, as a table for
    SPADPOTrainer.ref_logps (pair_id -> {"chosen", "rejected", "chosen_tokens", "rejected_tokens"}).

    The reference is the model with its adapter off: fixed for the whole round, so scoring it inside every step
    repeats the same forward pass once per epoch (3 times in the seed round). When nothing else needs the
    reference's logits (no noise detection: lam == 0) one pass before training does, as TRL's
    precompute_ref_log_probs does; ours because TRL's pass runs its own forward (full logits, its "ref" adapter
    copy) while this one is the adapter-disabled model through loss.sequence_logps. Batches are the trainer's
    own tokenisation and collator, batch_size pairs at a time (a micro-batch: no more memory than a step).
    """
    model = trainer.model
    peft_model = trainer.accelerator.unwrap_model(model)
    dataset = trainer.train_dataset
    table: dict[int, dict] = {}
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        batch = trainer.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        input_ids = batch["input_ids"].to(device)
        mask = batch["completion_mask"][:, 1:].bool().to(device)  # [2B,T-1], as compute_loss shifts them
        # the trainer's autocast context, as around compute_loss: the same precision as a step would score in
        with trainer.compute_loss_context_manager(), torch.no_grad(), peft_model.disable_adapter():
            logps = sequence_logps(last_hidden(model, input_ids, batch["attention_mask"].to(device)),
                                   input_ids[:, 1:], mask).tolist()  # [2B]: chosen rows, then rejected rows
        tokens = mask.sum(-1).tolist()
        n = len(batch["pair_id"])
        for j, pair_id in enumerate(batch["pair_id"].tolist()):
            table[int(pair_id)] = {"chosen": logps[j], "rejected": logps[n + j],
                                   "chosen_tokens": tokens[j], "rejected_tokens": tokens[n + j]}
    return table
