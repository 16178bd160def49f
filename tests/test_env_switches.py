"""The ops' cheap reads of SPARSEBERT_BACKEND and TRITON_INTERPRET (sparsebert/ops/_env.py) agree with
os.environ as it is set, changed and unset while the process runs."""
import os

from sparsebert.ops import _env


def test_reads_follow_os_environ(monkeypatch):
    monkeypatch.delenv("SPARSEBERT_BACKEND", raising=False)
    assert _env.backend_override() == "auto"
    for value in ("torch", "cpp", "triton", "ünïcode"):
        monkeypatch.setenv("SPARSEBERT_BACKEND", value)
        assert _env.backend_override() == os.environ["SPARSEBERT_BACKEND"] == value
    monkeypatch.delenv("SPARSEBERT_BACKEND")
    assert _env.backend_override() == "auto"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _env.triton_interpret() == "0"
    os.environ["TRITON_INTERPRET"] = "1"  # a plain write, as a user's script would do
    assert _env.triton_interpret() == "1"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _env.triton_interpret() is None


def test_without_the_bytes_dict_it_asks_os_environ(monkeypatch):
    monkeypatch.setattr(_env, "_BYTES_KEYS", False)
    monkeypatch.setenv("SPARSEBERT_BACKEND", "torch")
    assert _env.backend_override() == "torch"
    monkeypatch.delenv("SPARSEBERT_BACKEND")
    assert _env.backend_override() == "auto"
