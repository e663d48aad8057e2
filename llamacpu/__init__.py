"""llamacpu: Llama 3.2 on ordinary CPUs."""

__version__ = "0.1.0"

from .errors import ContextOverflowError, ModelFormatError  # noqa: E402,F401
from .model import Model  # noqa: E402,F401


def __getattr__(name):  # the chat layer loads lazily (jinja2, tokenizers)
    if name == "Llama":
        from .llama import Llama
        return Llama
    if name == "pipeline":
        from .pipelines import pipeline
        return pipeline
    raise AttributeError(f"module 'llamacpu' has no attribute {name!r}")


__all__ = ["Model", "Llama", "pipeline", "ModelFormatError", "ContextOverflowError", "__version__"]
