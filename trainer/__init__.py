"""ibc trainer: datasets, P×K sampling, the training methods (trainer.methods: IBC, CE, Group Loss,
Divide and Conquer, the PML losses), the loop, evaluation and the ``ibc-train`` CLI.

Public API (imported lazily so ``import trainer`` stays cheap)::

    from trainer import train, load_config          # train(config, out_dir) -> TrainResult
    from trainer.data import dataset_items          # (path, label) items of train / val / test
    from trainer.evaluate import embed_items        # embeddings through sdk.preprocess
"""

_LAZY = {
    "train": ("trainer.loop", "train"),
    "TrainResult": ("trainer.loop", "TrainResult"),
    "TrainingError": ("trainer.loop", "TrainingError"),
    "evaluate_checkpoint": ("trainer.loop", "evaluate_checkpoint"),
    "Config": ("trainer.config", "Config"),
    "load_config": ("trainer.config", "load_config"),
    "dataset_items": ("trainer.data", "dataset_items"),
    "embed_items": ("trainer.evaluate", "embed_items"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = list(_LAZY)
