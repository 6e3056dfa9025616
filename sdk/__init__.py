"""ibc SDK: torch-free runtime that loads an exported bundle, embeds images and searches a catalogue.

Importing ``sdk`` is cheap and never imports torch; heavy parts load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Retriever":
        from sdk.retriever import Retriever

        return Retriever
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")
