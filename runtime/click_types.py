"""Command-line value types shared by the `runtime` commands (runtime/cli.py, runtime/transcribe_many.py)."""

from __future__ import annotations

import click


class OptionalFloat(click.ParamType):
    """A number, or 'none' for None (openai-whisper's CLI spelling of "off")."""

    name = "float|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return float(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


class OptionalInt(click.ParamType):
    """An integer, or 'none' for None."""

    name = "integer|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return int(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither an integer nor 'none'", param, ctx)
