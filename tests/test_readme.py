"""The README's SparseLinear snippet runs as written (with `path` bound to a tiny saved BERT)."""
import re
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    BertModel(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
                         vocab_size=50)).save_pretrained(tmp_path)
    scope = {"path": str(tmp_path)}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert scope["y"].shape == (8, 128, 3072)
    assert scope["layer"].sparsity() == pytest.approx(0.7, abs=1e-6)
