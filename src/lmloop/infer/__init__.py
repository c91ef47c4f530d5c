"""Inference: a predictor that loads any lmloop/HF classifier directory and answers ``predict(texts)``."""

from lmloop.infer.predictor import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "load"]
