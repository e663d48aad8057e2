"""`llamacpu batch`: OpenAI Batch API files answered by the real SmolLM2 model (temperature 0).

Rows must equal what Llama.chat answers for the same body, one per custom_id; lines that are
not requests become error rows; a rerun resumes (a partial last line included); Ctrl-C leaves
a valid OUT; on a local Ray cluster the CLI's --ray gives the same rows, a killed actor's
requests are retried (none lost, none written twice), and the Ray Data recipe in
examples/ works.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from llamacpu import Llama
from llamacpu.batch import LocalRunner, OutFile, run_batch
from conftest import default_sigint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CTX = 1024

PROMPTS = ["Name a river.", "Name a lake.", "What is 2 + 2?", "Say hello in French.",
           "Name a colour.", "What is the capital of France?", "Name a fruit.", "Count to three."]


def body(i: int, prompt: str) -> dict:
    b = {"model": "ignored", "messages": [{"role": "user", "content": prompt}], "max_tokens": 10 + i % 3 * 4,
         "temperature": 0}
    if i == 1:
        b["messages"].insert(0, {"role": "system", "content": "You answer in one word."})
    if i == 2:
        b["stop"] = ["."]
    if i == 3:
        b.update(seed=7, top_p=0.9, max_completion_tokens=12)   # still greedy at temperature 0
    return b


def request(cid: str, b: dict, url="/v1/chat/completions") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": b})


REQUESTS = {f"q{i}": body(i, p) for i, p in enumerate(PROMPTS)}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_rows(path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_id(rows) -> dict:
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"custom_ids written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {r["custom_id"]: r for r in rows}


def core(completion: dict) -> dict:
    """A chat.completion without what differs between two calls (id, created)."""
    return {"object": completion["object"], "choices": completion["choices"], "usage": completion["usage"]}


@pytest.fixture(scope="module")
def llm(smollm_model, chunk_invariant_kernels):
    with Llama(smollm_model, n_ctx=N_CTX, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def reference(llm):
    """What Llama.chat answers for each body of REQUESTS, called directly."""
    out = {}
    for cid, b in REQUESTS.items():
        kw = {k: v for k, v in b.items() if k not in ("model", "max_completion_tokens")}
        if "max_completion_tokens" in b:
            kw["max_tokens"] = b["max_completion_tokens"]
        out[cid] = core(llm.chat(**kw))
    return out


def check_answers(rows: dict, reference: dict, ids=None):
    for cid in (ids or reference):
        r = rows[cid]
        assert r["error"] is None and r["id"].startswith("batch_req_"), r
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"].startswith("req_"), r
        assert core(r["response"]["body"]) == reference[cid], cid


def local(llm, parallel=3):
    return lambda: LocalRunner(llm, parallel)


def test_rows_equal_direct_chat_calls(llm, reference, tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [request(c, b) for c, b in REQUESTS.items()])
    out = tmp_path / "out.jsonl"
    s = run_batch(inp, out, local(llm), quiet=True)
    assert s == {"total": 8, "skipped": 0, "written": 8, "failed": 0, "interrupted": False}
    rows = by_id(read_rows(out))
    assert set(rows) == set(REQUESTS)
    check_answers(rows, reference)


def test_lines_that_are_not_requests_become_error_rows(llm, reference, tmp_path, capsys):
    long_text = "word " * (N_CTX * 2)
    lines = [
        request("ok", REQUESTS["q0"]),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": REQUESTS["q0"]}),
        json.dumps({"custom_id": 7, "url": "/v1/chat/completions", "body": REQUESTS["q0"]}),
        request("ok", REQUESTS["q1"]),                                   # a repeated custom_id
        request("url", REQUESTS["q0"], url="/v1/embeddings"),
        request("completions", {"prompt": "Once"}, url="/v1/completions"),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": REQUESTS["q0"]}),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions", "body": [1]}),
        "[1, 2]",
        "",                                                              # blank lines are not requests
        request("hot", {**REQUESTS["q0"], "temperature": 5}),
        request("empty", {"messages": []}),
        request("stream", {**REQUESTS["q0"], "stream": True}),
        request("role", {"messages": [{"role": "wizard", "content": "hi"}]}),
        request("long", {"messages": [{"role": "user", "content": long_text}]}),
        request("format", {**REQUESTS["q0"], "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nope"}}}}),
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    s = run_batch(inp, out, local(llm), quiet=True)
    assert s["total"] == len(lines) - 1 and s["written"] == s["total"] and s["failed"] == s["total"] - 1
    rows = read_rows(out)
    assert len(rows) == s["total"]
    line_errors = {r["error"]["line"]: r for r in rows if r["response"] is None}
    assert {n: (r["custom_id"], r["error"]["code"]) for n, r in line_errors.items()} == {
        2: (None, "invalid_json"), 3: (None, "invalid_custom_id"), 4: (None, "invalid_custom_id"),
        5: ("ok", "duplicate_custom_id"), 6: ("url", "invalid_url"), 7: ("completions", "unsupported_url"),
        8: ("get", "invalid_method"), 9: ("nobody", "invalid_body"), 10: (None, "invalid_json")}
    for n, r in line_errors.items():
        assert r["error"]["message"].startswith(f"line {n}: ") and r["id"].startswith("batch_req_")
    answered = by_id([r for r in rows if r["response"] is not None])
    check_answers(answered, {"ok": reference["q0"]}, ["ok"])
    params = {}
    for cid in ("hot", "empty", "stream", "role", "long", "format"):
        resp = answered[cid]["response"]
        assert resp["status_code"] == 400 and answered[cid]["error"] is None, resp
        err = resp["body"]["error"]
        assert err["type"] == "invalid_request_error" and err["message"], err
        params[cid] = err["param"], err["code"]
    assert params == {"hot": ("temperature", None), "empty": ("messages", None), "stream": ("stream", None),
                      "role": ("messages[0].role", None), "long": ("messages", "context_length_exceeded"),
                      "format": ("response_format", "invalid_schema")}
    # a rerun has nothing to do: no model is loaded
    def no_model():
        raise AssertionError("nothing to run, yet a runner was made")
    s = run_batch(inp, out, no_model, quiet=True)
    assert s["skipped"] == s["total"] and s["written"] == 0
    assert len(read_rows(out)) == len(rows)


@pytest.mark.slow
def test_resume_skips_done_rows_and_cuts_a_partial_last_line(llm, reference, tmp_path):
    ids = list(REQUESTS)
    inp = write_lines(tmp_path / "in.jsonl", [request(c, REQUESTS[c]) for c in ids])
    full = tmp_path / "full.jsonl"
    run_batch(inp, full, local(llm), quiet=True)
    lines = full.read_text().splitlines(keepends=True)
    # an interrupted run: three rows written, the fourth cut off by the kill
    out = tmp_path / "out.jsonl"
    kept = "".join(lines[:3])
    out.write_text(kept + lines[3][:len(lines[3]) // 2])
    done = {json.loads(x)["custom_id"] for x in lines[:3]}
    answered = []

    class Counting(LocalRunner):
        def results(self, bodies):
            for row in super().results(bodies):
                answered.append(row["custom_id"])
                yield row

    err = []
    s = run_batch(inp, out, lambda: Counting(llm, 2), stream=_Lines(err))
    assert s["skipped"] == 3 and s["written"] == 5 and s["total"] == 8
    assert sorted(answered) == sorted(set(ids) - done)
    assert any("last line was incomplete" in e for e in err)
    assert "batch [" in err[-1] and "8/8 requests" in err[-1] and "tok/s" in err[-1]   # the progress line
    text = out.read_text()
    assert text.startswith(kept)     # rows already written are kept as they were
    rows = by_id(read_rows(out))
    assert set(rows) == set(ids)
    check_answers(rows, reference)


class _Lines:
    """A text stream that keeps what is written (not a TTY)."""

    def __init__(self, into):
        self.into = into

    def write(self, s):
        self.into.append(s)

    def flush(self):
        pass

    def isatty(self):
        return False


def test_in_changed_while_running_stops_the_job(llm, tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [request("a", REQUESTS["q0"])])
    out = tmp_path / "out.jsonl"

    def runner():   # IN is rewritten after it was read, before its request runs
        write_lines(inp, [request("b", REQUESTS["q0"])])
        return LocalRunner(llm, 1)
    with pytest.raises(ValueError, match="line 1 changed while the job ran"):
        run_batch(inp, out, runner, quiet=True)
    assert out.read_text() == ""


def test_out_must_be_a_batch_output_and_is_locked(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("hello\n")
    with pytest.raises(ValueError, match="line 1 is not a batch output row"):
        OutFile(out)
    out.write_text("")
    first = OutFile(out)
    try:
        with pytest.raises(OSError, match="another llamacpu batch is writing"):
            OutFile(out)
    finally:
        first.close()
    OutFile(out).close()


def run_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "llamacpu", "batch", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.slow
def test_cli_help_and_flag_checks(tmp_path):
    r = run_cli("--help", timeout=60)
    assert r.returncode == 0
    for words in ("custom_id", "batch_req_", "status_code", "resume", "--ray", "order"):
        assert words in r.stdout, words
    inp = write_lines(tmp_path / "in.jsonl", [request("a", REQUESTS["q0"])])
    for flags, msg in ((["--parallel", "0"], "--parallel must be >= 1"),
                       (["--ray-actors", "2"], "--ray-actors and --ray-cpus need --ray")):
        r = run_cli(inp, tmp_path / "out.jsonl", *flags, timeout=60)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    r = run_cli(tmp_path / "missing.jsonl", tmp_path / "out.jsonl", timeout=60)
    assert r.returncode == 1 and "no such file" in r.stderr


@pytest.mark.slow
def test_cli_ctrl_c_leaves_a_valid_out_and_a_rerun_finishes(llm, reference, smollm_model, tmp_path):
    # the same eight bodies four times over: enough work that Ctrl-C comes long before the end
    ids = {f"{c}-{k}": c for k in range(4) for c in REQUESTS}
    inp = write_lines(tmp_path / "in.jsonl", [request(i, REQUESTS[c]) for i, c in ids.items()])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llamacpu", "batch", str(inp), str(out), "--model",
                             str(smollm_model), "-c", str(N_CTX), "-t", "1", "--parallel", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    t0 = time.monotonic()
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        if proc.poll() is not None:
            pytest.fail(f"batch ended (rc {proc.returncode}) before any row: {proc.stderr.read()}")
        if time.monotonic() - t0 > 240:
            proc.kill()
            pytest.fail("no row written in 240 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted:" in err.strip().splitlines()[-1], err
    rows = by_id(read_rows(out))          # every line whole, no custom_id twice
    assert 1 <= len(rows) < len(ids)
    check_answers(rows, {i: reference[ids[i]] for i in rows})
    s = run_batch(inp, out, local(llm, 2), quiet=True)
    assert s["skipped"] == len(rows) and s["written"] == len(ids) - len(rows)
    rows = by_id(read_rows(out))
    assert set(rows) == set(ids)
    check_answers(rows, {i: reference[ids[i]] for i in rows})


# ----------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster(chunk_invariant_kernels):
    """A local Ray of 2 CPUs in this process; its workers import this checkout's llamacpu and
    use the module's kernel table (they inherit this environment)."""
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                       namespace="llamacpu-test-batch")
        yield ray, ctx.address_info["address"]
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)   # ray.init's handler outlives shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.slow
def test_ray_cli_gives_the_rows_of_a_local_run(ray_cluster, reference, smollm_model, tmp_path):
    _, address = ray_cluster
    inp = write_lines(tmp_path / "in.jsonl", [request(c, b) for c, b in REQUESTS.items()] + ["{bad"])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    r = run_cli(inp, out, "--model", smollm_model, "-c", N_CTX, "--ray", address, "--ray-actors", 2,
                "--ray-cpus", 1, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 Ray actors" in r.stderr
    rows = read_rows(out)
    assert [r["error"]["code"] for r in rows if r["error"]] == ["invalid_json"]
    more = write_lines(tmp_path / "more.jsonl", [request("more", REQUESTS["q0"])])
    r = run_cli(more, out, "--model", smollm_model, "--ray", address, "--ray-actors", 3, "--ray-cpus", 1, env=env)
    assert r.returncode == 1 and "3 actors of 1 CPUs do not fit" in r.stderr, r.stderr   # not a wait forever
    rows = by_id([r for r in rows if not r["error"]])
    assert set(rows) == set(REQUESTS)
    check_answers(rows, reference)


@pytest.mark.slow
def test_ray_killed_actor_rows_are_retried_not_lost_or_repeated(ray_cluster, reference, smollm_model, tmp_path):
    ray, _ = ray_cluster
    from llamacpu.batch_ray import NAME_PREFIX, ray_runner_factory

    ids = {f"{c}-{k}": c for k in range(4) for c in REQUESTS}
    inp = write_lines(tmp_path / "in.jsonl", [request(i, REQUESTS[c]) for i, c in ids.items()])
    out = tmp_path / "out.jsonl"
    result = {}

    def job():
        try:
            result["summary"] = run_batch(inp, out, ray_runner_factory(
                str(smollm_model), actors=2, cpus=1, n_ctx=N_CTX, n_threads=1, quiet=True), quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    th = threading.Thread(target=job)
    th.start()
    t0 = time.monotonic()
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert th.is_alive(), result
        assert time.monotonic() - t0 < 240, "no rows from the Ray actors in 240 s"
        time.sleep(0.01)
    names = sorted(n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors())
    names = [n for n in names if n.startswith(NAME_PREFIX)]
    assert len(names) == 2, names
    actor = ray.get_actor(names[0])
    pid = ray.get(actor.pid.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)           # the actor's process, mid-run
    # Ray restarts it: the job cannot end before the restarted actor has run again the request it
    # had in flight (it always has one: 30 requests are still to come), so this call is answered
    assert ray.get(actor.pid.remote(), timeout=240) != pid
    th.join(timeout=300)
    assert not th.is_alive(), "the batch did not finish after an actor was killed"
    assert "error" not in result, result
    assert result["summary"]["written"] == len(ids)
    rows = by_id(read_rows(out))
    assert set(rows) == set(ids)
    check_answers(rows, {i: reference[ids[i]] for i in rows})


@pytest.mark.slow
def test_ray_data_recipe(ray_cluster, reference, smollm_model, tmp_path):
    spec = importlib.util.spec_from_file_location("ray_data_batch", os.path.join(ROOT, "examples", "ray_data_batch.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    inp = write_lines(tmp_path / "in.jsonl", [request(c, b) for c, b in REQUESTS.items()])
    out = tmp_path / "out.jsonl"
    assert recipe.run(inp, out, model=str(smollm_model), actors=1, cpus=1, batch_size=3) == len(REQUESTS)
    rows = by_id(read_rows(out))
    assert set(rows) == set(REQUESTS)
    check_answers(rows, reference)


@pytest.mark.slow
def test_truncate_oldest_row_says_what_was_dropped(llm):
    from llamacpu.batch import Answerer
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(30):   # ~1,800 tokens: more than the context of 1024
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                 {"role": "assistant", "content": f"Fact {i}: " + "the sea is deep and wide. " * 6}]
    msgs.append({"role": "user", "content": "Name a fish."})
    b = {"messages": msgs, "max_tokens": 6, "temperature": 0}
    row = Answerer(llm).answer("long", b)
    assert row["response"]["status_code"] == 400
    assert row["response"]["body"]["error"]["code"] == "context_length_exceeded"
    row = Answerer(llm).answer("long", {**b, "truncate": "oldest"})
    assert row["response"]["status_code"] == 200, row
    assert core(row["response"]["body"]) == core(llm.chat(msgs, max_tokens=6, temperature=0, truncate="oldest"))
    assert row["response"]["body"]["usage"]["truncated"]["messages"] > 0
