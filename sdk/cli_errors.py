"""One-line errors for every ibc command line, usage errors included.

Why: a bad input must end in one line on stderr that names the file or key, never a traceback
and never click's three-line usage block (``Usage: ...`` / ``Try ... -h`` / ``Error: ...``), so
scripts and people read the same thing from every CLI. Use ``@click.command(cls=OneLineCommand)``
or ``@click.group(cls=OneLineGroup)``; usage errors keep click's exit code 2.
"""

from __future__ import annotations

import sys

import click


def one_line(message: object) -> str:
    """A message with its newlines and runs of spaces folded into single spaces."""
    return " ".join(str(message).split())


class _OneLine:
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # a caller (a test, another CLI) handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


class OneLineCommand(_OneLine, click.Command):
    """A click command whose errors, usage errors included, are one line on stderr."""


class OneLineGroup(_OneLine, click.Group):
    """A click group whose errors, usage errors included, are one line on stderr."""


__all__ = ["OneLineCommand", "OneLineGroup", "one_line"]
