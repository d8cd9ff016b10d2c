"""benchmarks/results.py: the lines above its tables, from a run's config.json as `run` writes it today (a renamed
config key once broke the benchmark at its very end, after 24 minutes of training)."""

from argparse import Namespace

from benchmarks import results
from selfie_lite.config import load_config, to_dict
from selfie_lite.evaluate import EvalSettings, settings_record


def test_the_header_reads_a_run_config_as_run_writes_it():
    cfg = to_dict(load_config("tiny"))
    settings = settings_record(EvalSettings(samples_per_prompt=2), None, 300, "sft", "sft", 500)
    timings = {"seed 1: SPA": 30.0, "seed 1: eval": 90.0}
    args = Namespace(sets=[], seeds=[1, 2, 3], split="eval", threads=1)
    text = "\n".join(results.header(cfg, settings, args, timings, total=6.0))
    assert f"Labelled seed {cfg['data']['labelled_share']}; prompt pools {cfg['data']['pool_sizes']}" in text
    assert "300 held-out eval prompts, 2 sampled answer(s) per prompt" in text
    assert "Wall time of a fresh run: 2.0 min" in text and "this invocation took 0.1 min" in text
    assert "Per seed: SPA 0.5 min, eval 1.5 min." in text and "nothing changed" in text
