"""`llamacpu batch --ray`: a batch's requests answered by Ray actors, one Llama each.

The driver (this process) runs batch.run_batch as for a local job: it reads IN, skips what OUT
holds, and writes each row to OUT when it arrives. Only the answering moves to the cluster:

    BatchActor   holds one Llama, loaded once on the node Ray places it on, and answers one
                 request per call with batch.Answerer (the code a local run's threads use). It
                 is a threaded actor, so that its Llama's n_parallel sequence slots can fill.
    RayRunner    creates the actors (by default one per node, SPREAD, reserving that node's
                 CPUs) and hands requests out with ray.util.ActorPool, where each actor appears
                 once per slot: Ray schedules, nothing here does.

Faults are Ray's to handle: actors are created with max_restarts and max_task_retries=-1, so
when an actor's process dies (killed, out of memory, its node lost) Ray restarts it (the
Llama loads again) and runs the calls it had in flight again. The driver writes a row only
when its call returns, so a row is never lost nor written twice. An actor that died more
than MAX_RESTARTS times stops the job with an error; rerunning it resumes. Ctrl-C kills the
actors; rows already written stay.
"""
from __future__ import annotations

import os
import uuid

MAX_RESTARTS = 4          # per actor; each restart reloads the model
MAX_CONCURRENCY = 64      # threads a BatchActor may run calls on (its slots, and pid())
NAME_PREFIX = "llamacpu-batch-"   # actors are named NAME_PREFIX + job + "-" + index


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise OSError(f"--ray needs Ray ({e.name} is missing): pip install 'llamacpu[ray]'") from None
    return ray


class BatchActor:
    """One Llama on a Ray worker; `answer(task)` is batch.Answerer.answer. Decorated with
    ray.remote by RayRunner (Ray stays an optional import)."""

    def __init__(self, model, n_ctx: int, n_threads, parallel):
        from .batch import Answerer
        from .llama import Llama
        self.llm = Llama(model, n_ctx=n_ctx, n_threads=n_threads, n_parallel=parallel)
        self.answerer = Answerer(self.llm)
        self.parallel = self.llm.n_parallel

    def slots(self) -> int:
        """How many requests to give this actor at once."""
        return self.parallel

    def pid(self) -> int:
        return os.getpid()

    def answer(self, custom_id: str, body: dict) -> dict:
        return self.answerer.answer(custom_id, body)


def ray_runner_factory(model, *, address=None, actors=None, cpus=None, n_ctx=4096, n_threads=None,
                       parallel=None, quiet=False):
    """A runner_factory for batch.run_batch: connects to Ray (or starts it) when there is work."""
    ray = _import_ray()
    if model is not None and os.path.exists(model):
        model = os.path.abspath(model)   # Ray workers do not start in this directory

    def factory():
        return RayRunner(ray, model, address=address, actors=actors, cpus=cpus, n_ctx=n_ctx,
                         n_threads=n_threads, parallel=parallel, quiet=quiet)
    return factory


class RayRunner:
    """Answers requests on BatchActors through ray.util.ActorPool; see the module doc."""

    def __init__(self, ray, model, *, address=None, actors=None, cpus=None, n_ctx=4096, n_threads=None,
                 parallel=None, quiet=False):
        from ray.util import ActorPool

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, log_to_driver=not quiet, logging_level="ERROR" if quiet else "INFO")
        self.actors = []
        self.leftover = []
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
            if not nodes:
                raise OSError("the Ray cluster has no node with CPUs")
            node_cpus = [n["Resources"]["CPU"] for n in nodes]
            n_actors = actors or len(nodes)
            if cpus is None:
                cpus = min(min(node_cpus), sum(node_cpus) / n_actors)
            if n_actors * cpus > sum(node_cpus) or cpus > max(node_cpus):
                # Ray would wait for resources that never come
                raise ValueError(f"{n_actors} actors of {cpus:g} CPUs do not fit the Ray cluster's "
                                 f"{len(nodes)} nodes of {', '.join(f'{c:g}' for c in node_cpus)} CPUs")
            threads = n_threads or max(1, int(cpus))
            job = uuid.uuid4().hex[:8]
            cls = ray.remote(BatchActor)
            opts = dict(num_cpus=cpus, max_restarts=MAX_RESTARTS, max_task_retries=-1,
                        max_concurrency=MAX_CONCURRENCY, scheduling_strategy="SPREAD")
            self.actors = [cls.options(name=f"{NAME_PREFIX}{job}-{i}", **opts).remote(model, n_ctx, threads, parallel)
                           for i in range(n_actors)]
            # waits for every model to load; a load that fails (a missing file) is an error here
            slots = ray.get([a.slots.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.slots = sum(slots)
        self.cpus, self.threads = cpus, threads
        self.pool = ActorPool([a for a, n in zip(self.actors, slots) for _ in range(n)])

    def describe(self) -> str:
        n = len(self.actors)
        return (f"{n} Ray actor{'s' * (n != 1)} ({self.cpus:g} CPU{'s' * (self.cpus != 1)} and {self.threads} "
                f"thread{'s' * (self.threads != 1)} each, {self.slots} slot{'s' * (self.slots != 1)} in all)")

    def results(self, bodies):
        """Rows as they return (see batch.LocalRunner.results). The pool holds one call per slot;
        the next task is read when one returns."""
        ray, pool = self.ray, self.pool

        def submit():
            t = bodies.next()
            if t is None:
                return False
            pool.submit(lambda a, t: a.answer.remote(t.custom_id, t.body), t)
            return True

        for _ in range(self.slots):
            if not submit():
                break
        while pool.has_next():
            try:
                row = pool.get_next_unordered(timeout=0.5)
            except TimeoutError:
                continue
            except ray.exceptions.RayActorError as e:
                raise OSError(f"a Ray actor died more than {MAX_RESTARTS} times; rerun to resume "
                              f"({type(e).__name__}: {e})") from None
            submit()
            yield row

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
