"""Bad arguments: clear errors from the API and the CLI, never a crash or a silent truncation.

API: ValueError (ContextOverflowError for a forward past n_ctx) whose message names the
parameter. CLI: a non-zero exit and exactly one line on stderr, naming the flag, no
traceback.
"""
import math
import os
import subprocess
import sys

import pytest

import llamacpu
from conftest import llama_1b_config
from llamacpu.errors import ContextOverflowError
from llamacpu.llama import Llama
from llamacpu.sampling import SamplingParams

LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 8  # > 64 tokens


@pytest.fixture(scope="module")
def model_path(converted):
    return str(converted("tiny64", "q4_0"))  # shared with test_bench / test_chat_template


@pytest.fixture(scope="module")
def llm(model_path):
    with Llama(model_path, n_ctx=64, n_threads=1) as m:
        yield m


# ----------------------------------------------------------------------------- API: Model

@pytest.mark.parametrize("n_ctx", [0, -1, True, 2.0, "8", 10 ** 12])
def test_model_n_ctx(model_path, n_ctx):
    with pytest.raises(ValueError, match="n_ctx"):
        llamacpu.Model(model_path, n_ctx=n_ctx, n_threads=1)


@pytest.mark.parametrize("n_threads", [0, -2, True, 1.5, 10 ** 12])
def test_model_n_threads(model_path, n_threads):
    with pytest.raises(ValueError, match="n_threads"):
        llamacpu.Model(model_path, n_ctx=8, n_threads=n_threads)


def test_model_n_threads_setter_and_forward(model_path):
    with llamacpu.Model(model_path, n_ctx=8, n_threads=1) as m:
        for bad in (0, -1, 10 ** 6):
            with pytest.raises(ValueError, match="n_threads"):
                m.n_threads = bad
        assert m.n_threads == 1
        with pytest.raises(ContextOverflowError, match="context of 8 tokens"):
            m.forward(list(range(9)), pos=0)  # never truncated to fit
        assert m.n_past == 0
        with pytest.raises(ValueError, match="pos"):
            m.forward([1], pos=-1)
        with pytest.raises(ValueError, match="non-empty"):
            m.forward([], pos=0)


# ----------------------------------------------------------------------------- API: Llama

def test_llama_constructor(model_path):
    with pytest.raises(ValueError, match="n_ctx"):
        Llama(model_path, n_ctx=0)
    with pytest.raises(ValueError, match="n_threads"):
        Llama(model_path, n_ctx=8, n_threads=0)


@pytest.mark.parametrize("stream", [False, True])
def test_negative_max_tokens(llm, stream):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hi", max_tokens=-1, stream=stream)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.chat([{"role": "user", "content": "hi"}], max_tokens=-1, stream=stream)


@pytest.mark.parametrize("name,value", [
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_k", -1), ("min_p", 1.0), ("min_p", -0.5),
    ("repeat_penalty", 0.0), ("repeat_last_n", -2), ("seed", -1),
])
def test_sampling_values(llm, name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})
    for stream in (False, True):  # refused when called, not at the first token of a stream
        with pytest.raises(ValueError, match=name):
            llm.generate("hi", max_tokens=2, stream=stream, **{name: value})
        with pytest.raises(ValueError, match=name):
            llm.chat([{"role": "user", "content": "hi"}], max_tokens=2, stream=stream, **{name: value})


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context(llm, stream):
    n = len(llm.tokenize(LONG_PROMPT))
    assert n > llm.n_ctx
    with pytest.raises(ValueError, match=f"the prompt has {n} tokens; the context holds 64"):
        llm.generate(LONG_PROMPT, max_tokens=4, stream=stream)
    with pytest.raises(ValueError, match="the context holds 64"):
        llm.chat([{"role": "user", "content": LONG_PROMPT}], max_tokens=4, stream=stream)
    with pytest.raises(ValueError, match="the context holds 64"):
        llm.generate(list(range(64)), max_tokens=1)  # token ids: exactly n_ctx leaves no room
    # the longest prompt that fits still generates
    assert isinstance(llm.generate(list(range(63)), max_tokens=1, stream=False, temperature=0), str)


# ----------------------------------------------------------------------------- CLI

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llamacpu", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_error(r, command, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"llamacpu {command}: error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, r.stderr)
    assert r.stdout == ""


def slow(*values):
    """A parametrize case that only the full run takes (the fast lane: one of each kind)."""
    return pytest.param(*values, marks=pytest.mark.slow)


