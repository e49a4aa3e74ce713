"""LightningModules: shapes, decoding == forward, checkpoints rebuild swapped layers."""

from pathlib import Path

import pytest
import torch

from spectralds.generate import generate, sample_next, set_decode_method
from spectralds.layers import build_layer, layer_specs
from spectralds.models import LanguageModel, SequenceRegression, WarmupCosineLR


def tiny_lm(pattern=("stu",), **kw) -> LanguageModel:
    torch.manual_seed(0)
    args = dict(vocab_size=32, dim=16, num_layers=2, layer_pattern=list(pattern), seq_len=32, num_filters=4)
    args["layer_kwargs"] = {"attn": {"num_heads": 2, "window_size": 8}}
    args.update(kw)
    return LanguageModel(**args).eval()


@pytest.mark.parametrize("pattern", [("stu",), ("stu_t",), ("stu", "attn"), ("attn",), ("lds",)])
def test_forward_shape_and_decoding_matches_forward(pattern):
    model = tiny_lm(pattern).double()
    idx = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        full = model(idx)
        logits, states = model.prefill(idx[:, :12])
        torch.testing.assert_close(logits, full[:, 11], rtol=1e-6, atol=1e-6)
        for t in range(12, 20):
            logits, states = model.step(idx[:, t], states)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-6, atol=1e-6)
    assert full.shape == (2, 20, 32)


def test_layer_pattern_alternates():
    model = tiny_lm(("stu", "attn"), num_layers=4)
    names = [type(b.mixer).__name__ for b in model.blocks]
    assert names == ["STU", "SlidingWindowAttention", "STU", "SlidingWindowAttention"]


def test_tied_embeddings():
    model = tiny_lm()
    assert model.head.weight is model.embed.weight


def test_generation_greedy_same_for_naive_and_futurefill():
    model = tiny_lm()
    prompt = torch.randint(0, 32, (1, 5))
    set_decode_method(model, "naive")
    a = generate(model, prompt, 20)
    assert set_decode_method(model, "futurefill") == 2
    b = generate(model, prompt, 20)
    assert torch.equal(a, b) and a.shape == (1, 25)
    # greedy generation == argmax of the full forward on the generated text
    with torch.no_grad():
        logits = model(a[:, :-1])
    assert torch.equal(logits.argmax(-1)[:, 4:], a[:, 5:])


def test_generation_errors():
    model = tiny_lm()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="unknown decode"):
        set_decode_method(model, "fast")


def test_sampling_top_k_only_picks_top_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(picks.tolist()) == {1, 2}


def test_layer_specs_roundtrip_rebuilds_lds():
    from spectralds.layers import restore_layers
    from spectralds.layers.lds import LDS

    stu_model, lds_model = tiny_lm(("stu",)), tiny_lm(("lds",), layer_kwargs=None)
    specs = layer_specs(lds_model)
    rebuilt = restore_layers(stu_model, specs)
    assert rebuilt == ["blocks.0.mixer", "blocks.1.mixer"]
    assert all(isinstance(b.mixer, LDS) for b in stu_model.blocks)
    stu_model.load_state_dict(lds_model.state_dict())


def test_regression_model_shapes():
    model = SequenceRegression(d_in=3, d_out=2, dim=8, seq_len=16, num_filters=4)
    assert model(torch.randn(4, 16, 3)).shape == (4, 16, 2)
    assert model.per_position_mse(torch.randn(4, 16, 3), torch.randn(4, 16, 2)).shape == (16,)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=1e-6) and lrs[115] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        WarmupCosineLR(opt, warmup_steps=10, total_steps=10)


@pytest.mark.parametrize("variant", [None, "transformer.yaml"], ids=["flash_stu", "transformer"])
def test_340m_configs_have_340m_parameters(variant, tmp_path, monkeypatch):
    """The paper-scale configs: 340M parameters each (Flash STU and its Transformer baseline match)."""
    from spectralds.cli_config import resolved_config

    configs = Path(__file__).parents[2] / "configs"
    stack = [configs / "flash_stu_340m.yaml", *([configs / "flash_stu_340m" / variant] if variant else [])]
    # Resolved as `fit` would, but with the byte tokenizer (no o200k file here): the written vocab_size
    # (200064) still wins over the tokenizer's count, as in a real run.
    init_args = resolved_config(stack, ["--data.init_args.tokenizer=byte"])["model"]["init_args"]
    kwargs = {k: v for k, v in init_args.items() if k not in ("optimizer", "lr_scheduler")}
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path))
    kwargs["seq_len"] = 256  # no parameter depends on seq_len; short filters keep the test fast
    # The filters are computed for real first (a meta tensor holds no numbers), then reused in-process.
    build_layer("stu_t", dim=8, seq_len=256, num_filters=kwargs["num_filters"])
    with torch.device("meta"):  # count without allocating 1.4 GB
        model = LanguageModel(**kwargs)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 340e6) < 0.01 * 340e6, f"{stack[-1].name}: {params / 1e6:.1f}M parameters"


def test_cuda_graph_decoding_refuses_what_it_cannot_do():
    from spectralds.generate import GraphedStep

    stu = tiny_lm(("stu",))
    prompt = torch.randint(stu.hparams.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="CUDA"):
        generate(stu, prompt, 4, cuda_graph=True)
    if torch.cuda.is_available():
        with torch.inference_mode():
            logits, states = stu.cuda().prefill(prompt.cuda())
        with pytest.raises(ValueError, match="fixed-size states"):
            GraphedStep(stu, logits.argmax(-1), states)


