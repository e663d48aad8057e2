"""llamacpu: Llama 3.2 on ordinary CPUs."""

__version__ = "0.1.0"

from .errors import ContextOverflowError, ModelFormatError  # noqa: E402,F401
