"""Does a prompt fit the context? Checked before a request queues (a 400 now, not after the wait)."""
from __future__ import annotations

from .errors import bad as _bad


def _check_prompt(llm, job: dict) -> int:
    """Render and tokenize the prompt as the Llama will; 400 if it is empty or does not fit."""
    try:
        if "messages" in job:
            ids = llm.tokenize(llm.apply_chat_template(job["messages"], tools=job["tools"]))
            what = "your messages"
        elif isinstance(job["prompt"], str):
            ids = llm.tokenize(job["prompt"])
            what = "your prompt"
        else:
            ids = llm._prompt_ids(job["prompt"])
            what = "your prompt"
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "messages" if "messages" in job else "prompt") from None
    if not ids:
        raise _bad("the prompt is empty", "prompt")
    if len(ids) >= llm.n_ctx:
        raise _bad(f"This model's maximum context length is {llm.n_ctx} tokens; {what} resulted in "
                   f"{len(ids)} tokens, which leaves no room for a reply. Shorten the prompt or start the "
                   f"server with a larger --ctx-size.", "messages" if "messages" in job else "prompt",
                   "context_length_exceeded")
    return len(ids)
