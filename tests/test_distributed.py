"""The loop under `accelerate launch` with 2 processes on this CPU (gloo; distributed.py): the self-labelled pairs are
byte-identical to one process's, the trained model equal to rounding, only the main process writes, a killed process
stops the run and a run moves between 1 and 2 processes on resume.

Each run is the real CLI (`python -m selfie_lite run`) on the toy model (about 50K parameters), 1 round; the launcher
is accelerate's (`--multi_gpu`, which on a machine without CUDA starts torchrun's processes and distributed.py joins
them over gloo). About a minute on 2 cores.
"""

import json
import os
import socket
from pathlib import Path

import pytest
from conftest import launch, round_0_of, toy_run_once

# What sampling and judging make in round 1: byte for byte the same whatever the process count.
LABELS = ["samples/chunk-00000.jsonl", "samples/chunk-00001.jsonl", "samples/chunk-00002.jsonl",
          "samples/chunk-00003.jsonl", "judged.jsonl", "reference_logps.json", "train_reference_logps.json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The toy run's one-process reference (conftest.toy_run_once) and a folder of this worker's own."""
    root, args = toy_run_once(tmp_path_factory, "distributed")
    return tmp_path_factory.mktemp("dist"), args, root / "one"


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_two_processes_label_the_same_pairs_as_one_and_train_the_same_model(setup):
    root, args, one = setup
    two = round_0_of(one, root / "two")
    r = launch(2, ["--resume", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    for f in LABELS:
        assert (two / "round-1" / f).read_bytes() == (one / "round-1" / f).read_bytes(), f
    done = json.loads((two / "round-1" / "done" / "train.json").read_text())
    assert done["processes"] == 2 and done["grad_accum_per_process"] == 1  # the same 4 pairs per optimizer step
    assert done["engine"] == "MULTI_CPU"  # DDP over gloo
    # The same pairs in every optimizer step (accelerate deals the same shuffled micro-batches out, batch j to
    # process j % 2, and grad_accum 2 becomes 1 per process), DDP's mean of the two gradients against one process's
    # accumulation of them, and the low-confidence picker's window gathered across the processes: equal to rounding.
    # (28 pairs in micro-batches of 2: 14, even. An odd count would make accelerate repeat a batch: docs/scaling.md.)
    a, b = _weights(one / "round-1" / "model"), _weights(two / "round-1" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    done_one = json.loads((one / "round-1" / "done" / "train.json").read_text())
    assert done["frac_smoothed"] == done_one["frac_smoothed"] > 0 and done["steps"] == done_one["steps"]
    pairs_one = [json.loads(x) for x in (one / "round-1" / "pairs.jsonl").read_text().splitlines()]
    pairs_two = [json.loads(x) for x in (two / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs_one] == \
        [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs_two]
    # Only the main process wrote: every write goes through rundir.only_main_writes, which stops any other
    # process's (the run would have failed); nothing of the others' is left in the folder.
    names = {p.name for p in two.rglob("*")}
    assert "trainer" not in names and not [n for n in names if ".tmp" in n]
    assert not (two / ".lock").exists()
    assert r.stdout.count("final model") <= 1 and r.stderr.count("final model") <= 1  # one process speaks


def test_a_micro_batch_split_across_processes_trains_the_same_model(setup):
    root, args, one = setup
    # grad_accum 1 does not divide by 2 processes, batch_size 4 does: each process takes 2 pairs per step (the
    # smol preset's case: batch 8, accumulation 1), and the step's pairs are one process's 4.
    batch = ["--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--force"]
    runs = {}
    for n in (1, 2):
        runs[n] = round_0_of(one, root / f"batch{n}")
        r = launch(n, ["--resume", str(runs[n]), *batch])
        assert r.returncode == 0, r.stderr[-3000:]
    done = {n: json.loads((runs[n] / "round-1" / "done" / "train.json").read_text()) for n in runs}
    assert (done[2]["batch_size_per_process"], done[2]["grad_accum_per_process"]) == (2, 1)
    assert done[2]["steps"] == done[1]["steps"] and done[2]["frac_smoothed"] == done[1]["frac_smoothed"] > 0
    a, b = _weights(runs[1] / "round-1" / "model"), _weights(runs[2] / "round-1" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_per_process_batches():
    from selfie_lite.train import per_process_batch

    assert per_process_batch(2, 16, 4) == (2, 4)  # the accumulation divides: divided
    assert per_process_batch(8, 1, 2) == (4, 1)  # else the micro-batch
    assert per_process_batch(8, 2, 4) == (2, 2)
    assert per_process_batch(3, 1, 2) == (3, 1)  # neither: each keeps both, the optimizer's batch doubles
    assert per_process_batch(8, 4, 1) == (8, 4)


def test_a_fresh_two_process_run_matches_one_to_rounding(setup):
    root, args, one = setup
    r = launch(2, [*args, "--out", str(root / "fresh2")])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(one / "round-0" / "model"), _weights(root / "fresh2" / "round-0" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6  # the seed DPO: no picker, rounding only
    # Round 1 samples from a round-0 model that differs in the last bits: the same texts, the same pairs.
    one_pairs = [json.loads(x) for x in (one / "round-1" / "judged.jsonl").read_text().splitlines()]
    two_pairs = [json.loads(x) for x in (root / "fresh2" / "round-1" / "judged.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in one_pairs] == [(p["chosen"], p["rejected"]) for p in two_pairs]


def test_a_killed_process_stops_the_run_and_one_process_resumes_it(setup):
    root, args, one = setup
    run = round_0_of(one, root / "killed")
    # Process 1 dies (SIGKILL) after the first turn of sampling (chunks 0 and 1 are on disk): the launcher stops
    # process 0 too, and says which process failed.
    r = launch(2, ["--resume", str(run)], {"SELFIE_LITE_KILL_AT": "sample:2@1"})
    assert r.returncode != 0
    # torchrun's summary names process 1 as the root cause. Process 0 prints one line when it sees the lost peer
    # first (console._map_library_error) and nothing when torchrun's SIGTERM reaches it first (a race the load of the
    # machine decides); never a traceback of ours (the launcher prints its own ChildFailedError traceback).
    assert "rank      : 1" in r.stderr
    assert "/selfie_lite/" not in r.stderr, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) <= 1 and all(x.startswith("error: [process 0 of 2] another process of this run stopped")
                                  for x in ours), ours
    chunks = sorted(p.name for p in (run / "round-1" / "samples").glob("chunk-*.jsonl"))
    assert chunks and len(chunks) < 4 and not (run / "round-1" / "done" / "sample.json").exists()
    r = launch(1, ["--resume", str(run)])  # and back: the 2-process run continued by one process
    assert r.returncode == 0, r.stderr[-3000:]
    for f in LABELS:
        assert (run / "round-1" / f).read_bytes() == (one / "round-1" / f).read_bytes(), f


def test_a_refusal_on_the_main_process_stops_every_process_with_one_line(setup):
    root, args, one = setup
    run = round_0_of(one, root / "locked")
    boot = Path("/proc/sys/kernel/random/boot_id")
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0,
                                           "boot_id": boot.read_text().strip() if boot.exists() else None}))
    r = launch(2, ["--resume", str(run)])
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # The main process's refusal, once; process 1 stops with it and prints nothing (distributed.MainStopped).
    assert len(errors) == 1 and errors[0].startswith("error: [process 0 of 2]"), r.stderr[-3000:]
    assert "is in use by another run" in errors[0]
    assert not (run / "round-1").exists()


def test_only_the_main_process_may_write(tmp_path, monkeypatch):
    from selfie_lite import distributed
    from selfie_lite.rundir import atomic_write_json, fresh_tmp_dir

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    with pytest.raises(RuntimeError, match="process 1 tried to write"):
        atomic_write_json(tmp_path / "x.json", {})
    with pytest.raises(RuntimeError, match="only the main process"):
        fresh_tmp_dir(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_one_process_is_the_identity():
    from selfie_lite import distributed

    assert not distributed.active() and distributed.is_main() and distributed.rank() == 0
    assert distributed.gather([3, 1]) == [3, 1]
    assert distributed.split_contiguous([1, 2, 3]) == [1, 2, 3]
    assert distributed.on_main(lambda: 7) == 7
    calls = []
    assert distributed.score_sharded(lambda s: calls.append(s) or [1.0] * len(s), [([1], [2])], 4, len) == [1.0]
    assert calls == [[([1], [2])]]


def test_shares_and_turns():
    from selfie_lite import distributed

    for n in range(12):
        for w in (1, 2, 3, 4):
            got = [i for k in range(w) for i in range(*distributed.bounds(n, w, k))]
            assert got == list(range(n))


def test_turns_of_workers_that_span_several_processes(monkeypatch):
    from selfie_lite import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    # group 2: two workers (processes 0 and 2, each lent the GPU of the next one), every item dealt exactly once
    turns = distributed.in_rounds(list("abcde"), group=2)
    assert turns == [["a", "b"], ["c", "d"], ["e", None]]
    for r, want in [(0, 0), (1, None), (2, 1), (3, None)]:
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        assert distributed.worker_index(2) == want
    assert distributed.in_rounds(list("abcde")) == [list("abcd"), ["e", None, None, None]]  # group 1: 4 workers


# ---------------------------------------------------------------------------------------------
# Engines that shard the weights (DeepSpeed ZeRO-3, FSDP): accelerate runs them on GPUs only, so their pieces of
# our code are checked here against what such an engine hands back.


def test_the_adapter_is_saved_from_the_engines_gathered_weights(tmp_path, monkeypatch):
    import types

    import torch
    from conftest import tiny_model
    from safetensors.torch import load_file

    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig
    from selfie_lite.errors import RunError
    from selfie_lite.train import adapter_weights

    model = tiny_model()
    whole = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # what this process holds under ZeRO-3: a shard (here: zeros), not the trained weights
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()

    from accelerate.utils import DistributedType

    class Engine:  # accelerate's answers under FSDP: the model unwrapped, the weights gathered (none on the others)
        distributed_type = DistributedType.FSDP

        def __init__(self, gathered):
            self.gathered = gathered

        def unwrap_model(self, m):
            return m

        def get_state_dict(self, m):
            return self.gathered

    trainer = types.SimpleNamespace(model=model, model_wrapped=model, accelerator=Engine({**whole, "other.weight": 0}))
    weights = adapter_weights(trainer)
    assert set(weights) == set(whole)
    HFBackend(RunConfig()).save_adapter(model, tmp_path / "adapter", weights=weights)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(whole) and all(float(t.min()) == float(t.max()) == 0.25 for t in saved.values())
    # An engine that gives back only part of the adapter stops the run rather than save a fragment as a whole.
    trainer.accelerator = Engine(dict(list(whole.items())[:2]))
    with pytest.raises(RunError, match=rf"gave back 2 of the adapter's {len(whole)} weights"):
        adapter_weights(trainer)
    # The other processes get nothing (None under ZeRO-3, {} under FSDP) and save nothing: no error there.
    from selfie_lite import distributed

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    trainer.accelerator = Engine(None)
    assert adapter_weights(trainer) == {}
    monkeypatch.undo()

    # ZeRO-3: DeepSpeed's own consolidation, asked for the trainable weights alone (not the frozen base model).
    class ZeRO3(Engine):
        distributed_type = DistributedType.DEEPSPEED
        deepspeed_config = {"zero_optimization": {"stage": 3}}

        def get_state_dict(self, m):
            raise AssertionError("accelerate's get_state_dict gathers the frozen weights too")

    asked = []

    class DeepSpeedEngine:
        def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
            asked.append(exclude_frozen_parameters)
            return dict(whole)

    trainer = types.SimpleNamespace(model=model, model_wrapped=DeepSpeedEngine(), accelerator=ZeRO3(None))
    assert set(adapter_weights(trainer)) == set(whole) and asked == [True]


@pytest.mark.parametrize("env, shards", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
    ({"ACCELERATE_USE_FSDP": "true"}, True),
    ({}, False),
])
def test_sharded_weights_take_the_models_own_logits(monkeypatch, env, shards):
    import torch
    from conftest import tiny_model

    from selfie_lite.loss import LastHidden, last_hidden, plain_output_layer, sequence_logps

    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    model = tiny_model().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    attn, mask = torch.ones_like(ids), torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]).bool()
    with torch.no_grad():
        lean = sequence_logps(last_hidden(model, ids, attn), ids[:, 1:], mask)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # Under ZeRO-3 / FSDP the output layer's weight is whole only inside its forward: never read it directly.
    assert (plain_output_layer(model) is None) == shards
    with torch.no_grad():
        source = last_hidden(model, ids, attn)
        assert isinstance(source, LastHidden) != shards
        assert torch.allclose(sequence_logps(source, ids[:, 1:], mask), lean, atol=1e-5)


def test_a_partitioned_output_weight_is_never_read_directly(monkeypatch):
    from conftest import tiny_model

    from selfie_lite.loss import plain_output_layer

    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    model = tiny_model()
    assert plain_output_layer(model) is not None
    # ZeRO-3 marks every parameter it partitions (a DeepSpeed config file's stage is not in the launcher's variables)
    model.get_base_model().lm_head.weight.ds_id = 7
    assert plain_output_layer(model) is None


def test_the_main_job_on_two_processes_ships_what_one_process_ships(tiny_preset, tmp_path):
    """The built-in default (the tiny preset with gold replay, the SFT reference, CREAM and the round guard; the
    suite's two-round size, conftest.TWO_ROUNDS) from scratch, on 1 and on 2 processes. From scratch the two differ by
    rounding from the first training step on, and sampling at temperature 0.7 turns last-bit differences into other
    texts, so the pairs are not the same bytes here (they are where a round starts from the same model: the tests
    above); what the run decides and what it ships are the same: the same round, as good against the SFT model."""
    import subprocess
    import sys

    from conftest import TWO_ROUNDS

    runs = {n: tmp_path / f"p{n}" for n in (1, 2)}
    for n, out in runs.items():
        r = launch(n, [*TWO_ROUNDS, "--out", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        e = subprocess.run([sys.executable, "-m", "selfie_lite", "eval", str(out), "--rounds", "2"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert e.returncode == 0, e.stderr[-3000:]
    summary = {n: json.loads((out / "summary.json").read_text()) for n, out in runs.items()}
    assert summary[1]["final_round"] == summary[2]["final_round"] == 2
    assert summary[1]["final_why"] == summary[2]["final_why"]
    for i in (0, 1, 2):
        assert json.loads((runs[2] / f"round-{i}" / "done" / "train.json").read_text())["processes"] == 2
    wins = {n: json.loads((out / "eval.json").read_text())["models"]["round-2"]["win_rate"] for n, out in runs.items()}
    # As good: measured 0.513 and 0.513 here (this size barely moves the model; the main job's full size, 3 rounds:
    # 0.608 and 0.607, docs/scaling.md). How good the default is, is the tiny bench's question, not this test's.
    assert abs(wins[1] - wins[2]) <= 0.03, wins
