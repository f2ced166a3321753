"""The project's own error type: bad input that a user can fix (a config field, a flag, a file, a step).

Every error the project raises for bad input derives from :class:`UserError`, and its message
names what is wrong. The tools (``unimage_jax.cli.run``) print such an error as one line,
``tool.py: error: ...``, with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast


class UserError(Exception):
  """Bad input (config, flag, file, record, checkpoint); the message names it and how to fix it."""


def one_line(error: BaseException | str) -> str:
  """An error's message on one line: ``head: item; item; ...`` for multi-line listings."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__ if isinstance(error, BaseException) else ""
  head, rest = lines[0], lines[1:]
  if not rest:
    return head
  return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def message_of(error: BaseException) -> str:
  """The text of an error; KeyError/AttributeError messages arrive ``repr``-quoted and are unquoted."""
  message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      break
  return message
