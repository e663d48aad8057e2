"""`llamacpu perplexity MODEL TEXTFILE`: perplexity over a text, computed as llama.cpp's
llama-perplexity computes it, so that the two engines can be compared number for number.

    llamacpu perplexity MODEL TEXTFILE [-c 512] [--chunks N] [--stride S] [-t T] [--json]

Default method (llama-perplexity's, tools/perplexity/perplexity.cpp of llama.cpp):
  1. The text file is read as UTF-8 and one trailing "\\n" is removed (llama.cpp's -f
     does the same). It is tokenized once, whole, special-token texts as plain text,
     with BOS first when the model adds one (special_tokens.add_bos_token).
  2. The ids are cut into N // n_ctx chunks of n_ctx tokens (the rest is dropped);
     at least 2 * n_ctx tokens are needed. --chunks K keeps the first K.
  3. Each chunk is evaluated on its own, from an empty KV cache at positions
     0 .. n_ctx-1, its first token replaced by BOS when the model adds one.
  4. Only the second half is scored: with first = n_ctx // 2, the logits of positions
     first .. n_ctx-2 predict the chunk's tokens first+1 .. n_ctx-1, n_ctx - first - 1
     tokens per chunk (255 for n_ctx 512), so every scored token has at least n_ctx/2
     tokens of context.
  5. nll_i = log(sum_v exp(z_v)) - z_target over the float32 logits z (in float64);
     PPL = exp(mean nll). The ± is llama.cpp's: the standard error of the mean nll,
     sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)), times PPL. After each chunk the
     running PPL is printed as llama-perplexity prints it: [1]12.3456,[2]...

--stride S (a sliding window, not llama.cpp's default): windows of n_ctx tokens start
at token 0, S, 2S, ... as long as a whole window fits; each is evaluated from an empty
cache (first token replaced by BOS when the model adds one) and scores its last S
tokens, so consecutive windows score consecutive tokens, each with at least n_ctx - S
tokens of context; the first n_ctx - S tokens of the text are never scored. This is
the window of llama-perplexity --ppl-stride, whose window length, though, is its whole
context (n_ctx times its parallel sequences, plus S/2), so its figures differ.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from .cache_types import add_cache_type_args, check_cache_type_args
from .cli_flags import warn_threads
from .progress import fmt_eta, mark_open

DEFAULT_N_CTX = 512


@dataclass(frozen=True)
class Window:
    """One evaluation: tokens[start:start + n_ctx] from an empty cache; the targets
    tokens[start + score_from : start + n_ctx] are scored, each by the logits of the
    position before it."""
    start: int
    n_ctx: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.n_ctx - self.score_from


@dataclass
class PerplexityResult:
    ppl: float                 # exp(mean nll)
    ppl_err: float             # llama.cpp's ±: standard error of the mean nll, times ppl
    nll: float                 # mean negative log-likelihood, nats per scored token
    nll_std: float             # its standard deviation over the scored tokens
    n_tokens: int              # tokens of the whole text (BOS included when added)
    n_chunks: int              # windows evaluated
    n_scored: int              # tokens scored
    n_ctx: int
    stride: int | None         # None: llama-perplexity's chunks
    add_bos: bool
    running_ppl: list = field(default_factory=list)  # PPL after each window
    seconds: float = 0.0       # time of the forward passes and the scoring
    model: str = ""
    method: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan(n_tokens: int, n_ctx: int = DEFAULT_N_CTX, stride: int | None = None,
         n_chunks: int | None = None) -> list[Window]:
    """The windows `perplexity` evaluates for a text of n_tokens tokens (see the module doc).

    ValueError when the text is too short or an argument is out of range."""
    for name, v in (("n_tokens", n_tokens), ("n_ctx", n_ctx)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n_ctx < 3:
        raise ValueError(f"the context must be at least 3 tokens, got {n_ctx}")
    if n_chunks is not None and (isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1):
        raise ValueError(f"--chunks must be a positive integer, got {n_chunks!r}")
    if stride is None:
        if n_tokens < 2 * n_ctx:
            raise ValueError(f"the text tokenizes to {n_tokens} tokens; perplexity with a context of {n_ctx} "
                             f"needs at least {2 * n_ctx} (two chunks): use a longer text or a smaller -c")
        first = n_ctx // 2
        count = n_tokens // n_ctx
        return [Window(i * n_ctx, n_ctx, first + 1) for i in range(min(count, n_chunks or count))]
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < n_ctx:
        raise ValueError(f"--stride must be an integer in [1, {n_ctx - 1}] (less than the context), got {stride!r}")
    if n_tokens < n_ctx + stride:
        raise ValueError(f"the text tokenizes to {n_tokens} tokens; windows of {n_ctx} with stride {stride} "
                         f"need at least {n_ctx + stride} (two windows): use a longer text or a smaller -c")
    count = (n_tokens - n_ctx) // stride + 1
    return [Window(i * stride, n_ctx, n_ctx - stride) for i in range(min(count, n_chunks or count))]


def token_nll(logits, targets, rows_per_block: int = 32):
    """Negative log-likelihood of each target under its row of logits, in float64
    (log-sum-exp less the target's logit), a block of rows at a time to bound memory."""
    import numpy as np

    logits = np.asarray(logits)
    targets = np.asarray(targets)
    out = np.empty(logits.shape[0], dtype=np.float64)
    for r in range(0, logits.shape[0], rows_per_block):
        z = logits[r:r + rows_per_block].astype(np.float64)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        out[r:r + rows_per_block] = lse - z[np.arange(z.shape[0]), targets[r:r + rows_per_block]]
    return out


def read_text(path) -> str:
    """The text file as llama-perplexity's -f reads it: whole, one trailing "\\n" removed.
    "-" reads standard input. ValueError when it is not UTF-8."""
    if os.fspath(path) == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        with open(path, "rb") as f:
            data = f.read()
        name = os.fspath(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    if text.endswith("\n"):
        text = text[:-1]
    return text


def _special(model) -> tuple[bool, int | None]:
    st = dict((model.metadata or {}).get("special_tokens") or {})
    bos = st.get("bos_token_id")
    return bool(st.get("add_bos_token")) and bos is not None, bos


def perplexity(model, text, n_ctx: int = DEFAULT_N_CTX, stride: int | None = None, n_chunks: int | None = None,
               n_threads=None, progress=None) -> PerplexityResult:
    """Perplexity of `model` over `text` (the module doc gives the method).

    model: a llamacpu.Model (its n_ctx must be >= n_ctx) or the path of a model file
        (loaded with n_ctx and n_threads, closed afterwards).
    text: a str (tokenized with BOS when the model adds one), or a sequence of token ids
        used as they are.
    progress: called after each window as progress(i, n_windows, running_ppl, seconds).
    """
    import numpy as np

    from .model import Model

    own = not hasattr(model, "forward")
    if own:
        model = Model(model, n_ctx=n_ctx, n_threads=n_threads)
    try:
        if n_ctx > model.n_ctx:
            raise ValueError(f"n_ctx={n_ctx} is larger than the model's context of {model.n_ctx} tokens")
        add_bos, bos = _special(model)
        if isinstance(text, str):
            from .tokenizer import Tokenizer
            tok = Tokenizer.from_metadata(model.metadata)
            ids = tok.encode(text, special=False, add_bos=add_bos)
        else:
            ids = [int(t) for t in text]
        tokens = np.asarray(ids, dtype=np.int32)
        windows = plan(len(tokens), n_ctx, stride, n_chunks)

        nll = nll2 = 0.0
        count = 0
        running = []
        t0 = time.perf_counter()
        for i, w in enumerate(windows):
            chunk = tokens[w.start:w.start + w.n_ctx].copy()
            if add_bos:
                chunk[0] = bos
            # logits are needed from position score_from - 1 on: the positions before
            # it run without the output head (one call for the prefix, one for the rest)
            k = w.score_from - 1
            if k > 0:
                model.forward(chunk[:k], pos=0)
            logits = model.forward(chunk[k:], pos=k, all_logits=True)[:-1]
            v = token_nll(logits, chunk[w.score_from:])
            nll += float(v.sum())
            nll2 += float((v * v).sum())
            count += v.size
            running.append(math.exp(nll / count))
            if progress is not None:
                progress(i, len(windows), running[-1], time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
    finally:
        if own:
            model.close()

    mean = nll / count
    var = max(nll2 / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if count > 1 else float("nan")
    return PerplexityResult(
        ppl=ppl, ppl_err=err, nll=mean, nll_std=math.sqrt(var), n_tokens=int(len(tokens)),
        n_chunks=len(windows), n_scored=count, n_ctx=n_ctx, stride=stride, add_bos=add_bos,
        running_ppl=running, seconds=seconds, model=getattr(model, "path", ""),
        method="llama-perplexity chunks (second half scored)" if stride is None
        else f"sliding window (last {stride} tokens of each window scored)")


# ----------------------------------------------------------------------------- CLI

def register_perplexity(sub) -> None:
    p = sub.add_parser(
        "perplexity", help="perplexity over a text file, as llama.cpp's llama-perplexity computes it",
        description="Perplexity of MODEL over TEXTFILE, computed as llama.cpp's llama-perplexity does: "
                    "the text (UTF-8; one trailing newline removed) is tokenized whole, with BOS when "
                    "the model adds one, and cut into N // n_ctx chunks of n_ctx tokens (at least 2). "
                    "Each chunk is evaluated from an empty cache, its first token replaced by BOS when "
                    "the model adds one, and only its second half is scored: the logits of positions "
                    "n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1. PPL = exp(mean negative "
                    "log-likelihood); ± = the standard error of that mean, times PPL. The running PPL "
                    "after each chunk goes to stdout as [1]x,[2]y,... then 'Final estimate: PPL = x ± e'. "
                    "With --stride S: windows of n_ctx tokens every S tokens, each scoring its last "
                    "S tokens (docs/QUALITY.md).")
    p.add_argument("model", help="llamacpu model file, GGUF file, Hugging Face folder or Hub name org/name[:TAG] (converted once into the cache)")
    p.add_argument("textfile", help="UTF-8 text file ('-' reads standard input)")
    p.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_N_CTX,
                   help=f"tokens per chunk / window (default {DEFAULT_N_CTX}, as llama-perplexity)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate only the first N chunks (default: all)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding windows every S tokens, each scoring its last S tokens "
                        "(default: llama-perplexity's chunks)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    add_cache_type_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the running PPL")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_perplexity)


class _Progress:
    """stderr: the time per chunk and the ETA after the first chunk (as llama-perplexity),
    a progress bar when stderr is a terminal and stdout is not; stdout: the running PPL."""

    def __init__(self, print_running: bool, quiet: bool):
        self.first = 0.0
        self.print_running = print_running
        self.quiet = quiet
        self.bar = not quiet and sys.stderr.isatty() and not sys.stdout.isatty()

    def __call__(self, i, n, ppl, secs):
        if i == 0 and not self.quiet and not self.bar:
            print(f"perplexity: {secs:.2f} seconds per chunk - ETA {secs * n / 60:.2f} minutes",
                  file=sys.stderr, flush=True)
        if self.print_running:
            sys.stdout.write(f"[{i + 1}]{ppl:.4f},")
            sys.stdout.flush()
        if i == 0:
            self.first = secs
        if self.bar:
            done = (i + 1) / n
            # the first chunk also pages the model in from disk (seconds for a 1B file): the ETA
            # comes from the chunks after it once there are some
            per = secs if i == 0 else (secs - self.first) / i
            eta = per * (n - i - 1)
            bar = "=" * int(30 * done)
            sys.stderr.write(f"\r[{bar:<30}] {i + 1}/{n} chunks, PPL {ppl:.4f}, ETA {fmt_eta(eta)} ")
            if i + 1 == n:
                sys.stderr.write("\n")
            sys.stderr.flush()
            mark_open(sys.stderr, i + 1 < n)


def cmd_perplexity(args) -> int:
    from .model import Model
    from .model_cache import resolve_model

    if args.ctx_size < 3:
        raise ValueError(f"-c/--ctx-size must be at least 3, got {args.ctx_size}")
    check_cache_type_args(args)
    warn_threads("perplexity", args.threads)
    text = read_text(args.textfile)
    with Model(resolve_model(args.model), n_ctx=args.ctx_size, n_threads=args.threads,
               cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v) as m:
        if not args.quiet:
            add_bos, _ = _special(m)
            print(f"llamacpu perplexity: {args.model} ({m.kernels}, {m.n_threads} threads), "
                  f"{args.textfile}: {len(text)} characters, n_ctx {args.ctx_size}"
                  + (f", stride {args.stride}" if args.stride else "")
                  + f", BOS {'added' if add_bos else 'not added'}", file=sys.stderr, flush=True)
        prog = _Progress(print_running=not args.json, quiet=args.quiet)
        res = perplexity(m, text, n_ctx=args.ctx_size, stride=args.stride, n_chunks=args.chunks, progress=prog)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print()
    print(f"Final estimate: PPL = {res.ppl:.4f} ± {res.ppl_err:.5f}")
    if not args.quiet:
        print(f"perplexity: {res.n_tokens} tokens, {res.n_chunks} chunks of {res.n_ctx}, {res.n_scored} scored; "
              f"{res.seconds:.1f} s ({res.n_chunks * res.n_ctx / max(res.seconds, 1e-9):.0f} tokens/s evaluated)",
              file=sys.stderr)
    return 0
