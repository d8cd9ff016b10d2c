"""The trainer of one round: a thin TRL DPOTrainer subclass whose loss is loss.py's per-pair smoothed DPO (E4, E5),
with the smoothing decided by the round's smoother (smoothing.py) and the margin it ranks by from refine.py (E7).

What TRL still does for us: chat-template tokenisation of the conversational pairs (and the prompt/response
boundary), padding and the [chosen rows; rejected rows] batch layout, the optimizer, scheduler, gradient
accumulation, mixed precision and the step loop. What we add: the loss (TRL's has no per-pair smoothing and no
extrapolated margin), a pair_id per row, prompts cut rather than dropped, and a precomputed reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from selfie_lite import compat
from selfie_lite.chat import end_of_turn_ids, through_end_of_turn
from selfie_lite.errors import RunError
from selfie_lite.loss import dpo_losses, dpo_margin, last_hidden, sequence_logps
from selfie_lite.refine import extrapolated_margin
from selfie_lite.smoothing import NoSmoothing, Smoother

# ---------------------------------------------------------------------------------------------
# Batches that remember which pair each row is


def to_conversation(pair: dict) -> dict:
    """A pair in TRL's conversational preference format (what the trainer's dataset holds)."""
    # TRL's conversational preference format: the prompt turn(s), then one assistant turn per response.
    return {
        "pair_id": int(pair["pair_id"]),
        "prompt": [{"role": "user", "content": pair["prompt"]}],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator plus a `pair_id` [B] tensor, so the loss knows which pair each row is."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        batch["pair_id"] = torch.tensor([ex["pair_id"] for ex in examples], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------
# The trainer


class SPADPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is docs/method.md's per-pair smoothed DPO (E5) with decoupled noise detection."""

    def __init__(self, *args, beta: float, smoother: Smoother | None = None, max_prompt_length: int | None = None,
                 ref_logps: dict[int, dict] | None = None, **kwargs):
        # Who is smoothed and by how much (smoothing.py), chosen once for the round: the paper's picker, CREAM's
        # given weights or none.
        self.smoother = smoother if smoother is not None else NoSmoothing()
        self.max_prompt_length = max_prompt_length
        # robust.train_reference = "sft": pair_id -> {"chosen", "rejected" (log pi_init sums), "chosen_tokens",
        # "rejected_tokens"}, used in the DPO margin instead of the adapter-off forward. None: the paper's reference.
        self.ref_logps = ref_logps
        self.pair_stats: dict[int, dict] = {}
        self.seen_after_warmup = 0
        self.smoothed_after_warmup = 0
        super().__init__(*args, **kwargs)
        # beta of (E2, E4) is ours, handed in: never read back from TRL's config (DPOTrainer sets self.beta from
        # args.beta; train_dpo passes the same value to both, the loss uses this one).
        self.beta = beta
        # Our reference is the adapter-disabled model (docs/method.md, "The loop": the adapter is fresh on merged
        # weights), so TRL's copy of the adapter as a reference goes: it would cost memory and end up in saved adapters.
        compat.drop_trl_ref_adapter(self.accelerator.unwrap_model(self.model))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL DROPS pairs whose prompt alone fills max_length. We cut every prompt to its last max_prompt_length
        # tokens instead (the end keeps the turn markers next to the response), so TRL's filter is skipped while it
        # tokenises. Without max_prompt_length, TRL's rule stands.
        # Each response ends at its end of turn, as a sample does (chat.through_end_of_turn): TRL keeps what the
        # template writes after it (ChatML's newline after <|im_end|>).
        stops = end_of_turn_ids(processing_class)
        cut = {"chosen_ids": lambda ex: through_end_of_turn(ex["chosen_ids"], stops),
               "rejected_ids": lambda ex: through_end_of_turn(ex["rejected_ids"], stops)}
        if not self.max_prompt_length:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        else:
            with compat.no_trl_prompt_filter(args):
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            keep = self.max_prompt_length
            cut["prompt_ids"] = lambda ex: ex["prompt_ids"][-keep:]
        return dataset.map(lambda ex: {name: f(ex) for name, f in cut.items()})

    def _set_signature_columns_if_needed(self):
        # Trainer drops dataset columns that are not "signature" columns; keep pair_id for the collator.
        super()._set_signature_columns_if_needed()
        if "pair_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "pair_id"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # inputs: input_ids, attention_mask, completion_mask [2B,T] (rows 0..B-1 = prompt+chosen,
        # rows B..2B-1 = prompt+rejected, right-padded), pair_id [B].
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # Causal LM shift: position t predicts input_ids[:, t+1]; only response tokens count.
        labels = input_ids[:, 1:]  # [2B,T-1]
        mask = inputs["completion_mask"][:, 1:].bool()  # [2B,T-1]
        peft_model = self.accelerator.unwrap_model(model)

        # Policy: adapter on, with gradient. last_hidden gives the last hidden states [2B,T-1,H] and the output
        # layer, not logits: sequence_logps computes the response positions' logits a chunk at a time, so no
        # [2B,T,V] tensor exists (docs/performance.md, "Memory of the loss and the judge").
        policy = last_hidden(model, input_ids, attention_mask)
        policy_logps = sequence_logps(policy, labels, mask)  # [2B] sums over response tokens
        # Noise detection (E6, E7) only feeds the paper's low-confidence pick (smoother.lam > 0).
        detect = self.smoother.lam > 0
        ref = None
        if self.ref_logps is None or detect:
            # The same weights with the adapter off (pi_{i-1}), no gradient: the paper's DPO reference, and h_ref
            # of the extrapolation even when the margin's reference is pi_init (train_reference = "sft").
            with torch.no_grad(), peft_model.disable_adapter():
                ref = last_hidden(model, input_ids, attention_mask)
        if self.ref_logps is None:
            ref_logps = sequence_logps(ref, labels, mask)  # [2B]
        else:  # [2B] precomputed: pi_init's (train_reference = "sft") or this round's reference pass (train_dpo)
            ref_logps = self._given_ref_logps(inputs["pair_id"], mask, policy_logps)
        policy_chosen, policy_rejected = policy_logps.chunk(2)  # [B] each
        ref_chosen, ref_rejected = ref_logps.chunk(2)

        # The margin the smoother ranks by, without gradient: z (E4), or z_g (E7) when it detects noise.
        if detect:
            z_g = extrapolated_margin(policy.detach(), ref, labels, mask, beta=self.beta, lam=self.smoother.lam,
                                      vocab_chunk=self.smoother.vocab_chunk, ref_logps=ref_logps)  # [B]
        else:
            z_g = dpo_margin(policy_chosen, ref_chosen, policy_rejected, ref_rejected, self.beta).detach()  # [B]
        step, total = self.state.global_step, max(self.state.max_steps, 1)
        s = self.smoother([int(i) for i in inputs["pair_id"].tolist()], z_g, step, total)

        losses, chosen_rewards, rejected_rewards, margins = dpo_losses(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, s.a
        )
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise RunError(
                f"the DPO loss became {loss.item()} at optimizer step {step} of {total}",
                hint=f"lower train.learning_rate (now {self.args.learning_rate:g}), check the pairs for empty or "
                "garbled responses, or train in fp32 (train.precision = 'fp32')",
            )

        if model.training:
            per_pair = {
                "margin": margins, "extrapolated_margin": z_g, "low_confidence": s.low_confidence,
                "smoothed": s.a > 0, "smoothing": s.a, "chosen_reward": chosen_rewards,
                "rejected_reward": rejected_rewards, "loss": losses.detach(),
            }  # each [B]
            self._record(inputs["pair_id"], per_pair, step, s.alpha, s.counted)
        return (loss, {}) if return_outputs else loss

    def _given_ref_logps(self, pair_ids: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[2B] (chosen rows, then rejected rows) reference log-probs from the precomputed table. Each entry also
        holds the token counts it was scored on: a pair the trainer sees with other tokens (another tokenisation,
        a different truncation) would get a wrong margin without a word, so it stops the run instead."""
        ids = [int(i) for i in pair_ids.tolist()]
        missing = [i for i in ids if i not in self.ref_logps]
        if missing:
            raise RunError(f"no precomputed reference log-probs for pair(s) {missing[:5]}",
                           hint="delete the round's train_reference_logps.json and done/reference.json, then --resume")
        counts = mask.sum(-1).tolist()  # [2B] response tokens the trainer scores
        rows = [self.ref_logps[i] for i in ids]
        want = [r["chosen_tokens"] for r in rows] + [r["rejected_tokens"] for r in rows]
        if counts != want:
            bad = next(ids[j % len(ids)] for j in range(len(want)) if counts[j] != want[j])
            raise RunError(f"pair {bad}: the precomputed reference log-probs cover other response tokens than the "
                           "trainer sees", hint="a tokenizer or train.max_length changed since they were computed")
        values = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def _record(self, pair_ids: torch.Tensor, per_pair: dict[str, torch.Tensor], step: int, alpha: float,
                after_warmup: bool):
        columns = {key: values.tolist() for key, values in per_pair.items()}
        for i, pair_id in enumerate(pair_ids.tolist()):
            self.pair_stats[pair_id] = {key: column[i] for key, column in columns.items()} | {"step": step}
        smoothed = per_pair["smoothed"]
        if after_warmup:
            self.seen_after_warmup += len(smoothed)
            self.smoothed_after_warmup += int(smoothed.sum())
        # TRL's log() averages these lists over the micro-batches since the last log and adds them to the logs.
        metrics = self._metrics["train"]
        metrics["rewards/margins"].append(per_pair["margin"].mean().item())
        metrics["rewards/extrapolated_margins"].append(per_pair["extrapolated_margin"].mean().item())
        metrics["rewards/accuracies"].append((per_pair["margin"] > 0).float().mean().item())
        metrics["smoothed_frac"].append(smoothed.float().mean().item())
        metrics["alpha"].append(alpha)


class StepLog(TrainerCallback):
    """Keeps every optimizer step's logs and forwards them to the CLI's progress bar."""

    def __init__(self, on_step: Callable[[int, int, dict], None] | None):
        self.on_step = on_step
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # step logs; the end-of-training summary has "train_loss" instead
            self.history.append({"step": state.global_step, **logs})
            if self.on_step is not None:
                self.on_step(state.global_step, state.max_steps, dict(logs))
