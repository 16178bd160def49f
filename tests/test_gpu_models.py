"""The layers above the kernels on the `device` of the parameter: the ops with autograd and opcheck,
SparseLinear / sparsify on a tiny BERT, the bitmask / BSR / 2:4 formats through `compress`, torch.compile
of a sparsified model, and the CUDA C++ kernels (backend "cuda") with the CMake self-test.

"cpu" params run the Triton backend under the interpreter (so a GPU run is never their first run);
"cuda" params (marked `cuda`; SPARSEBERT_TEST_GPU=1 pytest -m cuda) run compiled Triton and the CUDA C++
kernels. References and tolerances come from the CPU tests (test_ops, test_compress, _helpers).
"""
import inspect
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from sparsebert import ops
from sparsebert.nn import SparseLinear, encoder_linears, sparsify
from sparsebert.nn.compress import compress
from sparsebert.nn.granularity import granular_topk_mask
from sparsebert.ops import _ext
from sparsebert.ops import pruned as _pruned_ops  # noqa: F401  registers sparsebert::pruned_*
from sparsebert.ops import reference as R

from _helpers import assert_close, device_cases, skip_unless_triton_runs_on, tiny_bert
from test_compress import GRANULARITY, SPARSITY, layers, pruned_bert, run
from test_cuda_compile import find_nvcc
from test_ops import _grads

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(v):
    return str(v).replace("torch.", "")


def require(device, backend):
    """Skip (with the reason) what cannot run here: Triton needs the interpreter on CPU tensors and the
    compiler on CUDA ones; backend "cuda" needs the extension's CUDA kernels."""
    if backend == "triton":
        skip_unless_triton_runs_on(device)
    elif backend == "cuda":
        if not _ext.load():
            pytest.skip(f"sparsebert._C is not loaded ({_ext.load_error()})")
        if not _ext.has_cuda():
            pytest.skip("sparsebert._C was built without its CUDA kernels")


# (device, backend) pairs: the Triton kernels everywhere, the CUDA C++ kernels on the GPU
BACKEND_CASES = device_cases(["triton"]) + [pytest.param("cuda", "cuda", marks=pytest.mark.cuda)]


# ------------------------------------------------------------------------------------------ ops + autograd
CPU_OP_SHAPES = [((2, 19), 70, 53)]
GPU_OP_SHAPES = [((1,), 33, 17), ((4, 129), 257, 200), ((3, 128), 768, 3072 + 5)]


def _op_cases():
    shapes = {"cpu": CPU_OP_SHAPES, "cuda": CPU_OP_SHAPES + GPU_OP_SHAPES}
    out = []
    for p in BACKEND_CASES:
        device, backend = p.values
        out += [pytest.param(device, backend, *s, d, marks=p.marks) for s in shapes[device] for d in DTYPES]
    return out


def _inputs(lead, k, n, dtype, device):
    x = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    return x, w, b


@pytest.mark.parametrize("device,backend,lead,k,n,dtype", _op_cases(), ids=_ids)
def test_masked_linear_op_autograd(device, backend, lead, k, n, dtype):
    """Forward and backward of sparsebert.ops.masked_linear (bool and packed masks) vs the reference in
    float64, as test_ops does on the CPU backends."""
    require(device, backend)
    for mask_kind in ("bool", "packed"):
        m = torch.rand(n, k, device=device) < 0.4
        mask = m if mask_kind == "bool" else ops.pack_mask(m)
        leaves = [t.requires_grad_() for t in _inputs(lead, k, n, dtype, device)]
        y, grads, g = _grads(lambda: ops.masked_linear(*leaves[:2], leaves[2], mask, backend=backend), leaves)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        y_ref = R.masked_linear(*ref[:2], ref[2], m)
        y_ref.backward(g.double())
        assert y.device.type == device and y.dtype == dtype and y.shape == (*lead, n)
        assert_close(y, y_ref, dtype, f"{mask_kind} y")
        for name, got, want in zip(("dx", "dw", "db"), grads, ref):
            assert_close(got, want.grad, dtype, f"{mask_kind} {name}")
        assert torch.all(grads[1][~m] == 0), "pruned weights must get zero gradient"


@pytest.mark.parametrize("device,backend,lead,k,n,dtype", _op_cases(), ids=_ids)
def test_score_masked_linear_op_autograd(device, backend, lead, k, n, dtype):
    """score_masked_linear with the device threshold of ops.topk_threshold (no host sync), straight-through
    gradients for the scores and a trained weight, vs the float64 reference."""
    require(device, backend)
    x, w, b = _inputs(lead, k, n, dtype, device)
    s = torch.randn(n, k, device=device)  # fp32 scores beside 16-bit weights, as mask training keeps them
    tau = ops.topk_threshold(s, 0.6, backend=backend)
    assert tau.device.type == device and tau.item() == R.topk_threshold(s, 0.6).item()
    for t in (x, w, b, s):
        t.requires_grad_()
    y, (dx, dw, db, ds), g = _grads(lambda: ops.score_masked_linear(x, w, b, s, tau, backend=backend), [x, w, b, s])
    rx, rw, rb, rs = (t.detach().double().requires_grad_() for t in (x, w, b, s))
    y_ref = R.score_masked_linear(rx, rw, rb, rs, tau.double())
    y_ref.backward(g.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, rx.grad, dtype, "dx")
    assert_close(dw, rw.grad, dtype, "dweight")
    assert_close(db, rb.grad, dtype, "db")
    assert ds.dtype == torch.float32
    assert_close(ds, rs.grad, dtype, "dscores")  # from dtype operands, fp32 accumulation
    assert torch.all(dw[s.detach() < tau] == 0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES, ids=_ids)
