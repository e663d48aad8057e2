"""The forward pass's thread pool (csrc/threads.c): any thread count gives the same
logits, workers end with their Model, and a forked child still runs (serially)."""
import gc
import os
import signal

import numpy as np
import pytest

import llamacpu

HAVE_PROC_TASKS = os.path.isdir("/proc/self/task")


def prompt(vocab, n, seed):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def os_threads() -> int:
    """the pool's workers in this process (named by csrc/threads.c): other libraries'
    threads (BLAS, Ray, a test's server) come and go beside them"""
    n = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip() == "llamacpu-work"
        except FileNotFoundError:  # a thread that has just ended
            pass
    return n


@pytest.mark.parametrize("type", ["f32", "q4_0"])
def test_more_threads_than_cores_and_switching_agree(converted, type):
    """Rows and tokens are split, never a sum: 1, 3 and 7 threads (more than this
    machine's cores: workers that wait for a core) give identical prefill and decode
    logits, also after n_threads changes between calls."""
    path = converted("tiny64", type)
    toks = prompt(128256, 12, seed=11)
    with llamacpu.Model(path, n_ctx=32, n_threads=1) as m:
        ref = m.forward(toks, all_logits=True)
        ref_next = m.forward([7], pos=len(toks))
        for n in (3, 7, 2):
            m.n_threads = n
            assert m.n_threads == n
            np.testing.assert_array_equal(m.forward(toks, all_logits=True), ref)
            np.testing.assert_array_equal(m.forward([7], pos=len(toks)), ref_next)


@pytest.mark.skipif(not HAVE_PROC_TASKS, reason="counts threads in /proc/self/task (Linux)")
def test_workers_end_with_the_model(converted):
    """n_threads - 1 workers while a Model is open; none after n_threads = 1 or close()."""
    path = converted("tiny64", "q4_0")
    gc.collect()  # an earlier test's unclosed Model must not end its workers in the middle
    before = os_threads()
    m = llamacpu.Model(path, n_ctx=32, n_threads=4)
    assert os_threads() == before + 3
    m.n_threads = 2
    assert os_threads() == before + 1
    m.forward([1, 2, 3])
    m.n_threads = 1
    assert os_threads() == before
    m.n_threads = 3
    m.close()
    assert os_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_without_the_workers(converted):
    """A child forked from a process with a 2-thread Model has none of its workers: its
    forwards run on the one thread and give the parent's logits (no hang)."""
    path = converted("tiny64", "q4_0")
    toks = prompt(128256, 10, seed=12)
    with llamacpu.Model(path, n_ctx=32, n_threads=2) as m:
        ref = m.forward(toks, all_logits=True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report, then leave without running the parent's exit handlers
            code = 1
            try:
                signal.alarm(60)
                out = m.forward(toks, all_logits=True)
                code = 0 if np.array_equal(out, ref) else 2
            finally:
                os.write(w, bytes([code]))
                os._exit(code)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert got == b"\x00" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        np.testing.assert_array_equal(m.forward(toks, all_logits=True), ref)  # the parent's pool still works
