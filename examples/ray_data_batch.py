"""Batch inference with Ray Data: one Llama per node, OpenAI Batch API lines in and out.

    pip install 'llamacpu[ray]'
    python examples/ray_data_batch.py requests.jsonl answers.jsonl [--model MODEL] [--address auto]

`map_batches` runs LlamaActor, a class: Ray Data starts `ActorPoolStrategy(size=...)` actors, each reserving
`num_cpus` CPUs, and sends each one batches of input lines. With size = the number of
nodes and num_cpus = a node's CPUs there is one actor, so one Llama (one copy of the weights,
loaded once), per node. An actor answers a batch's lines with llamacpu.batch.Answerer, as
`llamacpu batch` does (the same checks, the same output rows), from as many threads as its
Llama has sequence slots (`n_parallel`), so that it can batch them.

Unlike `llamacpu batch IN OUT --ray`, this is not resumable and does not check that custom_ids
are unique: it is a starting point for a pipeline of your own (other sources and sinks:
ray.data.read_json / read_parquet / write_parquet, ...). tests/test_batch.py runs it.
MODEL must be a path that exists on every node; without it, each node fetches the default
model (SmolLM2-135M-Instruct).
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor

import ray

import llamacpu
from llamacpu.batch import Answerer


class LlamaActor:
    """One Llama; called with a batch {"text": [input lines]}, returns {"row": [output rows as JSON]}."""

    def __init__(self, model=None, n_threads=None):
        self.llm = llamacpu.Llama(model, n_threads=n_threads)
        self.answerer = Answerer(self.llm)
        self.threads = ThreadPoolExecutor(self.llm.n_parallel)

    def __call__(self, batch: dict) -> dict:
        rows = self.threads.map(self.answerer.answer_line, batch["text"])
        return {"row": [json.dumps(r, ensure_ascii=False) for r in rows]}


def run(in_path, out_path, model=None, actors=None, cpus=None, batch_size=8) -> int:
    """Answer IN into OUT on the Ray cluster this process is connected to; returns the rows written.
    actors: default one per node; cpus: CPUs per actor, default the smallest node's."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    actors = actors or len(nodes)
    cpus = cpus or min(n["Resources"]["CPU"] for n in nodes)
    if model is not None and os.path.exists(model):
        model = os.path.abspath(model)   # the actors do not start in this directory
    ds = ray.data.read_text(os.path.abspath(in_path))   # one row {"text": line} per non-empty line
    ds = ds.map_batches(LlamaActor, fn_constructor_kwargs={"model": model, "n_threads": max(1, int(cpus))},
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, batch_size=batch_size)
    n = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for r in ds.iter_rows():      # rows stream back to this process as batches finish
            out.write(r["row"] + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--model", default=None)
    ap.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS or a new local Ray)")
    ap.add_argument("--actors", type=int, default=None, help="default: one per node")
    ap.add_argument("--cpus", type=float, default=None, help="CPUs per actor (default: the smallest node's)")
    args = ap.parse_args(argv)
    ray.init(address=args.address)
    print(f"{run(args.input, args.output, args.model, args.actors, args.cpus)} rows in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