def test_ops_opcheck_on_device(device, backend):
    require(device, backend)
    x = torch.randn(7, 13, device=device, requires_grad=True)
    w = torch.randn(5, 13, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    m = (torch.rand(5, 13, device=device) < 0.5).to(torch.uint8)
    s = torch.randn(5, 13, device=device, requires_grad=True)
    tau = torch.tensor(0.1, device=device)
    torch.library.opcheck(torch.ops.sparsebert.masked_linear.default, (x, w, b, m, False, backend))
    torch.library.opcheck(torch.ops.sparsebert.masked_linear.default, (x, w, None, ops.pack_mask(m), True, backend))
    torch.library.opcheck(torch.ops.sparsebert.score_masked_linear.default, (x, w, b, s, tau, backend))
    torch.library.opcheck(torch.ops.sparsebert.topk_threshold.default, ([s.detach(), w.detach()], 17, backend))
    torch.library.opcheck(torch.ops.sparsebert.topk_threshold_at_rank.default,
                          ([s.detach(), w.detach()], torch.tensor(17, device=device), backend))


@pytest.mark.parametrize("device", device_cases([()]), ids=_ids)
def test_format_and_pruned_ops_opcheck_on_device(device):
    skip_unless_triton_runs_on(device)
    from sparsebert.ops import reference_formats as rf
    from test_sparse_format_kernels import block_weight, sparse_weight
    w = sparse_weight(24, 40, 0.4, device=device)
    x, b = torch.randn(3, 40, device=device), torch.randn(24, device=device)
    torch.library.opcheck(torch.ops.sparsebert.bitmask_linear.default,
                          (x, *rf.bitmask_encode(w, 16, 32), b, 40, 16, 32, "triton"))
    wb = block_weight(32, 48, 16, 0.5, device=device)
    torch.library.opcheck(torch.ops.sparsebert.bsr_linear.default,
                          (torch.randn(3, 48, device=device), *rf.bsr_encode(wb, 16), torch.randn(32, device=device),
                           48, "triton"))
    x = torch.randn(2, 5, 16, device=device)
    w_in, b_in = torch.randn(24, 16, device=device), torch.randn(24, device=device)
    w_out, b_out = torch.randn(16, 24, device=device), torch.randn(16, device=device)
    keep = torch.tensor([0, 3, 7, 20], device=device)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.sparsebert.pruned_ffn.default, (x.view(-1, 16), w_in, b_in, w_out, b_out, keep,
                                                                    "triton"), test_utils=checks)
    ws = [torch.randn(16, 16, device=device), torch.randn(16, device=device)] * 4
    key_mask = torch.ones(2, 5, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.sparsebert.pruned_attention.default,
                          (x, *ws, torch.tensor([1, 3], device=device), 4, key_mask, "triton"), test_utils=checks)


# ------------------------------------------------------------------------------------------ SparseLinear / sparsify
def _bert_inputs(device, batch=2, length=9, vocab=50):
    ids = torch.randint(0, vocab, (batch, length), device=device)
    att = torch.ones(batch, length, dtype=torch.long, device=device)
    att[0, length - 3:] = 0
    return ids, att


@pytest.mark.parametrize("device,backend", BACKEND_CASES, ids=_ids)
@pytest.mark.parametrize("mode", ["mask", "scores"])
def test_sparsify_tiny_bert_matches_torch_backend(device, backend, mode):
    """A sparsified tiny BERT on `backend`: logits (and the scores' gradients in scores mode) equal those
    of the same model on the torch backend."""
    require(device, backend)
    ids, att = _bert_inputs(device)
    models = {}
    for be in (backend, "torch"):
        model = tiny_bert(seed=3).to(device).eval()
        kwargs = dict(target_sparsity=0.6) if mode == "scores" else {}
        sparsify(model, mode=mode, backend=be, **kwargs)
        if mode == "mask":
            gen = torch.Generator().manual_seed(5)
            for lin in encoder_linears(model).values():
                lin.set_mask((torch.rand(lin.weight.shape, generator=gen) < 0.4).to(device))
        models[be] = model
    assert all(isinstance(m, SparseLinear) and m.backend == backend for m in encoder_linears(models[backend]).values())
    out = {be: m(input_ids=ids, attention_mask=att).logits for be, m in models.items()}
    assert out[backend].device.type == device
    assert_close(out[backend], out["torch"].double(), torch.float32, f"{mode} logits")
    if mode == "scores":
        for be in models:
            out[be].square().sum().backward()
        for (name, a), b in zip(encoder_linears(models[backend]).items(), encoder_linears(models["torch"]).values()):
            assert_close(a.scores.grad, b.scores.grad.double(), torch.float32, f"{name} dscores")