# ---- training: non-finite losses, telemetry ---------------------------------------------------------------
def _regression_fit(tmp_path, policy: str, poison_step: int, **trainer_kw):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class PoisonInputs(L.Callback):
        def __init__(self):
            self.before, self.after = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == poison_step:
                batch[0][0, 0, 0] = float("nan")
            self.before.append(_state(pl_module, trainer))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after.append(_state(pl_module, trainer))

    torch.manual_seed(0)
    model = SequenceRegression(d_in=2, d_out=2, dim=8, seq_len=16, num_filters=4, nonfinite_loss=policy)
    u = torch.randn(32, 16, 2)
    data = DataLoader(TensorDataset(u, u.cumsum(1) / 4), batch_size=4)
    probe = PoisonInputs()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", callbacks=[probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_kw,
    )
    trainer.fit(model, data)
    return trainer, probe


def _state(module, trainer) -> dict:
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = trainer.optimizers[0].state_dict()["state"] if trainer.optimizers else {}
    moments = {(i, k): v.clone() for i, s in optimizer.items() for k, v in s.items()}
    return {"weights": weights, "optimizer": moments}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_skip_leaves_weights_and_adamw_state_untouched_on_the_bad_step(tmp_path, clip):
    trainer, probe = _regression_fit(tmp_path, "skip", poison_step=2, gradient_clip_val=clip)
    assert trainer.global_step == 5  # the run finished
    before, after = probe.before[2], probe.after[2]
    # AdamW (weight_decay 0.01) would shrink the weights and move its moments on a zero gradient.
    assert _same(before["weights"], after["weights"])
    assert _same(before["optimizer"], after["optimizer"])
    for step in (1, 3, 4):
        assert not _same(probe.before[step]["weights"], probe.after[step]["weights"])


def test_stop_raises_naming_the_step(tmp_path):
    from spectralds.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"^non-finite training loss \(nan\) at global step 2; stopping"):
        _regression_fit(tmp_path, "stop", poison_step=2)


def test_training_flops_sum_layer_reports_and_linear_layers():
    from spectralds.models.telemetry import flops_per_token, forward_flops

    model = tiny_lm(("stu_t", "attn"), mlp_ratio=2.0)
    batch, T = 3, 32
    flops = forward_flops(model, batch, T)
    # The mixers report their own paths (STU-T: projection, kernel mix, FFTs; attention: QK^T and AV);
    # every block's MLP (3 matrices of 16 x 32), attention's qkv / o_proj and the tied head (16 x 32, once)
    # count 2 FLOPs per token per weight; STU-T's M_* are not counted again.
    stu_t, attn = model.blocks[0].mixer, model.blocks[1].mixer
    attn_weights = attn.qkv.weight.numel() + attn.o_proj.weight.numel()
    mlp = 3 * 16 * 32
    linear = 2 * batch * T * (attn_weights + 2 * mlp + 16 * 32)
    assert flops == pytest.approx(stu_t.forward_flops(batch, T) + attn.forward_flops(batch, T) + linear)
    assert attn.forward_flops(batch, T) == 4 * batch * 16 * sum(min(t + 1, 8) for t in range(T))
    assert flops_per_token(model, T, batch) == pytest.approx(flops / (batch * T))
    assert model.train_flops((torch.zeros(batch, T, dtype=torch.long), None)) == pytest.approx(3 * flops)


def test_training_flops_count_the_stu_m_once():
    from spectralds.models.telemetry import forward_flops

    model = tiny_lm(("stu",))
    stu = [b.mixer for b in model.blocks]
    # MLPs and the tied head's table (named once); an STU's M (K, d, d) enters only through its report
    others = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "mixer" not in n)
    assert others == 2 * 3 * 16 * 64 + 32 * 16
    expected = sum(m.forward_flops(2, 32) for m in stu) + 2 * 2 * 32 * others
    assert forward_flops(model, 2, 32) == pytest.approx(expected)


def test_default_telemetry_adds_one_lr_monitor_and_throughput_only_when_missing(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from spectralds.callbacks import TokenThroughput
    from spectralds.models.telemetry import default_callbacks

    trainer = L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu")
    kinds = [type(c) for c in default_callbacks(trainer)]
    assert kinds == [LearningRateMonitor, TokenThroughput]
    mine = LearningRateMonitor(logging_interval="step")
    trainer = L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", callbacks=[mine, TokenThroughput()])
    assert default_callbacks(trainer) == []
    assert default_callbacks(L.Trainer(logger=False, accelerator="cpu")) == []  # LRMonitor needs a logger
    # One learning-rate curve, named train/lr, with or without a scheduler.
    config = tiny_lm().configure_optimizers()["lr_scheduler"]
    assert config["name"] == "train/lr" and config["interval"] == "step"


@pytest.mark.slow  # inductor compiles two blocks on the CPU: about a minute on 2 cores
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_compiled_model_matches_eager_and_trains_the_same(tmp_path):
    eager = tiny_lm(("stu_t", "attn")).train()
    compiled = tiny_lm(("stu_t", "attn"), compile=True).train()
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # same names: checkpoints interchange
    ids = torch.randint(0, 32, (2, 25))
    batch = (ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(compiled(batch[0]), eager(batch[0]), rtol=1e-5, atol=1e-5)
    losses = []
    for model in (eager, compiled):  # one training step each
        # SGD, not Adam: Adam's first step is lr * g / (|g| + eps), which turns a 1e-8 difference in a
        # near-zero gradient into a 1e-5 one in the weight; SGD's step is linear in the gradient.
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        losses.append(model._nll(batch).mean())
        losses[-1].backward()
        opt.step()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="compile"):
        tiny_lm(compile="yes")
