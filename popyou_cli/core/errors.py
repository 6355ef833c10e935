class PopyouError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


def short_error(err: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """A library's exception as part of a one-line message: whitespace (newlines too) collapsed, cut to about
    `limit` characters with "...", prefixed "Type: " when `with_type` (or when the message is empty)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if with_type or not text:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text
