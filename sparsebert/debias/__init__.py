"""Bias-only models and debiasing losses: hand-crafted bias features, a logistic-regression bias
model, and the CE / product-of-experts / example-reweighting / confidence-regularization losses."""
from .bias_model import BiasModel, attach_bias_probs, bias_probs_of, cross_fit_bias_probs, fit_bias_model
from .features import (
    NEGATION_WORDS, PAIR_FEATURE_NAMES, ClaimOnlyFeaturizer, ClaimWordsFeaturizer, OverlapCueFeaturizer,
    PairOverlapFeaturizer,
    make_featurizer, pair_features,
)
from .losses import (
    LOSSES, ConfidenceRegularizationLoss, CrossEntropyLoss, ExampleReweightingLoss, ProductOfExpertsLoss, make_loss,
    needs_bias_probs, needs_teacher_probs,
)

__all__ = [
    "BiasModel", "ClaimOnlyFeaturizer", "ClaimWordsFeaturizer", "ConfidenceRegularizationLoss", "CrossEntropyLoss", "ExampleReweightingLoss",
    "LOSSES", "NEGATION_WORDS", "PAIR_FEATURE_NAMES", "OverlapCueFeaturizer", "PairOverlapFeaturizer", "ProductOfExpertsLoss",
    "attach_bias_probs", "bias_probs_of", "cross_fit_bias_probs", "fit_bias_model", "make_featurizer", "make_loss",
    "needs_bias_probs", "needs_teacher_probs", "pair_features",
]