@pytest.mark.parametrize("flags,words", [
    (["-c", "0"], ["--ctx-size"]),
    slow(["-c", "-5"], ["--ctx-size"]),
    slow(["-n", "-1"], ["--max-tokens"]),
    (["--temp", "-1"], ["--temp", "temperature"]),
    slow(["--temp", "nan"], ["--temp"]),
    slow(["--top-p", "0"], ["--top-p", "top_p"]),
    slow(["--top-p", "1.5"], ["--top-p"]),
    slow(["--top-k", "-1"], ["--top-k"]),
    slow(["--min-p", "1"], ["--min-p"]),
    slow(["--repeat-penalty", "0"], ["--repeat-penalty"]),
    slow(["--seed", "-1"], ["--seed"]),
    (["-t", "0"], ["--threads"]),
    slow(["-t", "99999999999"], ["--threads"]),
    (["-c", "99999999999"], ["-c 99999999999", "context"]),
    (["-c", "16", "-p", LONG_PROMPT], ["the context holds 16", "-c/--ctx-size"]),
])
def test_run_bad_flags(model_path, flags, words):
    args = ["run", model_path, "-p", "hi", "-n", "2"] + flags
    if "-p" in flags:
        args = ["run", model_path, "-n", "2"] + flags
    r = cli(*args)
    assert_one_line_error(r, "run", *words)
    assert "n_ctx" not in r.stderr   # the API's name: the user typed -c


@pytest.mark.parametrize("cmd", ["serve", "perplexity", "batch"])
def test_context_errors_name_the_flag(model_path, tmp_path, cmd):
    """Every command with -c tells the API's n_ctx errors in the flag's name."""
    text = tmp_path / "in.txt"
    text.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                    '"body": {"messages": [{"role": "user", "content": "hi"}]}}\n')
    extra = {"serve": [model_path, "--port", "0"], "perplexity": [model_path, str(text)],
             "batch": [str(text), str(tmp_path / "out.jsonl"), "--model", model_path]}[cmd]
    r = cli(cmd, *extra, "-c", "99999999")
    assert_one_line_error(r, cmd, "-c 99999999", "context")
    assert "n_ctx" not in r.stderr


def test_ctx_flag_message(monkeypatch):
    import llamacpu.model as model
    from llamacpu.cli_flags import ctx_flag_message
    assert ctx_flag_message("n_ctx=9000 is larger than the model's context of 8192 tokens") == \
        "-c 9000 is larger than the model's context of 8192 tokens"
    assert ctx_flag_message("the context holds 16 (load with a larger n_ctx)") == \
        "the context holds 16 (load with a larger -c/--ctx-size)"
    # the memory check's message (Llama 3.2 1B's shapes, 1 GiB available)
    monkeypatch.setattr(model, "available_memory", lambda: 1 << 30)
    with pytest.raises(ValueError) as e:
        model._check_memory(llama_1b_config(), 131072, 512, 2)
    msg = ctx_flag_message(str(e.value))
    assert msg.startswith("-c 131072 needs ") and "load it with -c " in msg and " or less" in msg
    assert "n_ctx" not in msg


@pytest.mark.parametrize("cmd", ["run", "bench"])
def test_more_threads_than_cpus_warns_once_and_runs(model_path, cmd):
    from llamacpu.cli_flags import logical_cpus
    n = logical_cpus() + 1
    args = {"run": ["-p", "hi", "-n", "2", "--temp", "0", "-t", str(n)],
            "bench": ["-p", "4", "-n", "2", "-r", "1", "--loads", "1", "-t", f"1,{n}"]}[cmd]
    r = cli(cmd, model_path, *args)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warnings == [f"llamacpu {cmd}: warning: -t {n} is more threads than the {n - 1} logical CPUs "
                        "this process may use: decoding slows down badly when threads wait for a CPU "
                        "(without -t: one thread per physical core)"], r.stderr


def test_run_bad_flags_fail_before_the_default_model_is_fetched(tmp_path):
    """No MODEL: a bad flag must not first download and convert SmolLM2 (93 MB)."""
    env = dict(os.environ, LLAMACPU_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1")
    for flags, word in ((["--temp", "-1"], "--temp"), (["-t", "0"], "--threads"), (["-c", "0"], "--ctx-size")):
        assert_one_line_error(cli("run", "-p", "hi", *flags, env=env), "run", word)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("cmd,flag,hint", [("run", "--temperature", "--temp"), ("bench", "--threds", "--threads"),
                                           ("perplexity", "--chunk-count", "--chunks")])
def test_unknown_flag_gets_the_subcommands_usage(model_path, cmd, flag, hint):
    r = cli(cmd, model_path, *(["text.txt"] if cmd == "perplexity" else []), flag, "1")
    assert r.returncode == 2
    assert r.stderr.startswith(f"usage: llamacpu {cmd} "), r.stderr   # not the top-level usage
    assert r.stderr.rstrip().endswith(f"llamacpu {cmd}: error: unrecognized arguments: {flag} 1 "
                                      f"(did you mean {hint}?)"), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags,words", [
    (["-t", "0"], ["--threads"]),
    (["-t", "1,-2"], ["--threads"]),
    (["-t", "99999999999"], ["--threads"]),
    (["-t", "x"], ["--threads"]),
    (["-p", "-1"], ["-p"]),
    (["-n", "-1"], ["-n"]),
    (["-p", "0", "-n", "0"], ["nothing to measure"]),
    (["-r", "0"], ["-r"]),
    (["--loads", "0"], ["--loads"]),
    (["-p", "99999999999"], ["-p + -n", "context"]),
])
def test_bench_bad_flags(model_path, flags, words):
    r = cli("bench", model_path, "-p", "4", "-n", "2", "-r", "1", "--loads", "1", *flags)
    assert_one_line_error(r, "bench", *words)
