"""Stage 1 of a round: K responses per prompt from pi_{i-1} (docs/method.md, "The loop"; arXiv 2406.04412, Sec. 3).

Reads: the round's prompt pool and the previous model folder. Writes: round-<i>/samples/chunk-<n>.jsonl, one file
per `sample.chunk_size` prompts, each written atomically and seeded by (random seed, round, chunk), so a resumed
stage skips finished chunks and produces the very same samples as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfie_lite import distributed
from selfie_lite.config import RunConfig
from selfie_lite.interrupt import safe_point
from selfie_lite.rundir import atomic_write_jsonl, read_jsonl
from selfie_lite.stage import NULL_PROGRESS, Round


def chunk_seed(random_seed: int, round_idx: int, chunk: int) -> int:
    return (random_seed * 1_000_003 + round_idx * 10_007 + chunk) % (2**31 - 1)


def sample_stage(r: Round) -> dict:
    """Stage 1 of round i: K responses per prompt of data/pool-<i>.jsonl, sampled from pi_{i-1}."""
    prompts = [row["prompt"] for row in read_jsonl(r.run_dir / "data" / f"pool-{r.index}.jsonl")]
    return sample_round(r.cfg, r.dir, r.backend, r.prev_dir, prompts, r.index, r.progress)


def sample_round(cfg: RunConfig, round_dir: Path, backend, model_dir: Path, prompts: list[str], round_idx: int,
                 progress=NULL_PROGRESS) -> dict:
    folder = round_dir / "samples"
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    size = cfg.sample.chunk_size
    chunks = [(c, prompts[s : s + size]) for c, s in enumerate(range(0, len(prompts), size))]
    todo = [(c, ps) for c, ps in chunks if not (folder / f"chunk-{c:05d}.jsonl").is_file()]
    n_done_prompts = sum(len(ps) for c, ps in chunks) - sum(len(ps) for _, ps in todo)
    task = progress.start("sample", total=len(prompts), done=n_done_prompts, unit="prompts")
    tokens, seconds = 0, 0.0
    if todo:
        from selfie_lite.sampler_vllm import get_sampler

        sampler, _ = get_sampler(cfg.sample.sampler, backend, cfg)  # the backend itself unless vLLM is asked for
        # Several processes (distributed.py): one chunk per worker per turn, gathered, the main process writes them;
        # each chunk is seeded by its own index, so its samples do not depend on which process drew them. A worker is
        # a process, or the first of every k processes when a vLLM engine spans their k GPUs.
        group = getattr(sampler, "processes_per_engine", 1)
        me = distributed.worker_index(group)
        if hasattr(sampler, "release_memory"):  # vLLM: every GPU the engines take is emptied first
            sampler.release_memory()
            distributed.barrier()
        model, tok = sampler.load(model_dir) if me is not None else (None, None)
        try:
            for turn in distributed.in_rounds(todo, group):
                t0 = time.perf_counter()
                done = []
                if me is not None and turn[me] is not None:
                    c, ps = turn[me]
                    counted = []
                    busy = sum(t is not None for t in turn)  # the prompts of this turn go W times as fast

                    def on_batch(n, n_tokens, counted=counted, busy=busy):
                        counted.append(n_tokens)
                        progress.advance(task, n * busy, tokens=n_tokens)

                    rows = sampler.generate(
                        model, tok, ps, num_samples=cfg.sample.num_samples, temperature=cfg.sample.temperature,
                        top_p=cfg.sample.top_p, max_new_tokens=cfg.sample.max_new_tokens,
                        batch_size=cfg.sample.batch_size, seed=chunk_seed(cfg.random_seed, round_idx, c),
                        on_batch=on_batch,
                    )
                    for j, r in enumerate(rows):
                        r["id"] = c * size + j
                    done.append((c, rows, sum(counted)))
                for c, rows, n_tokens in distributed.gather(done):
                    if distributed.is_main():
                        atomic_write_jsonl(folder / f"chunk-{c:05d}.jsonl", rows)
                    tokens += n_tokens
                    n_done_prompts += len(rows)
                seconds += time.perf_counter() - t0
                safe_point("sample", n_done_prompts)
        finally:
            if me is not None:
                sampler.free(model)  # a vLLM engine's process exits here, on success and on failure alike
        distributed.barrier()  # every chunk on disk before anyone reads them back
    progress.finish(task)
    rows = load_samples(round_dir)
    lengths = [len(ids) for r in rows for ids in r["response_ids"]]
    return {
        "prompts": len(rows),
        "samples": len(lengths),
        "new_tokens": sum(lengths),
        "mean_response_tokens": sum(lengths) / max(1, len(lengths)),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,  # None: all chunks came from disk
    }


def load_samples(round_dir: Path) -> list[dict]:
    rows: list[dict] = []
    for f in sorted((round_dir / "samples").glob("chunk-*.jsonl")):
        rows += read_jsonl(f)
    if (round_dir / "anchor" / "samples").is_dir() and rows:  # robust.anchor_rejected: pi_0's samples appended
        rows = with_anchor_samples(rows, load_samples(round_dir / "anchor"))
    return rows


def with_anchor_samples(rows: list[dict], anchor_rows: list[dict]) -> list[dict]:
    """Each prompt's row with pi_0's samples appended (responses, response_ids) and "anchor_from" = the index of the
    first of them, so that the judge picks chosen among the round's own samples and rejected among pi_0's
    (judge.judge_pairs; robust.anchor_stage samples them). The sampling pass's policy log-probs are dropped: pi_0's
    samples need the judge's policy pass, so the judge scores every sample of the merged row."""
    anchor = {int(a["id"]): a for a in anchor_rows}
    out = []
    for row in rows:
        a = anchor[int(row["id"])]
        merged = {k: v for k, v in row.items() if k != "policy_logps"}
        merged["responses"] = row["responses"] + a["responses"]
        merged["response_ids"] = row["response_ids"] + a["response_ids"]
        merged["anchor_from"] = len(row["responses"])
        out.append(merged)
    return out
