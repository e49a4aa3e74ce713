import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralds.errors import UserError
from spectralds.layers import lds_paths
from spectralds.layers.lds import LDS, LDSExact, LDSTensordot, make_lds
from spectralds.layers.registry import build_layer, restore_layers
from spectralds.ops.lds_conv import impulse_response_ref
from spectralds.ops.lds_scan import scan_ref

F64 = torch.float64


def random_system(h: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Poles of both signs, some within 1e-4 of the unit circle, one exactly 0 and one exactly -1."""
    g = torch.Generator().manual_seed(seed)
    A = (1 - 10 ** (-4 * torch.rand(h, generator=g, dtype=F64))) * torch.where(
        torch.arange(h) % 2 == 0, 1, -1
    )
    if h >= 4:
        A[2], A[3] = 0.0, -1.0
    return A, torch.randn(h, generator=g, dtype=F64), torch.randn(h, 2 * K, generator=g, dtype=F64)


def fitted_lds(dim, h=10, K=3, mode="exact", dtype=F64, chunk_size=16, seed=0, **kw) -> LDS:
    torch.manual_seed(seed)
    layer = make_lds(
        dim, num_filters=K, state_dim=h, mode=mode, learnable=False, dtype=dtype, chunk_size=chunk_size, **kw
    )
    layer.set_system(*random_system(h, K, seed))
    return layer


def recurrence(u, A, B, C):
    """Plain step-by-step reference in float64: U (batch, T, ch, 2K) and the final state."""
    return scan_ref(u.double(), A.double(), B.double(), C.double())


def convolution(u, A, B, C):
    """Direct causal O(T^2) convolution with the impulse response sum_j C_jk B_j A_j^t."""
    T = u.shape[1]
    G = impulse_response_ref(A, B, C, T)  # (T, 2K)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    kernel = torch.where((lag >= 0)[..., None], G[lag.clamp(min=0)], 0.0)  # (t, s, 2K)
    return torch.einsum("tsk,bsi->btik", kernel, u.double())


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("T", [1, 15, 16, 37, 200])
def test_chunked_scan_matches_recurrence_and_convolution_float64(T):
    layer = fitted_lds(3)
    u = torch.randn(2, T, 3, dtype=F64)
    U, state = layer.scan(u, layer.C)
    U_rec, state_rec = recurrence(u, layer.A, layer.B, layer.C)
    assert rel_err(U, U_rec) < 1e-12
    assert rel_err(U, convolution(u, layer.A, layer.B, layer.C)) < 1e-12
    assert rel_err(state, state_rec) < 1e-12
    assert torch.allclose(layer.features(u), U)


def test_float32_scan_accuracy_on_long_sequences():
    # Poles within 1e-4 of +-1 and 2000 steps: float32 stays within 1e-5 of the float64 recurrence.
    layer = fitted_lds(4, h=16, K=4, dtype=torch.float32, chunk_size=64)
    u = torch.randn(2, 2000, 4, dtype=F64)
    U, state = layer.scan(u.float(), layer.C)
    assert U.dtype == torch.float32
    U_rec, state_rec = recurrence(u, layer.A, layer.B, layer.C)
    assert rel_err(U, U_rec) < 1e-5
    assert rel_err(state, state_rec) < 1e-5


def test_impulse_response_is_the_response_to_a_unit_impulse():
    layer = fitted_lds(1)
    impulse = torch.zeros(1, 40, 1, dtype=F64)
    impulse[0, 0, 0] = 1.0
    assert rel_err(layer.impulse_response(40), layer.features(impulse)[0, :, 0]) < 1e-13
    assert layer.impulse_response(40).dtype == F64


def test_exact_mode_applies_both_projections():
    layer = fitted_lds(3, K=3, dim_out=5)
    x = torch.randn(2, 30, 3, dtype=F64)
    U = convolution(x, layer.A, layer.B, layer.C)
    expected = torch.einsum("btik,kio->bto", U[..., :3], layer.M_phi_plus) + torch.einsum(
        "btik,kio->bto", U[..., 3:], layer.M_phi_minus
    )
    assert layer(x).shape == (2, 30, 5)
    assert rel_err(layer(x), expected) < 1e-12


def test_tensordot_mode_projects_inputs_then_filters():
    layer = fitted_lds(3, K=3, mode="tensordot", dim_out=4)
    x = torch.randn(2, 30, 3, dtype=F64)
    U = convolution(x @ layer.M_inputs, layer.A, layer.B, layer.C)  # (B, T, d_out, 2K)
    expected = (U[..., :3] * layer.M_filters_plus.T).sum(-1) + (U[..., 3:] * layer.M_filters_minus.T).sum(-1)
    assert rel_err(layer(x), expected) < 1e-12


@pytest.mark.parametrize("mode", ["exact", "tensordot"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_prefill_then_steps_equals_forward(mode, dtype):
    layer = fitted_lds(3, mode=mode, dtype=dtype, dim_out=2 if mode == "tensordot" else None)
    layer.to(dtype)
    x = torch.randn(2, 45, 3, dtype=dtype)
    y_full = layer(x)
    y_pre, state = layer.prefill(x[:, :29])
    ys = [y_pre]
    for t in range(29, 45):
        y_t, state = layer.step(x[:, t], state)
        assert state.shape == (2, layer.channels, layer.state_dim)  # O(1) state: never grows with t
        ys.append(y_t[:, None])
    tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_err(torch.cat(ys, dim=1), y_full) < tol
    assert rel_err(layer.prefill(x)[1], state) < tol


def test_steps_from_init_state_match_recurrence():
    layer = fitted_lds(2, K=2)
    x = torch.randn(3, 20, 2, dtype=F64)
    state = layer.init_state(3)
    assert state.shape == (3, 2, 10) and not state.any()
    ys = []
    for t in range(20):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    U, final = recurrence(x, layer.A, layer.B, layer.C)
    expected = torch.einsum("btik,kio->bto", U, torch.cat([layer.M_phi_plus, layer.M_phi_minus]))
    assert rel_err(torch.stack(ys, 1), expected) < 1e-12
    assert rel_err(state, final) < 1e-12


@pytest.mark.parametrize("learnable", [False, True])
def test_keep_states_shrinks_the_system(learnable):
    layer = fitted_lds(3, h=10, K=2)
    if learnable:
        layer.set_system(*layer.system(), learnable=True)
    keep = torch.tensor([0, 3, 4, 9])
    A, B, C = (p.detach()[keep] for p in layer.system())
    layer.keep_states(keep)
    assert layer.state_dim == 4
    assert [tuple(p.shape) for p in layer.system()] == [(4,), (4,), (4, 4)]
    assert torch.equal(layer.system()[0].detach(), A)
    assert (layer.A_raw if learnable else layer.A).shape == (4,)
    x = torch.randn(1, 25, 3, dtype=F64)
    U = convolution(x, A, B, C)
    expected = torch.einsum("btik,kio->bto", U, torch.cat([layer.M_phi_plus, layer.M_phi_minus]))
    assert rel_err(layer(x), expected) < 1e-12
    with pytest.raises(ValueError, match="keep_states"):
        layer.keep_states(torch.tensor([7]))
    with pytest.raises(ValueError, match="distinct"):
        layer.keep_states(torch.tensor([0, 0]))


def test_invalid_systems_raise_clear_errors():
    layer = make_lds(2, num_filters=2, state_dim=3, learnable=False)
    A, B, C = torch.tensor([0.5, -0.9, 1.0], dtype=F64), torch.ones(3, dtype=F64), torch.ones(3, 4, dtype=F64)
    layer.set_system(A, B, C)  # |a| = 1 is allowed
    with pytest.raises(ValueError, match="unstable"):
        layer.set_system(torch.tensor([0.5, -1.0001, 0.2]), B, C)
    with pytest.raises(ValueError, match="C \\(h, 4\\)"):
        layer.set_system(A, B, torch.ones(3, 6))
    with pytest.raises(ValueError, match="non-finite"):
        layer.set_system(A, torch.tensor([1.0, float("nan"), 1.0]), C)
    with pytest.raises(ValueError, match="mode"):
        make_lds(2, mode="approx")
    with pytest.raises(TypeError, match="build_layer\\('lds', mode="):
        LDS(2)  # the shared base alone has no projections


def test_seq_len_limit():
    layer = fitted_lds(2, seq_len=32)
    layer(torch.randn(1, 32, 2, dtype=F64))
    with pytest.raises(ValueError, match="exceeds the LDS seq_len 32"):
        layer(torch.randn(1, 33, 2, dtype=F64))
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(1, 8, 3, dtype=F64))


def test_learnable_system_stays_stable_and_trains():
    layer = make_lds(3, num_filters=2, state_dim=6, mode="tensordot", dtype=F64, chunk_size=4)
    with torch.no_grad():
        layer.A_raw.copy_(torch.tensor([50.0, -50.0, 0.0, 3.0, -3.0, 0.1]))  # a = +-1 (saturated), 0, ...
    assert layer.system()[0].abs().max() <= 1
    x = torch.randn(2, 11, 3, dtype=F64)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.A_raw.grad[3:].abs().min() > 0


def test_learnable_gradients_match_finite_differences():
    layer = make_lds(2, num_filters=1, state_dim=3, dtype=F64, chunk_size=4)
    x = torch.randn(1, 9, 2, dtype=F64, requires_grad=True)
    params = (layer.A_raw, layer.B, layer.C, layer.M_phi_plus)

    def f(x, A_raw, B, C, M):
        return torch.func.functional_call(layer, {"A_raw": A_raw, "B": B, "C": C, "M_phi_plus": M}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_fitted_float64_buffers_survive_dtype_casts():
    layer = fitted_lds(2, dtype=torch.float32)
    A = layer.A.clone()
    layer.to(torch.bfloat16)
    assert layer.A.dtype == F64 and torch.equal(layer.A, A)
    assert layer.M_phi_plus.dtype == torch.bfloat16
    layer.float()
    x = torch.randn(1, 20, 2)
    U = recurrence(x, layer.A, layer.B, layer.C)[0]
    assert rel_err(layer.features(x), U) < 1e-5


def test_scan_ignores_autocast():
    layer = fitted_lds(2, dtype=torch.float32)
    x = torch.randn(1, 50, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        U = layer.features(x)
    assert U.dtype == torch.float32
    assert rel_err(U, recurrence(x, layer.A, layer.B, layer.C)[0]) < 1e-5


@pytest.mark.parametrize("learnable", [False, True])
def test_pruned_state_dict_loads_into_a_fresh_layer(learnable):
    layer = fitted_lds(2, h=10, K=2, mode="tensordot")
    if learnable:
        layer.set_system(*layer.system(), learnable=True)
    layer.keep_states(torch.tensor([1, 2, 5]))
    fresh = make_lds(2, num_filters=2, state_dim=10, mode="tensordot", learnable=not learnable, dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.state_dim == 3 and fresh.learnable == learnable
    x = torch.randn(1, 20, 2, dtype=F64)
    assert rel_err(fresh(x), layer(x)) < 1e-12  # chunk sizes differ: equal up to rounding


def test_registered_as_lds():
    layer = build_layer("lds", dim=4, num_filters=2, state_dim=5)
    assert isinstance(layer, LDS) and layer(torch.randn(1, 7, 4)).shape == (1, 7, 4)


@pytest.mark.parametrize("mode, cls, names", [
    ("exact", LDSExact, ("M_phi_plus", "M_phi_minus")),
    ("tensordot", LDSTensordot, ("M_inputs", "M_filters_plus", "M_filters_minus")),
])
def test_the_mode_picks_the_layer_and_its_projections(mode, cls, names):
    """"lds" with a mode (as checkpoints store it) builds that mode's layer; its spec names it again, and
    its projections are its only parameters besides the system."""
    layer = build_layer("lds", dim=3, dim_out=5, num_filters=2, state_dim=4, mode=mode, learnable=False)
    assert type(layer) is cls and layer.mode == mode and layer.spec()["mode"] == mode
    assert layer.projection_names() == names == tuple(name for name, _ in layer.named_parameters())
    axes = layer.projection_axes()
    for name in names:  # each axis role matches the parameter's size
        sizes = {"in": layer.dim, "out": layer.dim_out, "": layer.num_filters}
        assert tuple(sizes[role] for role in axes[name]) == tuple(layer.get_parameter(name).shape)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    T=st.integers(1, 150),
    h=st.integers(1, 12),
    K=st.integers(1, 3),
    chunk_size=st.sampled_from([1, 3, 8, 32]),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**16),
)
def test_property_scan_equals_recurrence(batch, channels, T, h, K, chunk_size, dtype, seed):
    layer = fitted_lds(channels, h=h, K=K, dtype=dtype, chunk_size=chunk_size, seed=seed)
    u = torch.randn(batch, T, channels, dtype=F64, generator=torch.Generator().manual_seed(seed))
    U, state = layer.scan(u.to(dtype), layer.C)
    U_rec, state_rec = recurrence(u, layer.A, layer.B, layer.C)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert U.shape == (batch, T, channels, 2 * K)
    assert rel_err(U, U_rec) < tol and rel_err(state, state_rec) < tol


def test_spec_rebuilds_the_layer_as_it_is_now():
    layer = fitted_lds(2, h=10, K=2, mode="tensordot")
    layer.keep_states(torch.tensor([0, 4, 7]))
    spec = layer.spec()
    assert spec["state_dim"] == 3 and spec["learnable"] is False and spec["dtype"] == "float64"
    kwargs = dict(spec)
    rebuilt = build_layer(kwargs.pop("name"), **kwargs)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(1, 20, 2, dtype=F64)
    assert rebuilt.spec() == spec and torch.equal(rebuilt(x), layer(x))


@pytest.mark.parametrize("mode", ["exact", "tensordot"])
def test_step_cache_follows_parameter_updates_and_new_systems(mode):
    layer = fitted_lds(2, h=6, K=2, mode=mode)
    x = torch.randn(1, 5, 2, dtype=F64)

    def decode():
        state, ys = layer.init_state(1), []
        with torch.no_grad():
            for t in range(5):
                y_t, state = layer.step(x[:, t], state)
                ys.append(y_t)
        return torch.stack(ys, dim=1)

    assert rel_err(decode(), layer(x)) < 1e-12
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)  # in place, like an optimizer step
    assert rel_err(decode(), layer(x)) < 1e-12
    layer.set_system(*random_system(6, 2, seed=5))
    assert rel_err(decode(), layer(x)) < 1e-12
    layer.keep_states(torch.tensor([0, 1]))
    assert rel_err(decode(), layer(x)) < 1e-12


# ---- the convolution path of the training forward --------------------------------------------------------


def learnable_lds(dim, h=10, K=3, mode="exact", dtype=F64, chunk_size=16, seed=0, **kw) -> LDS:
    torch.manual_seed(seed)
    return make_lds(dim, num_filters=K, state_dim=h, mode=mode, learnable=True, dtype=dtype,
                    chunk_size=chunk_size, **kw)


def outputs_and_grads(layer, x, weight, path):
    layer.conv_path = path
    inputs = [x, *layer.parameters()]
    y = layer(x)
    return [y, *torch.autograd.grad((y * weight).sum(), inputs)]


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("mode, path", [("exact", "kernel"), ("exact", "project"), ("tensordot", "conv")])
@pytest.mark.parametrize("T", [1, 16, 37, 100])
def test_conv_path_equals_the_scan_forward_and_backward(learnable, mode, path, T):
    make = learnable_lds if learnable else fitted_lds
    layer = make(5, mode=mode, dim_out=4)
    x = torch.randn(2, T, 5, dtype=F64, requires_grad=True)
    weight = torch.randn(2, T, 4, dtype=F64)
    scanned = outputs_and_grads(layer, x, weight, "scan")
    convolved = outputs_and_grads(layer, x, weight, path)
    assert len(convolved) == (8 if learnable and mode == "tensordot" else 7 if learnable else
                              5 if mode == "tensordot" else 4)
    for a, b in zip(convolved, scanned, strict=True):  # (at T = 1 the gradient of A is exactly 0)
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


@pytest.mark.parametrize("mode", ["exact", "tensordot"])
def test_conv_path_in_float32_stays_close_to_the_float64_scan(mode):
    layer = fitted_lds(4, h=12, K=3, mode=mode, dtype=torch.float32)
    reference = fitted_lds(4, h=12, K=3, mode=mode, dtype=F64)
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    reference.conv_path, layer.conv_path = "scan", "conv"
    x = torch.randn(2, 300, 4)
    assert rel_err(layer(x), reference(x.double())) < 1e-5


def test_auto_path_follows_the_cost_estimates():
    """Exact mode: the scan's one shared-readout matmul wins at batch 1, the convolution (whose kernel
    W(f) is built once per batch) at batch 8; tensordot: the convolution (the per-channel scan is slow
    to differentiate), except for a long forward alone."""
    layer = make_lds(64, num_filters=24, state_dim=48, learnable=False)
    assert layer._sequence_path(1, 1024) == "scan" and layer._sequence_path(8, 4096) == "kernel"
    tensordot = make_lds(64, num_filters=24, state_dim=48, mode="tensordot")
    assert tensordot._sequence_path(1, 4096) == "conv"
    with torch.no_grad():  # a forward alone (prefill, inference): the per-channel scan wins at length
        assert [tensordot._sequence_path(1, T) for T in (1024, 8192)] == ["conv", "scan"]
        assert tensordot._sequence_path(8, 8192, backward=True) == "conv"  # as a training step's
    layer.conv_path = "conv"
    assert layer._sequence_path(1, 1024) in ("kernel", "project")
    with pytest.raises(UserError, match="conv_path"):
        layer.conv_path = "fft"
    with pytest.raises(UserError, match="conv_path"):
        make_lds(8, conv_path="fft")
    assert layer.conv_path == "conv" and layer.spec()["conv_path"] == "conv"


def test_fixed_response_spectrum_is_cached_and_follows_the_system(monkeypatch):
    layer = fitted_lds(3, mode="tensordot")
    layer.conv_path = "conv"
    calls = []
    original = lds_paths.response_spectrum
    monkeypatch.setattr(lds_paths, "response_spectrum", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 30, 3, dtype=F64)
    y = layer(x)
    assert torch.equal(layer(x), y) and len(calls) == 1  # same length: from the cache
    layer(x[:, :10])
    assert len(calls) == 2  # another FFT length
    assert not any(k.startswith("_spectra") for k in layer.state_dict())
    with torch.no_grad():
        layer.C.mul_(2)  # edited in place (as load_state_dict does)
    layer.conv_path = "scan"
    expected = layer(x)
    layer.conv_path = "conv"
    assert rel_err(layer(x), expected) < 1e-12 and len(calls) == 3
    layer.set_system(*random_system(10, 3, seed=1))  # a new system: new tensors
    layer.conv_path = "scan"
    expected = layer(x)
    layer.conv_path = "conv"
    assert rel_err(layer(x), expected) < 1e-12 and len(calls) == 4


def test_learnable_conv_path_trains_like_the_scan():
    layers = [learnable_lds(3, conv_path=path) for path in ("scan", "kernel")]
    x = torch.randn(2, 40, 3, dtype=F64)
    for layer in layers:
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(3):  # the spectrum is rebuilt every step from the updated parameters
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
    layers[1].conv_path = "scan"
    assert rel_err(layers[1](x), layers[0](x)) < 1e-10


def test_conv_path_ignores_autocast():
    layer = fitted_lds(2, dtype=torch.float32, conv_path="kernel")
    x = torch.randn(1, 50, 2)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and rel_err(y, expected) < 1e-6


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("mode, path", [("exact", "kernel"), ("exact", "project"), ("tensordot", "conv")])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_prefill_by_convolution_equals_the_scan_and_decodes_on(learnable, mode, path, dtype,
                                                               monkeypatch):
    """prefill takes forward's path: a convolution plus the final state as one matmul, equal to the scan's
    outputs and state; the steps after it continue the forward."""
    layer = (learnable_lds if learnable else fitted_lds)(3, mode=mode, dim_out=2, dtype=dtype).to(dtype)
    x = torch.randn(2, 45, 3, dtype=dtype)
    tol = 1e-11 if dtype == F64 else 1e-5
    layer.conv_path = "scan"
    y_scan, state_scan = layer.prefill(x[:, :29])
    full = layer(x)
    layer.conv_path = path
    monkeypatch.setattr(layer, "scan", lambda *a: pytest.fail("prefill scanned"))
    y, state = layer.prefill(x[:, :29])
    assert rel_err(y, y_scan) < tol and rel_err(state, state_scan) < tol
    assert state.shape == state_scan.shape and state.dtype == state_scan.dtype
    steps = [y]
    for t in range(29, 45):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t[:, None])
    assert rel_err(torch.cat(steps, dim=1), full) < tol


@pytest.mark.parametrize("name, extra", [("lds", {}), ("lds_ar", {"ar_order": 2})])
@pytest.mark.parametrize("mode, cls", [("exact", LDSExact), ("tensordot", LDSTensordot)])
def test_specs_stored_by_older_checkpoints_restore(name, extra, mode, cls):
    """A checkpoint stores {"name": "lds" | "lds_ar", ..., "mode": ...} (the keys of the one-class LDS):
    `restore_layers` rebuilds that mode's layer from it, whose spec is the stored one again."""
    stored = {"name": name, "dim": 3, "seq_len": 64, "num_filters": 2, "state_dim": 5, "mode": mode,
              "dim_out": 4, "learnable": False, "dtype": "float64", "chunk_size": 8, **extra}
    holder = torch.nn.ModuleDict({"mixer": torch.nn.Identity()})
    assert restore_layers(holder, {"mixer": stored}) == ["mixer"]
    assert isinstance(holder["mixer"], cls) and holder["mixer"].spec() == stored
    assert restore_layers(holder, {"mixer": stored}) == []  # as it is now: nothing to rebuild
