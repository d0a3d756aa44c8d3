"""What a request did wrong, as A1111 reports it: a status code and one sentence."""


class ApiError(Exception):
    """A 4xx (or 503) answer: `message` says what is wrong and how to fix it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def invalid(message: str) -> ApiError:
    """A request whose values the runtime cannot do: A1111's 422."""
    return ApiError(422, message)
