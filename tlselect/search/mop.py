"""Schedules for training many models on P workers: task parallelism against model hopper parallelism.

Model hopper parallelism (MOP; Nakandala et al., Cerebro, VLDB 2020) splits the training data into
P partitions, one per worker. A model trains one sub-epoch on a worker's partition, then hops to
another worker, until it has seen every partition: that is one epoch, in any order of partitions.
Task parallelism trains each model on one worker holding a full copy of the data.

Every schedule here starts from the models' sub-epoch runtimes (one partition, so an epoch on one
worker takes P times as long) and returns a :class:`Schedule`: its tasks, makespan, idle time per
worker and the bytes it moves over the network:

- :func:`task_parallel`: whole models on workers; an optimal assignment by exhaustive search
  (branch and bound) up to :data:`EXHAUSTIVE_MODELS` models, longest-processing-time-first (LPT)
  beyond. Bytes: one full copy of the data to every worker that trains a model.
- :func:`randomized`: Cerebro's scheduler. Each epoch shuffles the (model, partition) pairs with a
  seeded generator; whenever a worker is idle (workers scanned in index order) it takes the first
  remaining pair of its partition whose model is not training elsewhere. Epochs end with a barrier.
- :func:`latin_square`: model i on partition (i + s) mod P at step s (:func:`latin_square_chains`);
  each worker runs its tasks in (epoch, step, model) order, each as soon as the model is free.
- :func:`static_mop`: any fixed chains and worker orders (how the other two are executed).

MOP bytes: one model checkpoint per hop (a sub-epoch on another worker than the model's previous
one); the data never moves, it already lies partitioned on the workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tlselect.core.errors import TLSelectError

EXHAUSTIVE_MODELS = 10


class ScheduleError(TLSelectError, ValueError):
    """Inputs no schedule can be built from."""


@dataclass(frozen=True)
class Task:
    """One model training on one worker from ``start`` to ``end``; ``partition`` -1 is all the data."""

    model: int
    worker: int
    partition: int
    epoch: int
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    kind: str
    workers: int
    tasks: tuple[Task, ...]
    bytes_moved: float

    @property
    def makespan(self) -> float:
        return max((t.end for t in self.tasks), default=0.0)

    @property
    def idle(self) -> tuple[float, ...]:
        """Per worker: the makespan less the time it trains."""
        busy = [0.0] * self.workers
        for t in self.tasks:
            busy[t.worker] += t.end - t.start
        return tuple(self.makespan - b for b in busy)


def _check(sub_epoch_times, workers: int, epochs: int) -> None:
    if workers < 1 or epochs < 1:
        raise ScheduleError(f"workers ({workers}) and epochs ({epochs}) must be at least 1")
    if not sub_epoch_times or min(sub_epoch_times) <= 0:
        raise ScheduleError("sub-epoch runtimes must be positive, one per model")


def _best_assignment(loads: list[float], workers: int) -> list[int]:
    """Worker per job minimizing the largest total: LPT, then branch and bound over small inputs."""
    order = sorted(range(len(loads)), key=lambda j: -loads[j])
    totals = [0.0] * workers
    best = [0] * len(loads)
    for j in order:
        best[j] = min(range(workers), key=totals.__getitem__)
        totals[best[j]] += loads[j]
    best_span = max(totals)
    bound = max(max(loads), sum(loads) / workers)
    if len(loads) > EXHAUSTIVE_MODELS or best_span <= bound:
        return best
    current, totals = [0] * len(loads), [0.0] * workers

    def search(k: int) -> None:
        nonlocal best, best_span
        if k == len(order):
            if max(totals) < best_span:
                best, best_span = list(current), max(totals)
            return
        tried = set()
        for w in range(workers):
            if totals[w] in tried or totals[w] + loads[order[k]] >= best_span:
                continue  # workers with equal loads are interchangeable
            tried.add(totals[w])
            totals[w] += loads[order[k]]
            current[order[k]] = w
            search(k + 1)
            totals[w] -= loads[order[k]]

    search(0)
    return best


def task_parallel(sub_epoch_times, workers: int, epochs: int = 1, data_bytes: float = 0.0) -> Schedule:
    """Each model trains all its epochs on one worker with a full copy of the data."""
    _check(sub_epoch_times, workers, epochs)
    epoch_times = [workers * t for t in sub_epoch_times]
    assignment = _best_assignment([epochs * t for t in epoch_times], workers)
    free, tasks = [0.0] * workers, []
    for model, worker in enumerate(assignment):
        for epoch in range(epochs):
            tasks.append(Task(model, worker, -1, epoch, free[worker], free[worker] + epoch_times[model]))
            free[worker] += epoch_times[model]
    return Schedule("task parallelism", workers, tuple(tasks), data_bytes * len(set(assignment)))


def _hops(tasks, model_bytes: float) -> float:
    last, hops = {}, 0
    for t in sorted(tasks, key=lambda t: t.start):
        hops += t.model in last and last[t.model] != t.worker
        last[t.model] = t.worker
    return hops * model_bytes


def static_mop(sub_epoch_times, chains, worker_orders, epochs: int = 1, model_bytes: float = 0.0, kind="static MOP"):
    """Run fixed schedules: ``chains[m]`` is model m's partition order, ``worker_orders[w]`` the
    models worker w trains, in order, each epoch; a task starts once its worker is free and its
    model has finished its previous sub-epoch."""
    workers = len(worker_orders)
    _check(sub_epoch_times, workers, epochs)
    for m, chain in enumerate(chains):
        if sorted(chain) != list(range(workers)):
            raise ScheduleError(f"model {m}: its chain {chain} must visit each of the {workers} partitions once")
    queues = [list(order) * epochs for order in worker_orders]
    done = [0] * len(chains)  # sub-epochs each model has finished
    model_free = [0.0] * len(chains)
    worker_free = [0.0] * workers
    tasks = []
    while any(queues):
        progressed = False
        for w, queue in enumerate(queues):
            while queue and chains[queue[0]][done[queue[0]] % workers] == w:
                m = queue.pop(0)
                start = max(worker_free[w], model_free[m])
                end = start + sub_epoch_times[m]
                tasks.append(Task(m, w, w, done[m] // workers, start, end))
                worker_free[w] = model_free[m] = end
                done[m] += 1
                progressed = True
        if not progressed:
            raise ScheduleError("the worker orders and the chains wait on each other (deadlock)")
    return Schedule(kind, workers, tuple(tasks), _hops(tasks, model_bytes))


def latin_square_chains(models: int, workers: int) -> list[list[int]]:
    """Model i's partitions: (i + s) mod P at step s = 0 .. P-1."""
    return [[(i + s) % workers for s in range(workers)] for i in range(models)]


