"""`llamacpu run` as a user runs it: subprocesses, piped stdin, and the REPL in a
pseudo-terminal (a reply interrupted with Ctrl-C, then /reset)."""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import default_sigint

RUN = [sys.executable, "-m", "llamacpu", "run"]


@pytest.fixture(scope="module", autouse=True)
def _chunk_invariant(chunk_invariant_kernels):
    """Answers are compared across different prompt chunkings (prompt-cache hits against
    fresh prefills): a chunk-invariant kernel table (conftest.chunk_invariant_kernels)."""


@pytest.fixture(scope="module")
def smol_path(smollm_model):
    return str(smollm_model)


@pytest.fixture(scope="module")
def expected(smol_path):
    """What the Python API answers, greedily: the CLI must print exactly this."""
    from llamacpu.llama import Llama
    with Llama(smol_path, n_ctx=4096) as llm:
        def answer(text, n):
            out = llm.chat([{"role": "user", "content": text}], max_tokens=n, temperature=0.0)
            return out["choices"][0]["message"]["content"]
        yield answer


def run(args, **kw):
    return subprocess.run(RUN + args, capture_output=True, text=True, timeout=300, **kw)


def test_one_shot_prompt(smol_path, expected):
    r = run([smol_path, "-p", "What is the capital of France?", "--temp", "0", "-n", "24"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected("What is the capital of France?", 24) + "\n"
    assert "warning" not in r.stderr   # the default threads (physical cores) fit the CPUs


def test_piped_stdin_and_verbose(smol_path, expected):
    r = run([smol_path, "--temp", "0", "-n", "24", "--verbose"], input="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected("What is the capital of France?", 24) + "\n"
    assert "t/s" in r.stderr


@pytest.mark.slow
def test_same_seed_same_answer(smol_path):
    a = run([smol_path, "-p", "Tell me a joke.", "--seed", "7", "-n", "20"])
    b = run([smol_path, "-p", "Tell me a joke.", "--seed", "7", "-n", "20"])
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags,msg", [(["--temp", "-1"], "temperature"), (["--top-p", "0"], "top_p"),
                                       (["-t", "0"], "threads"), (["-c", "0"], "ctx"),
                                       (["-n", "-3"], "max-tokens")])
def test_bad_flags_are_clear_errors(smol_path, flags, msg):
    r = run([smol_path, "-p", "hi"] + flags)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    r = run([str(tmp_path / "nope.bin"), "-p", "hi"])
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope.bin" in r.stderr


def test_help_explains():
    r = subprocess.run([sys.executable, "-m", "llamacpu", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("--system", "--temp", "--top-k", "--ctx-size", "/reset", "Ctrl-C"):
        assert word in r.stdout


class Pty:
    def __init__(self, argv, env=None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            default_sigint()   # even if our parent ignores SIGINT (`cmd &`)
            os.execvpe(argv[0], argv, env or os.environ)
        self.buf = b""

    def read_until(self, token: bytes, timeout=120.0):
        end = time.time() + timeout
        while token not in self.buf:
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {token!r}; screen so far:\n{self.buf.decode(errors='replace')}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                self.buf += data
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out.decode(errors="replace")

    def send(self, s: str):
        os.write(self.fd, s.encode())

    def wait(self, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                r, _, _ = select.select([self.fd], [], [], 0.2)
                if r:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("REPL did not exit")


def test_repl_interrupt_reset_exit(smol_path, tmp_path, expected):
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path), TERM="dumb")
    p = Pty(RUN + [smol_path, "--temp", "0", "-n", "400", "--verbose"], env=env)
    p.read_until(b"> ")
    p.send("Write a very long story about a dragon and a knight.\r")
    p.read_until(b" ", timeout=120)    # the reply has started streaming
    time.sleep(0.3)
    p.send("\x03")                     # Ctrl-C: stop the reply, keep the conversation
    p.read_until(b"[interrupted]")
    assert "finish: cancelled]" in p.read_until(b"]")   # --verbose's stats say so (not "finish: None")
    p.read_until(b"> ")
    p.send("/reset\r")
    p.read_until(b"[conversation reset]")
    p.read_until(b"> ")
    p.send("What is the capital of France?\r")
    reply = p.read_until(b"> ", timeout=120)
    # after /reset the conversation is fresh: the greedy reply is the one-shot reply
    want = expected("What is the capital of France?", 400)
    assert want[:40] in reply.replace("\r\n", "\n")  # the terminal turns \n into \r\n
    p.send("/exit\r")
    assert p.wait() == 0


def test_repl_verbose_counts_cached_prompt_tokens_apart(smol_path, tmp_path):
    """--verbose: a second turn's prompt is mostly the first's, whose K/V the slot kept; the
    stats line tells the cached tokens from the evaluated ones (and t/s counts those only)."""
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path), TERM="dumb")
    p = Pty(RUN + [smol_path, "--temp", "0", "-n", "8", "--verbose"], env=env)
    stats = re.compile(r"\[prompt (\d+) tokens: (\d+) cached, (\d+) evaluated, [\d.]+ t/s; generated \d+ tokens")
    lines = []
    for text in ("Name a color.", "Another one."):
        p.read_until(b"> ")
        p.send(text + "\r")
        lines.append(p.read_until(b"]", timeout=120))
    first, second = (tuple(map(int, stats.search(s).groups())) for s in lines)
    assert first[1] == 0 and first[2] == first[0]
    assert second[1] >= first[0] and second[1] + second[2] == second[0]
    p.send("/exit\r")
    assert p.wait() == 0


@pytest.mark.slow
def test_repl_ctrl_d_exits(smol_path, tmp_path):
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path), TERM="dumb")
    p = Pty(RUN + [smol_path], env=env)
    p.read_until(b"> ")
    p.send("/help\r")
    p.read_until(b"/system")
    p.read_until(b"> ")
    p.send("\x04")
    assert p.wait() == 0


