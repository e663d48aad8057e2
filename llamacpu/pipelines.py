"""pipeline("text-generation"): the transformers-style entry point over llamacpu.Llama.

(Named pipelines.py, as in transformers: a submodule named `pipeline` would replace the
function `llamacpu.pipeline` on the package once imported.)
"""
from __future__ import annotations

from .llama import Llama


def pipeline(task: str, model, **kwargs):
    """A transformers-style pipeline: pipeline("text-generation", model="model.bin").

    pipe(messages, max_new_tokens=256)[0]["generated_text"][-1] is the assistant's
    message dict; a string input returns the prompt followed by its continuation."""
    if task != "text-generation":
        raise ValueError(f"only the 'text-generation' task is supported, not {task!r}")
    llm = model if isinstance(model, Llama) else Llama(model, **kwargs)
    return TextGenerationPipeline(llm)


class TextGenerationPipeline:
    def __init__(self, llm: Llama):
        self.llm = llm

    def __call__(self, inputs, max_new_tokens: int = 256, do_sample: bool | None = None, temperature=None,
                 top_p=None, top_k=None, return_full_text: bool = True, **kw):
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, **kw}
        if do_sample is False:
            sampling["temperature"] = 0.0
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if isinstance(inputs, str):
            text = self.llm.generate(inputs, max_tokens=max_new_tokens, stream=False, **sampling)
            return [{"generated_text": (inputs + text) if return_full_text else text}]
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
            out = self.llm.chat(list(inputs), max_tokens=max_new_tokens, **sampling)
            msg = out["choices"][0]["message"]
            reply = {"role": "assistant", "content": msg["content"] if msg["content"] is not None else ""}
            if "tool_calls" in msg:
                reply["tool_calls"] = msg["tool_calls"]
            return [{"generated_text": list(inputs) + [reply]}]
        if isinstance(inputs, (list, tuple)):
            return [self(x, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, return_full_text=return_full_text, **kw) for x in inputs]
        raise TypeError("inputs must be a string, a list of chat messages, or a list of those")
