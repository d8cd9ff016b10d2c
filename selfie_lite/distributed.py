"""Several processes, one run (`accelerate launch ... -m selfie_lite run`): who writes, who waits, and how a stage's
work is split across the processes and put back together. Everything here is accelerate's (PartialState, its
barrier, gather_object, broadcast_object_list); nothing is hand-written on torch.distributed.

    - sampling: whole chunks (each seeded by its own chunk index) per process; judging and other scoring passes:
      whole batches of the length-sorted order the backend scores in, a contiguous run of them per process. So every
      sequence is sampled and scored exactly as a single process would, and the pairs do not depend on the process
      count (tests/test_distributed.py checks them byte for byte).
    - training: TRL's Trainer uses the accelerate state the launcher set up (DDP, DeepSpeed, FSDP).
    - only the main process writes the run folder (files, done-markers, the lock, the merged model); the others wait
      for it at a barrier.

Started without a launcher (WORLD_SIZE unset or 1) every function here is the identity: is_main() is True,
barrier() does nothing, split_* gives everything to the one process and gather() returns its input; accelerate is
not even imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from selfie_lite.errors import RunError

T = TypeVar("T")


class MainStopped(RunError):
    """Raised on the other processes when the main process's part failed (on_main): the main process prints the
    error; these stop with it and print nothing (console.print_error), so the run stops with one line."""

    quiet_on_peers = True


def world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def active() -> bool:
    return world_size() > 1


def _state():
    """accelerate's PartialState, a singleton: the first call joins the process group that the launcher set up. On
    a machine without a CUDA GPU (or with ACCELERATE_USE_CPU set) the processes talk over gloo (MULTI_CPU), as
    TrainingArguments(use_cpu=True) asks for too; PartialState reads neither by itself."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def shards_weights() -> bool:
    """True when the training engine shards the weights themselves across the processes (DeepSpeed ZeRO-3, FSDP): a
    weight is then whole only inside its own module's forward, so code that reads one directly
    (loss.plain_output_layer) must not. Asked of accelerate's state once the Trainer has set it up (a DeepSpeed
    config file's ZeRO stage is known only there), else of what `accelerate launch` exported."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return False
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3":
        return True
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:  # not set up yet: nothing is sharded before training starts
        return False
    plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) == 3


def rank() -> int:
    return _state().process_index if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Every process waits here for all the others (the main process's writes are then visible to all)."""
    if active():
        _state().wait_for_everyone()


def broadcast(obj: T) -> T:
    """The main process's obj, on every process (what the main process decided from the run folder)."""
    if not active():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(items: list) -> list:
    """Each process's list, concatenated in rank order, on every process."""
    if not active():
        return items
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def bounds(n: int, ranks: int | None = None, index: int | None = None) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n items that process `index` of `ranks` takes: the first n % ranks processes
    one more than the others, so that concatenating the shares in rank order is range(n)."""
    ranks = world_size() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(n, ranks)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def split_contiguous(items: Sequence[T]) -> list[T]:
    lo, hi = bounds(len(items))
    return list(items[lo:hi])


def in_rounds(items: Sequence[T], group: int = 1) -> list[list[T | None]]:
    """items dealt out a round at a time, one per worker per round: round k gives worker p items[k * W + p] (None
    where the items have run out), so that every process goes through the same number of rounds (each ends in a
    gather) and the main process can write each round's results before the next one starts. The workers are the
    processes, or with `group` > 1 every group-th of them (worker_index): W = world_size() // group."""
    w = max(1, world_size() // group)
    return [[items[k + p] if k + p < len(items) else None for p in range(w)] for k in range(0, len(items), w)]


def worker_index(group: int = 1) -> int | None:
    """This process's place among in_rounds' workers when `group` processes share one worker (a vLLM engine over
    their GPUs): the first process of each group works, the others lend it their GPUs and get None."""
    r = rank()
    return r // group if r % group == 0 else None


def score_sharded(score: Callable[[list], list[float]], sequences: list, batch_size: int,
                  length: Callable[[Any], int]) -> list[float]:
    """score(sequences) computed with the work split across processes, so that each sequence lands in the very batch
    it would have in one process: the backend scores longest first in batches of batch_size (a stable sort), so the
    batches of that order are dealt out contiguously, whole, and each process scores its own run of them (its list
    is already in that order, so the backend forms the same batches). One process: score(sequences)."""
    if not active():
        return score(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -length(sequences[i]))
    n_batches = -(-len(order) // batch_size)
    lo, hi = bounds(n_batches)
    mine = order[lo * batch_size : hi * batch_size]
    values = score([sequences[i] for i in mine]) if mine else []
    gathered = gather([(i, v) for i, v in zip(mine, values, strict=True)])
    result = [0.0] * len(sequences)
    for i, v in gathered:
        result[i] = v
    return result


def on_main(fn: Callable[[], T]) -> T:
    """fn() run by the main process alone (it reads and writes the run folder), its result given to every process;
    the others wait until it is done. One process: fn()."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001  told to the others, raised here below
            error = e
    box = broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if box[1] is not None:
        raise MainStopped(f"the main process stopped: {box[1]}")
    return box[0]

