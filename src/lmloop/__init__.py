"""lmloop: the whole life of a language model as one loop.

data -> pretrain -> finetune -> infer -> serve -> mlops -> back to data.
Heavy libraries (torch, transformers, mlflow) are imported lazily so `lmloop --help` answers at once.
"""

__version__ = "0.1.0"


def load(ref: str, **kwargs):
    """Load a fine-tuned classifier for inference: ``lmloop.load("runs/vader").predict(["great film"])``."""
    from lmloop.infer import load as _load

    return _load(ref, **kwargs)


def generate(model, prompt=None, **kwargs) -> str:
    """Generate text with a causal LM: ``lmloop.generate("smollm2", "Name three rivers.", temperature=0)``.

    ``model`` is a reference (packaged name, directory, Hub id; loaded once per process) or a loaded
    :class:`lmloop.infer.generate.Generator`; ``prompt`` a string or a messages list. Keyword arguments:
    ``system``, ``raw``, ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``,
    ``repetition_penalty``. For streaming use :func:`lmloop.infer.generate.stream`.
    """
    from lmloop.infer.generate import generate as _generate

    return _generate(model, prompt, **kwargs)