# ------------------------------------------------------------------------------------------ formats
FORMAT_CASES = device_cases([("bitmask", torch.float32), ("bsr", torch.float32)],
                            [(f, torch.bfloat16) for f in ("bitmask", "bsr")])
# test_compress's tolerances: fp32 model vs compressed 1e-5, bf16 2e-2
COMPRESS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
                torch.float16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device,fmt,dtype", FORMAT_CASES, ids=_ids)
def test_compress_tiny_bert_on_device(device, fmt, dtype):
    """compress() to bitmask / BSR served by the Triton kernels on `device`: the model's output is that
    of the masked model it came from."""
    skip_unless_triton_runs_on(device)
    model, config = pruned_bert(fmt)
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (2, 7), device=device)
    expected = run(model, ids)
    # no CPU speed probe (it would time the interpreter): this checks outputs only
    no_probe = {"speed_check": False} if "speed_check" in inspect.signature(compress).parameters else {}
    compress(model, fmt, block_size=16, tile=(16, 32), backend="triton", **no_probe)
    kinds = {type(m).__name__ for m in layers(model).values()}
    assert kinds == {{"bitmask": "BitmaskLinear", "bsr": "BSRLinear"}[fmt]}
    got = run(model, ids)
    assert got.device.type == device and got.dtype == dtype
    torch.testing.assert_close(got, expected, **COMPRESS_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_compress_2to4_on_gpu(dtype):
    """2:4 through torch's semi-structured sparse kernels (CUDA sm80+ only: on the CPU the module is a dense
    fallback, tested in test_compress)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"2:4 sparse kernels need compute capability >= 8.0, got {torch.cuda.get_device_capability()}")
    import transformers
    config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    sparsify(model, mode="mask")
    for lin in encoder_linears(model).values():
        lin.set_mask(granular_topk_mask(lin.weight.detach().abs(), SPARSITY["2:4"], GRANULARITY["2:4"]))
    model = model.to(device="cuda", dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (4, 16), device="cuda")  # 64 tokens
    expected = run(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a dense fallback would warn: fail instead
        compress(model, "2:4", policy="sparse")
        got = run(model, ids)
    mods = layers(model).values()
    assert {type(m).__name__ for m in mods} == {"SemiStructuredLinear"}
    assert all(m.fallback_reason is None and m.released for m in mods)
    torch.testing.assert_close(got, expected, **COMPRESS_TOL[dtype])


@pytest.mark.cuda
def test_compress_speed_check_measures_gpu_layers():
    """An explicit sparse format on CUDA weights is timed against dense (synchronized calls) and the speedups
    recorded per layer; a layer slower than dense warns, naming the GPU (the first H200 run measured the
    bitmask layers at 0.02-0.05x of dense in eager calls)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).cuda().half()
    with torch.no_grad():
        for lin in model:
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress(model, format="bitmask", tokens=(1, 16))
    for name in ("0", "1"):
        speedups = model.compress_choices[name]["speedups"]
        assert set(speedups) == {1, 16} and all(r > 0 for r in speedups.values()), speedups
    slow = any(r < 1.0 for name in ("0", "1") for r in model.compress_choices[name]["speedups"].values())
    named = [w for w in caught if "measured slower than dense on this GPU" in str(w.message)]
    assert bool(named) == slow, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("device,backend", BACKEND_CASES, ids=_ids)
def test_torch_compile_of_sparsified_bert(device, backend):
    """torch.compile of a sparsified tiny BERT (mask mode) gives the eager output: "aot_eager" on the CPU
    (no C++ toolchain needed, fast), "inductor" on the GPU."""
    require(device, backend)
    model = tiny_bert(seed=1).to(device).eval()
    sparsify(model, mode="mask", backend=backend)
    for lin in encoder_linears(model).values():
        lin.set_mask(torch.rand(lin.weight.shape, device=device) < 0.5)
    ids, att = _bert_inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor" if device == "cuda" else "aot_eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=att).logits
        got = compiled(input_ids=ids, attention_mask=att).logits
    assert got.device.type == device
    assert_close(got, eager.double(), torch.float32, "compiled logits")


# ------------------------------------------------------------------------------------------ CUDA C++ / CMake
@pytest.mark.cuda
def test_cmake_build_and_cuda_selftest():
    """csrc/cuda through CMake (torch-free) for this GPU's architecture, then its self-test executable
    (every kernel against a CPU loop; exit code 1 on a mismatch)."""
    cmake, nvcc = shutil.which("cmake"), find_nvcc()
    if cmake is None:
        pytest.skip("cmake not found on PATH")
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    build = ROOT / "build" / "cmake"
    env = {**os.environ, "CUDACXX": nvcc}
    for cmd in ([cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={arch}"],
                [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)],
                [str(build / "sparsebert_cuda_selftest")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
