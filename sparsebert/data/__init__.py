"""Tasks, local-file loaders, the HANS-style generator, the synthetic spurious-feature task and
tokenization. See ``tasks.py`` for which sets are real and which are generated."""
from .hans_style import HANS_STYLE_NAME, generate_hans_style
from .synthetic import SYNTHETIC_NAME, make_synthetic_task
from .tasks import (
    TASKS, DataFormatError, Example, TaskSpec, TaskSplits, default_data_dir, get_task, load_fever,
    load_fever_symmetric, load_hans, load_mnli, load_mrpc, load_paws, load_qqp, load_sst2, load_task,
    HANS_RULES, OVERLAP_CUES, PAWS_BIASED, bigram_overlap, mnli_to_hans_preds, mnli_to_hans_probs, overlap_biased_split,
    overlap_cue_scores, paws_qqp_biased_splits, split_examples, word_overlap,
)
from .tokenize import PaddingCollator, SimpleVocabTokenizer, TokenizedDataset, cache_key, tokenize_examples

__all__ = [
    "HANS_STYLE_NAME", "SYNTHETIC_NAME", "TASKS", "DataFormatError", "Example", "PaddingCollator",
    "SimpleVocabTokenizer", "TaskSpec", "TaskSplits", "TokenizedDataset", "cache_key", "default_data_dir",
    "generate_hans_style", "get_task", "load_fever", "load_fever_symmetric", "load_hans", "load_mnli",
    "load_mrpc", "load_paws", "load_qqp", "load_sst2", "load_task", "make_synthetic_task", "mnli_to_hans_probs",
    "split_examples", "tokenize_examples", "HANS_RULES", "mnli_to_hans_preds", "overlap_biased_split", "word_overlap",
    "OVERLAP_CUES", "PAWS_BIASED", "bigram_overlap", "overlap_cue_scores", "paws_qqp_biased_splits",
]
