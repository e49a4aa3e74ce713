"""Long-run numerics: a fitted LDS decoding 10^6 float32 steps, and bf16 autocast training of STU models.

The LDS tests use the real fitted system (`get_fit`, L=1024, K=8, h=32: float64 fit error ~1e-14) in an
`LDS` layer and compare float32 against float64 runs of the same system on the same input.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import lfilter

from spectralds.distill import get_fit
from spectralds.layers.lds import LDS, make_lds
from spectralds.models import LanguageModel
from spectralds.ops.lds_scan import scan_ref

F64 = torch.float64
L_FIT, K, H = 1024, 8, 32
STEPS = 1_000_000
STEP_CALLS = 20_000  # per-token `LDS.step` calls (~0.2 ms each on a CPU)
WINDOW = 100_000
TOL = 2e-6  # relative RMS; measured ~3e-7 (the fit's float32 check at L=1024 gives ~3e-7 too)


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield get_fit(L_FIT, K, H, progress=False)


def fitted_layer(fit, dtype: torch.dtype, like: LDS | None = None) -> LDS:
    """One channel, exact mode, no length limit; `like` gives the projections (so runs are comparable)."""
    torch.manual_seed(0)
    layer = make_lds(1, seq_len=None, num_filters=K, state_dim=H, learnable=False, dtype=dtype).eval()
    layer.set_system(fit.A, fit.B, fit.C)
    if like is not None:
        layer.load_state_dict(like.state_dict())
    return layer


@pytest.fixture(scope="module")
def layers(fit):
    layer32 = fitted_layer(fit, torch.float32)
    return layer32, fitted_layer(fit, F64, like=layer32)


@pytest.fixture(scope="module")
def inputs():
    """Gaussian noise plus a constant: the DC part drives the slow "+" poles towards their largest state."""
    u = torch.randn(STEPS, generator=torch.Generator().manual_seed(0)) + 0.5
    return u.float()


@pytest.fixture(scope="module")
def reference(fit, inputs):
    """The float64 recurrence over all steps: states (STEPS, h)."""
    return recurrence(fit.A, fit.B, inputs, F64)


@pytest.fixture(scope="module")
def stepped(layers, inputs):
    """STEP_CALLS tokens through `LDS.step` in float32: outputs (T,) and the state after each token (T, h)."""
    layer = layers[0]
    state, ys, states = layer.init_state(1), [], []
    with torch.no_grad():
        for u_t in inputs[:STEP_CALLS]:
            y_t, state = layer.step(u_t.reshape(1, 1), state)
            ys.append(y_t[0, 0])
            states.append(state[0, 0])
    return torch.stack(ys), torch.stack(states)


def recurrence(A: torch.Tensor, B: torch.Tensor, u: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """States (T, h) of x_t = A x_{t-1} + B u_t, one step after another in `dtype`: the loop of
    `ops.lds_scan.scan_ref` (checked against it below), run by scipy's lfilter in C (10^6 Python steps
    would take minutes): with b = [B_j] and a = [1, -A_j] it computes fl(fl(B_j u_t) + fl(A_j x_{t-1})),
    the rounding of `LDS.step`'s and `scan_ref`'s A * x + B * u.
    """
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    u = u.to(dtype).numpy()
    cols = [
        lfilter(np.array([b], np_dtype), np.array([1.0, -a], np_dtype), u)
        for a, b in zip(A.to(dtype).numpy(), B.to(dtype).numpy(), strict=True)
    ]
    assert all(col.dtype == np_dtype for col in cols)  # no silent promotion to float64
    return torch.from_numpy(np.stack(cols, axis=1))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_compiled_recurrence_is_scan_ref(fit, inputs, dtype):
    u = inputs[:3000].to(dtype)
    identity = torch.eye(H, dtype=dtype)  # the readout that returns the states themselves
    states = scan_ref(u[None, :, None], fit.A.to(dtype), fit.B.to(dtype), identity)[0][0, :, 0]
    tol = 1e-6 if dtype == torch.float32 else 1e-13  # (bit for bit where scipy's loop has no fused adds)
    assert (recurrence(fit.A, fit.B, u, dtype) - states).abs().max() <= tol * states.abs().max()


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_fitted_system_is_stable_and_decodes_its_own_float32_poles(fit):
    assert fit.rel_mse_f64 < 1e-10  # a good fit, so this is the system a distilled model decodes with
    assert fit.A.abs().max() < 1  # strictly stable: a bounded input gives a bounded state
    assert torch.equal(fit.A.float().double(), fit.A)  # float32 decoding runs exactly the fitted poles


def test_step_matches_float64_scan_over_20k_tokens(fit, layers, inputs, stepped, reference):
    ys, states = stepped
    with torch.no_grad():
        y64, state64 = layers[1].prefill(inputs[:STEP_CALLS].double()[None, :, None])
    assert ys.dtype == states.dtype == torch.float32 and torch.isfinite(ys).all()
    assert rel(ys, y64[0, :, 0]) < TOL
    assert rel(states[-1], state64[0, 0]) < TOL
    assert rel(states, reference[:STEP_CALLS]) < TOL


def test_float32_decoding_of_a_million_steps_stays_bounded_and_accurate(fit, inputs, stepped, reference):
    states = recurrence(fit.A, fit.B, inputs, torch.float32)
    # It is the decoding recurrence: its first STEP_CALLS states are those of `LDS.step` (bit for bit
    # where scipy's loop is compiled without fused multiply-adds, as on x86-64).
    step_states = stepped[1]
    assert (states[:STEP_CALLS] - step_states).abs().max() <= 1e-6 * step_states.abs().max()

    # Bounded: |x_j| <= |B_j| max|u| / (1 - |a_j|) (BIBO), and the state's size does not drift.
    assert torch.isfinite(states).all()
    bound = fit.B.abs() * inputs.abs().max().double() / (1 - fit.A.abs())
    assert (states.abs().max(dim=0).values.double() <= bound * (1 + 1e-5)).all()
    rms = states.double().square().mean(dim=1).view(-1, WINDOW).mean(dim=1).sqrt()
    assert rms[-1] < 1.5 * rms[1]  # window 0 holds the start-up transient

    # Accurate against the float64 run, and the error does not grow with time. The readout (features
    # U = x C) is in float64: only the float32 state is under test, where C's cancellation shows.
    U32, U64 = states.double() @ fit.C, reference @ fit.C
    errors = torch.tensor([rel(U32[w : w + WINDOW], U64[w : w + WINDOW]) for w in range(0, STEPS, WINDOW)])
    assert errors.max() < TOL
    assert errors[-1] < 1.5 * errors[:2].max()
    assert rel(states[-1], reference[-1]) < TOL


def test_float32_prefill_scan_of_a_million_steps(fit, layers, inputs, reference):
    # The prompt path: the chunked scan (`prefill`) over all steps at once, in float32 and in float64.
    with torch.no_grad():
        y32, state32 = layers[0].prefill(inputs[None, :, None])
        y64, state64 = layers[1].prefill(inputs.double()[None, :, None])
    assert y32.dtype == state32.dtype == torch.float32 and torch.isfinite(y32).all()
    errors = [rel(y32[0, w : w + WINDOW], y64[0, w : w + WINDOW]) for w in range(0, STEPS, WINDOW)]
    assert max(errors) < TOL
    assert rel(state64[0, 0], reference[-1]) < 1e-12  # the float64 scan is the float64 recurrence
    assert rel(state32[0, 0], reference[-1]) < TOL
    bound = fit.B.abs() * inputs.abs().max().double() / (1 - fit.A.abs())
    assert (state32[0, 0].abs().double() <= bound).all()


# ---- bf16 autocast training on the CPU (tests/test_gpu.py has the CUDA version) -------------------------


def counting_batch(generator: torch.Generator, batch: int = 8, seq: int = 32, vocab: int = 16):
    """A learnable sequence: counting up by 3 modulo the vocabulary from a random start."""
    start = torch.randint(vocab, (batch, 1), generator=generator)
    tokens = (start + 3 * torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("pattern", [["stu"], ["stu_t"], ["stu", "attn"]], ids=["stu", "stu_t", "hybrid"])
def test_bf16_autocast_training_stays_finite_and_learns(pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=16, dim=16, num_layers=2, layer_pattern=pattern, seq_len=32, num_filters=4,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": 8}},
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(24):
        x, y = counting_batch(generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16  # autocast is really on
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.3 * losses[0]
