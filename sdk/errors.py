"""The one error root of ibc: every expected failure (bad input, missing files, a tampered bundle,
an unreachable server) is an :class:`IbcError`. Each CLI catches it and prints one line; anything
else is a bug and keeps its traceback.

Torch-free on purpose: the SDK, the exporter and the trainer all import it.
"""

from __future__ import annotations


class IbcError(Exception):
    """An expected failure; the message names the file, key or server at fault."""


__all__ = ["IbcError"]
