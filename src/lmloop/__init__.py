"""lmloop: the whole life of a language model as one loop.

data -> pretrain -> finetune -> infer -> serve -> mlops -> back to data.
Heavy libraries (torch, transformers, mlflow) are imported lazily so `lmloop --help` answers at once.
"""

__version__ = "0.1.0"


def load(ref: str, **kwargs):
    """Load a fine-tuned classifier for inference: ``lmloop.load("runs/vader").predict(["great film"])``."""
    from lmloop.infer import load as _load

    return _load(ref, **kwargs)