@pytest.mark.slow
def test_default_model_is_fetched_converted_and_cached(tmp_path):
    """The README's first command on a fresh machine: `llamacpu run -p "Hello"`."""
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path))
    r = subprocess.run(RUN + ["-p", "Hello", "-n", "8"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "fetching the default model" in r.stderr
    assert r.stdout.strip()
    assert any(p.suffix == ".llamacpu" for p in tmp_path.iterdir())
    r2 = subprocess.run(RUN + ["-p", "Hello", "-n", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0 and "fetching" not in r2.stderr


@pytest.mark.slow
def test_repl_context_full_drops_oldest_turns_and_goes_on(smol_path, tmp_path):
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path), TERM="dumb")
    p = Pty(RUN + [smol_path, "--temp", "0", "-n", "24", "-c", "256", "--system", "You are terse."], env=env)
    p.read_until(b"> ")
    screen = ""
    for i in range(10):   # each turn is ~50 tokens: the context of 256 is full after a few
        p.send(f"Tell me fact number {i} about the ocean, its waves and its many creatures.\r")
        screen += p.read_until(b"\n> ", timeout=120)
        if "[context full" in screen:
            break
    assert re.search(r"\[context full: dropped the oldest \d+ messages \(\d+ tokens\) to fit -c 256\]", screen)
    assert "error" not in screen
    # a message that alone does not fit the context: an error line, it is not sent, the chat goes on
    p.send("ocean " * 300 + "\r")
    out = p.read_until(b"\n> ", timeout=120)
    assert "error: the system prompt and the newest message alone are" in out and "was not sent" in out
    assert "a larger -c/--ctx-size" in out and "n_ctx" not in out   # the flag the user typed
    p.send("What colour is the sky?\r")
    out = p.read_until(b"\n> ", timeout=120)
    assert "error" not in out and len(out.split("sky?", 1)[-1].strip(" \r\n>")) > 0
    p.send("/exit\r")
    assert p.wait() == 0
