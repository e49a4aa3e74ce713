"""CUDA: every layer on the GPU against its float64 CPU result, exact decoding, bf16 training, distillation.

All skip cleanly without CUDA; `tools/run_gpu_suite.sh` runs them on a GPU machine.
"""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spectralds.callbacks import STUToLDSDistillation
from spectralds.generate import GraphedStep, generate, set_decode_method
from spectralds.layers import build_layer
from spectralds.layers.lds import LDS
from spectralds.models import LanguageModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DIM, SEQ = 64, 512
KWARGS = {
    "stu": {"num_filters": 8},
    "stu_t": {"num_filters": 8},
    "lds": {"num_filters": 8, "state_dim": 16},
    "attn": {"num_heads": 4, "window_size": 64},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm()).item()


@pytest.mark.parametrize("name", list(KWARGS))
def test_layer_on_gpu_matches_cpu_float64(name):
    torch.manual_seed(0)
    layer = build_layer(name, dim=DIM, seq_len=SEQ, **KWARGS[name])
    x = torch.randn(2, SEQ, DIM)
    expected = copy.deepcopy(layer).double()(x.double())
    layer = layer.cuda()
    assert rel(layer(x.cuda()), expected) < 1e-4  # float32 on the GPU
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.cuda())
    assert torch.isfinite(y).all() and rel(y, expected) < 3e-2


@pytest.mark.parametrize("name,decode", [("stu", "futurefill"), ("stu", "naive"), ("stu_t", "futurefill"),
                                         ("lds", None), ("attn", None)])
def test_decoding_on_gpu_matches_forward(name, decode):
    torch.manual_seed(0)
    layer = build_layer(name, dim=DIM, seq_len=SEQ, **KWARGS[name]).cuda().eval()
    if decode:
        set_decode_method(layer, decode)
    x = torch.randn(2, 300, DIM, device="cuda")
    with torch.inference_mode():
        expected = layer(x)
        y, state = layer.prefill(x[:, :73])
        outs = [y]
        for t in range(73, x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            outs.append(y_t[:, None])
    assert rel(torch.cat(outs, dim=1), expected) < 1e-4


def token_data(n: int = 64, seq: int = 64, vocab: int = 32) -> DataLoader:
    """A learnable pattern: each sequence counts up modulo the vocabulary from a random start."""
    start = torch.randint(vocab, (n, 1), generator=torch.Generator().manual_seed(0))
    seqs = (start + torch.arange(seq + 1)) % vocab
    return DataLoader(TensorDataset(seqs[:, :-1], seqs[:, 1:]), batch_size=8)


def test_bf16_mixed_training_on_gpu_is_finite_then_distills(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=32, dim=64, num_layers=2, layer_pattern=["stu", "attn"], seq_len=128,
                          num_filters=8, layer_kwargs={"attn": {"num_heads": 4, "window_size": 32}})
    idx = next(iter(token_data()))[0].cuda()
    losses, logits = [], {}

    class Record(L.Callback):  # listed before the distillation, so its on_train_end sees the STU model
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        @torch.inference_mode()
        def on_train_end(self, trainer, module):
            logits["stu"] = module(idx).float()

    class After(L.Callback):  # listed after it: sees the swapped layer, still on the GPU
        def on_train_end(self, trainer, module):
            logits["device"] = next(module.blocks[0].mixer.buffers()).device.type

    distill = STUToLDSDistillation(state_dim=32, save_path=None, log_plot=False)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[Record(), distill, After()])
    trainer.fit(model, train_dataloaders=token_data(), val_dataloaders=token_data(16))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]

    assert isinstance(model.blocks[0].mixer, LDS) and logits["device"] == "cuda"
    with torch.inference_mode():  # Lightning moved the model back to the CPU at the end of fit
        after = model.cuda().eval()(idx).float()
    assert rel(after, logits["stu"]) < 1e-3


def test_cuda_graph_decoding_matches_eager():
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=64, dim=64, num_layers=2, layer_pattern=["lds"], seq_len=256,
                          num_filters=8, layer_kwargs={"lds": {"state_dim": 16}}).cuda().eval()
    prompt = torch.randint(64, (2, 20), device="cuda")
    assert torch.equal(generate(model, prompt, 60, cuda_graph=False), generate(model, prompt, 60))
    with torch.inference_mode():  # the graph's logits, step by step, against eager steps
        logits, states = model.prefill(prompt)
        token = logits.argmax(-1)
        graphed = GraphedStep(model, token, states)
        eager_states = [s.clone() for s in states]
        for _ in range(30):
            expected, eager_states = model.step(token, eager_states)
            actual, states = graphed(token, states)
            assert rel(actual, expected) < 1e-6
            token = expected.argmax(-1)


@pytest.mark.parametrize("lds", ["lds", "lds_ar"])
def test_cuda_graph_decodes_the_distilled_flash_stu(monkeypatch, lds):
    """LDS (with AR terms or not) + sliding-window attention: generate records one CUDA graph
    (ring-buffer KV cache, position tensor) and gives the eager tokens, for one prompt batch and for
    prompts of different lengths."""
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=64, dim=64, num_layers=4, layer_pattern=[lds, "attn"], seq_len=256,
                          num_filters=8, layer_kwargs={"lds": {"state_dim": 16},
                                                       "lds_ar": {"state_dim": 16, "ar_order": 2},
                                                       "attn": {"num_heads": 4, "window_size": 16}})
    model = model.cuda().eval()
    prompt = torch.randint(64, (3, 20), device="cuda")
    calls = []
    original = GraphedStep.__init__
    monkeypatch.setattr(GraphedStep, "__init__", lambda self, *a: calls.append(1) or original(self, *a))
    assert torch.equal(generate(model, prompt, 60, cuda_graph=False), generate(model, prompt, 60))
    ragged = [prompt[0, :5], prompt[1], prompt[2, :13]]
    graphed = generate(model, ragged, 60)
    assert calls == [1, 1]  # each generate with the default cuda_graph recorded a graph
    eager = generate(model, ragged, 60, cuda_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager, strict=True))
    with torch.inference_mode():  # the graph's logits, step by step, against eager steps, past the wrap
        logits, states = model.prefill(prompt)
        token = logits.argmax(-1)
        replay = GraphedStep(model, token, states)
        graph_states = states  # the first call loads the prefill's states into the graph's own
        for _ in range(40):
            actual, graph_states = replay(token, graph_states)
            expected, states = model.step(token, states)
            assert rel(actual, expected) < 1e-6
            token = expected.argmax(-1)