def latin_square(sub_epoch_times, workers: int, epochs: int = 1, model_bytes: float = 0.0) -> Schedule:
    chains = latin_square_chains(len(sub_epoch_times), workers)
    orders = [[i for s in range(workers) for i in range(len(chains)) if chains[i][s] == w] for w in range(workers)]
    return static_mop(sub_epoch_times, chains, orders, epochs, model_bytes, "MOP, Latin square")


def randomized(sub_epoch_times, workers: int, epochs: int = 1, model_bytes: float = 0.0, seed: int = 0) -> Schedule:
    """Cerebro's randomized scheduler, simulated event by event."""
    _check(sub_epoch_times, workers, epochs)
    rng = random.Random(seed)
    tasks, now = [], 0.0
    for epoch in range(epochs):
        pairs = [(m, p) for m in range(len(sub_epoch_times)) for p in range(workers)]
        rng.shuffle(pairs)
        running: dict[int, Task] = {}
        while pairs or running:
            for w in sorted(set(range(workers)) - set(running)):
                busy = {t.model for t in running.values()}
                pick = next(((m, p) for m, p in pairs if p == w and m not in busy), None)
                if pick:
                    pairs.remove(pick)
                    running[w] = Task(pick[0], w, w, epoch, now, now + sub_epoch_times[pick[0]])
                    tasks.append(running[w])
            now = min(t.end for t in running.values())
            running = {w: t for w, t in running.items() if t.end > now}
    return Schedule("MOP, randomized", workers, tuple(tasks), _hops(tasks, model_bytes))


SCHEDULES = ("latin_square", "randomized")


def chains(models: int, workers: int, epochs: int, schedule: str = "latin_square", seed: int = 0) -> list[list[int]]:
    """Each model's partitions, sub-epoch after sub-epoch over all epochs, from a schedule simulated
    with equal sub-epoch runtimes (the order a workflow lays out as a chain of jobs)."""
    build = {"latin_square": latin_square, "randomized": lambda *a: randomized(*a, seed=seed)}.get(schedule)
    if build is None:
        raise ScheduleError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not models:
        return []
    tasks = sorted(build([1.0] * models, workers, epochs).tasks, key=lambda t: (t.epoch, t.start))
    return [[t.partition for t in tasks if t.model == m] for m in range(models)]


def run_chains(config: dict, specs: dict) -> dict[str, list[int]]:
    """``{run_id: partition of each sub-epoch}`` of the workflow's model hopper runs ``specs``
    (:func:`tlselect.runs.mop_runs`, whose ``epochs`` count sub-epochs): :func:`chains` over
    ``mop.partitions`` workers for the longest run's epochs, in the order of ``mop.schedule``
    (seeded with ``seed``). Sub-epoch s of a run trains on partition ``[run_id][s]``."""
    partitions = config["mop"]["partitions"]
    epochs = max((spec.settings["epochs"] for spec in specs.values()), default=0) // partitions
    laid_out = chains(len(specs), partitions, epochs, config["mop"]["schedule"], config["seed"])
    return dict(zip(specs, laid_out, strict=True))


def compare(
    cost_factors,
    workers: int,
    epochs: int,
    data_gb: float,
    model_gb: float,
    seconds_per_gb: float,
    bandwidth_gb_s: float,
    seed: int = 0,
) -> dict:
    """Task parallelism against MOP for one data set size: makespans (hours) and bytes moved (GB).

    Model m's epoch on one worker takes ``cost_factors[m] * seconds_per_gb * data_gb`` seconds.
    Task parallelism first copies the data to every worker it uses, over each worker's own link in
    parallel (``data_gb / bandwidth_gb_s``); without room for a copy it reads the data remotely
    every epoch instead (``remote`` column, bytes only). A MOP sub-epoch adds its checkpoint hop
    (``model_gb / bandwidth_gb_s``).
    """
    compute = [f * seconds_per_gb * data_gb / workers for f in cost_factors]
    hop = model_gb / bandwidth_gb_s
    task = task_parallel(compute, workers, epochs, data_bytes=data_gb)
    mop_times = [t + hop for t in compute]
    randomized_mop = randomized(mop_times, workers, epochs, model_gb, seed)
    latin = latin_square(mop_times, workers, epochs, model_gb)
    return {
        "data_gb": data_gb,
        "task_stored_gb_per_worker": data_gb,
        "mop_stored_gb_per_worker": data_gb / workers,
        "task_hours": (task.makespan + data_gb / bandwidth_gb_s) / 3600,
        "mop_randomized_hours": randomized_mop.makespan / 3600,
        "mop_latin_square_hours": latin.makespan / 3600,
        "task_copies_gb": task.bytes_moved,
        "task_remote_reads_gb": len(cost_factors) * epochs * data_gb,
        "mop_hops_gb": randomized_mop.bytes_moved,
    }
