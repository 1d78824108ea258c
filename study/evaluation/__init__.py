"""Evaluation protocols for pretrained encoders: k-NN, linear probe, finetuning.

    study.evaluation.features      frozen features (cls / mean pool), cached
    study.evaluation.knn           weighted k-NN (DINO: k = 20, T = 0.07)
    study.evaluation.linear_probe  BatchNorm(affine=False) + Linear, LARS (MAE)
    study.evaluation.finetune      end to end, MAE recipe through timm
    study.evaluation.run           the ``evaluate`` command: rows into the results table
"""

from study.evaluation.features import FeatureCache, extract_features
from study.evaluation.finetune import (FINETUNE_PRESETS, FinetuneSettings, ViTClassifier, finetune,
                                       finetune_settings)
from study.evaluation.knn import knn_accuracy, knn_predict
from study.evaluation.linear_probe import (LARS, LINEAR_PRESETS, LinearProbeSettings, linear_probe_settings,
                                           train_linear_probe)
from study.evaluation.run import PROTOCOLS, evaluate

__all__ = [
    "FeatureCache", "extract_features", "knn_predict", "knn_accuracy", "LARS", "LinearProbeSettings",
    "LINEAR_PRESETS", "linear_probe_settings", "train_linear_probe", "FinetuneSettings", "FINETUNE_PRESETS",
    "finetune_settings", "ViTClassifier", "finetune", "PROTOCOLS", "evaluate",
]
