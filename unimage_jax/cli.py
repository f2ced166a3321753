"""``app.run`` for the tools: the project's own errors become one line and exit code 2.

``cli.run(main)`` replaces ``app.run(main)``. Bad flags (absl or ``--config.*`` overrides), a
``UsageError`` and any :class:`unimage_jax.errors.UserError` print ``tool.py: error: <message>``
on stderr and exit with 2, before anything is compiled; other exceptions are bugs and keep their
traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from absl import app, flags

from unimage_jax.errors import UserError, message_of, one_line

EXIT_USER_ERROR = 2


def tool_name() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "unimage"


def fail(message: str) -> NoReturn:
  """Prints ``tool: error: message`` and exits with status 2."""
  print(f"{tool_name()}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _check_config_files() -> None:
  """ml_collections defers a config file's load error to its first use: report it now instead."""
  from ml_collections.config_flags import config_flags as config_flags_lib
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if config_flags_lib.is_config_flag(flag) and flag.value is not None:
      try:
        flag.value.keys  # noqa: B018 - the placeholder of a failed load raises on any attribute
      except OSError as e:
        fail(f"--{name}={flag.serialize().split('=', 1)[-1]}: {one_line(e)}")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # get_config raised: its own message is the last line
      text = f"{text.splitlines()[0].split(':', 1)[0]}: {text.strip().splitlines()[-1]}"
    fail(f"{one_line(text)} (see --help)")
  except (AttributeError, KeyError) as e:  # an unknown --config.<field> override
    message = message_of(e)
    field = message.splitlines()[0].strip("'\"") if message else ""
    named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=", 1)[0]
             and field in a.split("=", 1)[0].split(".")[1:]]
    hint = " ".join(line.strip() for line in message.splitlines()[1:])
    fail(f"{named[0] if named else field}: no such config field" + (f" ({hint})" if hint else ""))
  _check_config_files()
  return rest


def run(main: Callable[[list[str]], None]) -> None:
  """Runs an absl ``main`` with the project's error reporting (and the CPU backend's fast dots,
  :mod:`unimage_jax.cpu_backend`, set before any backend starts)."""
  from unimage_jax import cpu_backend
  cpu_backend.configure()

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      fail(one_line(e))
    except app.UsageError as e:
      fail(one_line(e))

  app.run(wrapped, flags_parser=_parse_flags)
