"""Evaluation protocols for pretrained encoders and their decoders.

    study.evaluation.setup               the checkpoint, its config and the models (shared by all protocols)
    study.evaluation.features            frozen features (cls / mean pool), cached
    study.evaluation.knn                 weighted k-NN (DINO: k = 20, T = 0.07)
    study.evaluation.linear_probe        BatchNorm(affine=False) + Linear, LARS (MAE)
    study.evaluation.finetune            end to end, MAE recipe through timm
    study.evaluation.samples             the decoder's completions and their diversity
    study.evaluation.context_completion  Context-Completion on the synthetic images
    study.evaluation.run                 ``evaluate``: every protocol, rows into the results table

Importing the package loads none of them; import the module you need.
"""
