"""APIError: every error the server answers, in OpenAI's shape."""
from __future__ import annotations


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None) -> APIError:
    """A 400."""
    return APIError(400, message, param=param, code=code)


def api_error(exc: BaseException) -> APIError:
    """An exception from the generation side as an APIError."""
    from ..errors import ContextOverflowError
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return bad(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):  # the Llama's own checks, template errors
        return bad(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")
