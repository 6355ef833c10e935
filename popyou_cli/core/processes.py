"""The processes of one `accelerate launch` (or torchrun): work that only the main process does, and its refusal.

A one-line PopyouError raised on the main process alone would leave every other process waiting at the next
barrier forever; `on_main_process` sends it to all of them, so each one stops with the same line.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from popyou_cli.core.errors import PopyouError

T = TypeVar("T")


def on_main_process(state, work: Callable[[], T]) -> T | None:
    """work() on the main process of `state` (accelerate's PartialState or Accelerator), then its PopyouError, if
    any, on every process (the others raise it with the same text). Returns work's result on the main process,
    None on the others."""
    result, error, message = None, None, None
    if state.is_main_process:
        try:
            result = work()
        except PopyouError as e:
            error, message = e, str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if error is not None:
        raise error
    if message is not None:
        raise PopyouError(message)
    return result
