"""Command-line value types shared by the `runtime` commands (runtime/cli.py, runtime/transcribe_many.py)."""

from __future__ import annotations

import click

from contracts import COMPUTE_TYPES

# --compute-type, as every `runtime` command that loads a model spells it
compute_type_option = click.option(
    "--compute-type", type=click.Choice(COMPUTE_TYPES), default="exact", show_default=True,
    help="exact: the checkpoint's own values (openai-whisper's tokens); int8: the int8 build "
         "(make compile DECODER_WEIGHTS=int8; CPU, faster, not token-identical)")


class _OptionalNumber(click.ParamType):
    """A number of type `cast`, or 'none' for None (openai-whisper's CLI spelling of "off")."""

    cast: type
    noun: str

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, self.cast):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return self.cast(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither {self.noun} nor 'none'", param, ctx)


class OptionalFloat(_OptionalNumber):
    name = "float|none"
    cast = float
    noun = "a number"


class OptionalInt(_OptionalNumber):
    name = "integer|none"
    cast = int
    noun = "an integer"
