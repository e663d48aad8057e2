"""Exceptions raised by llamacpu."""


class ModelFormatError(ValueError):
    """A model file (ours, GGUF or a Hugging Face folder) is malformed or unsupported.

    The message names the problem (file, field, tensor) so that a user can act on it.
    """


class ContextOverflowError(ValueError):
    """A forward call would write past the KV cache (n_ctx), or a conversation does not fit it."""


class ModelFetchError(OSError):
    """A model could not be fetched (no network, a gated or missing Hub repo, a missing
    extra). The message is one line that says what to do."""
