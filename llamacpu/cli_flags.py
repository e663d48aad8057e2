"""What the subcommands share about two of their flags.

-c/--ctx-size: the Python API's errors name its parameter n_ctx (Model, Llama,
context_fit, perplexity); a command line user typed -c, so a command that has the flag
tells those messages in its name (ctx_flag_message).

-t/--threads: more threads than the logical CPUs this process may run on is accepted,
with one warning on stderr (warn_threads): the pool's threads then take turns on the
cores, and every step of a decode waits for the one that is not running.
"""
from __future__ import annotations

import os
import re
import sys

CTX_FLAG = "-c/--ctx-size"


def ctx_flag_message(message: str) -> str:
    """An API error message about n_ctx as a user of -c reads it: "n_ctx=N" -> "-c N",
    "n_ctx <= N" -> "-c N or less", any other "n_ctx" -> "-c/--ctx-size"."""
    message = re.sub(r"\bn_ctx=(\d+)", r"-c \1", message)
    message = re.sub(r"\bn_ctx <= (\d+)", r"-c \1 or less", message)
    return re.sub(r"\bn_ctx\b", CTX_FLAG, message)


def logical_cpus() -> int:
    """The logical CPUs (hyper-threads included) this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def warn_threads(command: str, n_threads) -> None:
    """One line on stderr when -t asks for more threads than there are logical CPUs;
    the command goes on."""
    cpus = logical_cpus()
    if n_threads is not None and n_threads > cpus:
        print(f"llamacpu {command}: warning: -t {n_threads} is more threads than the {cpus} logical CPUs "
              "this process may use: decoding slows down badly when threads wait for a CPU "
              "(without -t: one thread per physical core)", file=sys.stderr, flush=True)
