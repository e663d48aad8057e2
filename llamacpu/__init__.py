"""llamacpu: Llama 3.2 on ordinary CPUs."""

__version__ = "0.1.0"

from .errors import ContextOverflowError, ModelFormatError  # noqa: E402,F401
from .model import Model  # noqa: E402,F401

__all__ = ["Model", "ModelFormatError", "ContextOverflowError", "__version__"]
