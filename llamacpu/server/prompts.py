"""Does a prompt fit the context? Checked before a request queues (a 400 now, not after the wait).

Tokenizing costs time and memory in proportion to the text (a 4 MiB message took 22 s
and 1 GB), and holds the tokenizer's lock meanwhile. No token is longer than the model's
longest token, so a prompt of more than n_ctx * that many bytes cannot fit, and is
refused from its length alone, before it is tokenized.
"""
from __future__ import annotations

from ..context_fit import fit_oldest, reply_room
from ..errors import ContextOverflowError
from .errors import bad
from .parse import ChatRequest


class PromptCheck:
    """check(request) -> the prompt's token count, or a 400 (empty, does not fit the context)."""

    def __init__(self, llm):
        self.llm, self.n_ctx = llm, llm.n_ctx
        tok = llm.tokenizer
        self.longest_token = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
        # (Text of bytes the vocabulary has no token for tokenizes to nothing, so such
        # text can be shorter in tokens than this; it is refused all the same.)
        self.max_bytes = self.n_ctx * self.longest_token

    def check(self, job) -> int:
        """job: a parse.ChatRequest or CompletionRequest"""
        chat = isinstance(job, ChatRequest)
        if not chat and not isinstance(job.prompt, str):
            return len(job.prompt)   # token ids: parse_completion checked them
        if chat and job.truncate == "oldest":
            return self.fit(job)
        what, param = ("your messages", "messages") if chat else ("your prompt", "prompt")
        drop = ', send "truncate": "oldest" to drop the oldest turns,' if chat else ""
        try:
            text = self.llm.apply_chat_template(job.messages, tools=job.tools) if chat else job.prompt
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > self.max_bytes:
                raise bad(f"This model's maximum context length is {self.n_ctx} tokens; {what} came to {size} "
                           f"bytes, more than {self.n_ctx} tokens of at most {self.longest_token} bytes can "
                           f"hold. Shorten the prompt{drop} or start the server with a larger --ctx-size.", param,
                           "context_length_exceeded")
            ids = self.llm.tokenize_chat(job.messages, tools=job.tools) if chat else self.llm.tokenize(text)
        except (ValueError, TypeError) as e:
            raise bad(str(e), param) from None
        if not ids:
            raise bad("the prompt is empty", param)
        if len(ids) >= self.n_ctx:
            raise bad(f"This model's maximum context length is {self.n_ctx} tokens; {what} resulted in "
                       f"{len(ids)} tokens, which leaves no room for a reply. Shorten the prompt{drop} or start "
                       f"the server with a larger --ctx-size.", param, "context_length_exceeded")
        return len(ids)

    def fit(self, job: ChatRequest) -> int:
        """"truncate": "oldest": job.messages becomes the messages kept (context_fit.py),
        job.truncated what was dropped; the prompt's token count, or a 400. A conversation
        past the byte bound is not tokenized whole: turns are dropped until it is under it."""
        llm, tools = self.llm, job.tools

        def ids_of(messages):
            text = llm.apply_chat_template(messages, tools=tools)
            if len(text.encode("utf-8", "surrogatepass")) > self.max_bytes:
                return None
            return llm.tokenize_chat(messages, tools=tools)
        try:
            fit = fit_oldest(job.messages, ids_of, self.n_ctx, reply_room(self.n_ctx, job.max_tokens))
        except ContextOverflowError as e:
            raise bad(f"This model's maximum context length is {self.n_ctx} tokens; {e}", "messages",
                      "context_length_exceeded") from None
        except (ValueError, TypeError) as e:   # the template's, a message's
            raise bad(str(e), "messages") from None
        job.messages, job.truncated = fit.messages, fit.dropped
        return len(fit.ids)
