"""ListOps (spectralds/data/listops.py), the sequence classifier (spectralds/models/classification.py) with
every layer kind, and LAST pruning of a trained learnable LDS against an independent H-infinity score."""

from __future__ import annotations

import copy
import importlib
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spectralds.data import listops as LO
from spectralds.distill import prune as P
from spectralds.errors import UserError
from spectralds.models.classification import SequenceClassifier, accuracy

F64 = torch.float64


# ---- the generator ------------------------------------------------------------------------------------
def stack_value(tokens: list[str]) -> tuple[int, int, int]:
    """Evaluate prefix ListOps with a stack, independently of the generator's tree: (value, depth, most
    arguments of one operator). Raises on a malformed expression."""
    stack: list[tuple[str, list[int]]] = []
    depth = max_args = 0
    result = None
    for token in tokens:
        assert result is None, "tokens after the end of the expression"
        if token.startswith("["):
            stack.append((token, []))
            depth = max(depth, len(stack))
            continue
        if token == "]":
            op, args = stack.pop()
            assert len(args) >= 2, "an operator with fewer than 2 arguments"
            max_args = max(max_args, len(args))
            value = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                     "[MED": int(np.median(args))}[op]
        else:
            value = int(token)
            assert 0 <= value <= 9 and token == str(value)
            depth = max(depth, len(stack) + 1)
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    assert result is not None and not stack
    return result, depth, max_args


@pytest.mark.parametrize(("min_length", "max_length", "max_depth", "max_args"),
                         [(1, 60, 10, 10), (100, 300, 10, 10), (5, 40, 3, 4)])
def test_every_label_equals_an_independent_evaluation(min_length, max_length, max_depth, max_args):
    examples = LO.generate(300, min_length, max_length, seed=1, max_depth=max_depth, max_args=max_args)
    assert len({" ".join(t) for t, _ in examples}) == 300  # distinct
    for tokens, label in examples:
        value, depth, most_args = stack_value(tokens)
        assert label == value
        assert min_length < len(tokens) < max_length
        assert depth <= max_depth and most_args <= max_args
    labels = {label for _, label in examples}
    assert labels == set(range(10))  # every class occurs


def test_median_rounds_down_as_lra_does():
    rng = random.Random(0)
    for _ in range(200):
        args = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        assert LO.evaluate(("[MED", args)) == int(np.median(args))
    assert LO.evaluate(("[MED", [1, 2])) == 1 and LO.evaluate(("[SM", [9, 9, 3])) == 1


def test_lra_draw_probabilities():
    """Roots: a digit with probability 0.75; an operator has 2-10 arguments uniformly."""
    rng = random.Random(0)
    trees = [LO.random_tree(rng, limit=10_000) for _ in range(4000)]
    digits = sum(isinstance(t, int) for t in trees) / len(trees)
    assert abs(digits - 0.75) < 0.03
    counts = [len(t[1]) for t in trees if not isinstance(t, int)]
    assert min(counts) == 2 and max(counts) == 10


def test_splits_are_fixed_by_the_seed_and_disjoint():
    kw = dict(seq_len=60, min_length=10, num_train=60, num_val=20, num_test=20, batch_size=8)
    a, b, c = LO.ListOpsDataModule(**kw), LO.ListOpsDataModule(**kw), LO.ListOpsDataModule(**kw, seed=1)
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a.splits[split].ids, b.splits[split].ids, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.splits["test"].ids, c.splits["test"].ids, strict=True))
    keys = [{tuple(x.tolist()) for x in a.splits[s].ids} for s in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    ids, lengths, labels = next(iter(a.train_dataloader()))
    assert ids.shape[0] == 8 and ids.shape[1] == int(lengths.max()) <= 60
    assert (ids[torch.arange(8), lengths - 1] == LO.TOKEN_ID[LO.EOS]).all()  # the end token, then padding
    assert all((row[n:] == 0).all() for row, n in zip(ids, lengths, strict=True))


def test_bad_data_arguments_are_one_line_errors():
    with pytest.raises(UserError, match="min_length"):
        LO.ListOpsDataModule(seq_len=10, min_length=9)
    with pytest.raises(UserError, match="num_train"):
        LO.ListOpsDataModule(num_train=0)


# ---- the classifier -------------------------------------------------------------------------------
LAYERS = {
    "lds learnable tensordot": ("lds", {"learnable": True, "state_dim": 8, "mode": "tensordot"}),
    "lds learnable exact": ("lds", {"learnable": True, "state_dim": 8, "mode": "exact"}),
    "stu": ("stu", {}),
    "stu_t": ("stu_t", {}),
    "attn": ("attn", {"num_heads": 2, "window_size": 16}),
}


def small_data(seq_len: int = 48) -> LO.ListOpsDataModule:
    dm = LO.ListOpsDataModule(seq_len=seq_len, min_length=5, num_train=64, num_val=16, num_test=16,
                              batch_size=16)
    dm.setup()
    return dm


@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_kind_classifies_and_ignores_padding(kind):
    name, kwargs = LAYERS[kind]
    torch.manual_seed(0)
    model = SequenceClassifier(dim=16, num_layers=2, layer_pattern=[name], seq_len=48, num_filters=4,
                               layer_kwargs={name: kwargs}, mlp_ratio=1.0)
    dm = small_data()
    ids, lengths, labels = next(iter(dm.train_dataloader()))
    logits = model(ids, lengths)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    for row in (0, int(lengths.argmin())):  # each row alone, unpadded, gives the same logits
        alone = model(ids[row : row + 1, : lengths[row]], lengths[row : row + 1])
        torch.testing.assert_close(alone[0], logits[row], rtol=1e-4, atol=1e-5)
    # it learns: a few steps on one batch lower its loss
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_classifier_refuses_bad_input():
    model = SequenceClassifier(dim=16, num_layers=1, seq_len=32, num_filters=4,
                               layer_kwargs={"lds": {"learnable": True, "state_dim": 4}})
    with pytest.raises(UserError, match="seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(UserError, match="lengths"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 8]))
    with pytest.raises(UserError, match="num_classes"):
        SequenceClassifier(num_classes=1)


# ---- pruning a trained learnable LDS ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A 3-layer learnable-LDS classifier trained 40 steps (A, B, C moved away from their init)."""
    torch.manual_seed(0)
    model = SequenceClassifier(dim=16, num_layers=3, layer_pattern=["lds"], seq_len=48, num_filters=4,
                               layer_kwargs={"lds": {"learnable": True, "state_dim": 12}}, mlp_ratio=1.0)
    init = [layer.A_raw.detach().clone() for _, layer in P.find_lds_layers(model)]
    dm = small_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        for ids, lengths, labels in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (_, layer), a0 in zip(P.find_lds_layers(model), init, strict=True):
        assert (layer.A_raw.detach() - a0).abs().max() > 1e-3  # trained eigenvalues
    return model.eval(), dm


def measured_score(layer, j: int, horizon: int | None = None) -> float:
    """Squared H-infinity norm of state j's subsystem, measured on the layer itself: keep state j only,
    run unit impulses of every input channel through its forward (float64), read the lag-0 gain G0
    (d_out, d) and the pole from lag 1 (G1 = a G0), and take the peak over a frequency grid of
    sigma_max(G0) / |1 - a e^{-i w}| (the response is G0 a^t), or with `horizon` L of
    sigma_max(G0) |sum_{t<L} a^t e^{-i w t}|."""
    one = copy.deepcopy(layer).double()
    one.run_dtype = F64
    one.keep_states(torch.tensor([j]))
    d = one.dim
    impulses = torch.zeros(d, 2, d, dtype=F64)
    impulses[torch.arange(d), 0, torch.arange(d)] = 1.0
    with torch.no_grad():
        y = one(impulses)  # (d inputs, 2 lags, d_out)
    G0, G1 = y[:, 0].T, y[:, 1].T
    a = float((G1 * G0).sum() / G0.square().sum())
    torch.testing.assert_close(G1, a * G0, rtol=1e-9, atol=1e-12)  # one pole indeed
    w = torch.linspace(0, torch.pi, 4097, dtype=F64)
    if horizon is None:
        gain = (1 / (1 - a * torch.exp(-1j * w)).abs()).max()
    else:
        t = torch.arange(horizon, dtype=F64)
        gain = ((a ** t)[None] * torch.exp(-1j * w[:, None] * t[None])).sum(1).abs().max()
    return float((torch.linalg.matrix_norm(G0, ord=2) * gain) ** 2)


def test_last_scores_of_a_trained_lds_match_the_measured_h_infinity_norm(trained):
    model, _ = trained
    for _, layer in P.find_lds_layers(model):
        scores = P.state_scores(layer)
        measured = torch.tensor([measured_score(layer, j) for j in range(layer.state_dim)], dtype=F64)
        torch.testing.assert_close(scores, measured, rtol=1e-9, atol=0)
        short = torch.tensor([measured_score(layer, j, 48) for j in range(layer.state_dim)], dtype=F64)
        torch.testing.assert_close(P.state_scores(layer, horizon=48), short, rtol=1e-9, atol=0)
        assert (short <= scores * (1 + 1e-12)).all()  # a finite horizon never gains more


def independent_last(model, ratio: float) -> list[set[int]]:
    """LAST from the measured scores: per layer h_i / sum_{h_j >= h_i} h_j, one global threshold."""
    normalized = []
    for _, layer in P.find_lds_layers(model):
        h = [measured_score(layer, j) for j in range(layer.state_dim)]
        normalized.append([v / sum(u for u in h if u >= v) for v in h])
    flat = sorted((v for layer in normalized for v in layer), reverse=True)
    keep = round(len(flat) * (1 - ratio))
    threshold = flat[keep - 1]
    return [{j for j, v in enumerate(layer) if v >= threshold} for layer in normalized]


@pytest.mark.parametrize("ratio", [0.33, 0.6])
def test_pruning_a_trained_lds_keeps_the_independent_last_states(trained, ratio):
    model, dm = trained
    expected = independent_last(model, ratio)
    pruned = copy.deepcopy(model)
    P.prune_lds_layers(pruned, ratio, "last")
    for (_, before), (_, after), keep in zip(P.find_lds_layers(model), P.find_lds_layers(pruned), expected,
                                             strict=True):
        index = sorted(keep)
        assert after.state_dim == len(index) < before.state_dim
        assert torch.equal(after.A_raw, before.A_raw[index])  # the trained values, unchanged
        assert torch.equal(after.C, before.C[index]) and torch.equal(after.B, before.B[index])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert 0.0 <= accuracy(pruned, dm.test_dataloader()) <= 1.0


def test_random_pruning_is_seeded(trained):
    model, _ = trained
    layers = [layer for _, layer in P.find_lds_layers(model)]
    a, b = P.select_states(layers, 0.5, "random", seed=3), P.select_states(layers, 0.5, "random", seed=3)
    c = P.select_states(layers, 0.5, "random", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert sum(k.numel() for k in a) == 18 and all(k.numel() >= 1 for k in a)
    with pytest.raises(UserError, match="seed"):
        P.select_states(layers, 0.5, "random", seed=-1)


# ---- configs/listops.yaml and tools/listops_prune.py ------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("listops_prune")


def test_the_verdict_reads_the_numbers(tool):
    args = {"ratios": [0.0, 0.33, 0.5], "at": 0.33, "methods": ["last", "uniform", "random"], "seeds": 2}
    accs = {("last", 0): [0.5, 0.496, 0.45], ("uniform", 0): [0.5, 0.48, 0.46],
            ("random", 0): [0.5, 0.40, 0.30], ("random", 1): [0.5, 0.44, 0.20]}
    records = [{"method": m, "seed": s, "ratio": r, "acc": a, "states": 10, "params": 5, "lds_params": 2,
                "state_floats": 4, "per_layer": [5, 5], "ms_per_seq": 1.0, "step_us": 2.0,
                "lds_ms_per_seq": 0.5}
               for (m, s), values in accs.items() for r, a in zip(args["ratios"], values, strict=True)]
    result = {"args": args, "records": records, "unpruned": {"acc": 0.5, "states": 15, "per_layer": [8, 7]}}
    one, two = tool.verdict(result)
    assert "+0.40 points -> holds" in one
    assert "holds;" in two and "uniform H-inf 1/2 (ties 0)" in two and "random 2/2" in two
    rows = tool.summary_rows(result)
    assert [r["method"] for r in rows] == ["unpruned", "LAST", "uniform H-inf", "random (mean of 2)"]
    assert rows[3]["acc"] == pytest.approx(0.42) and rows[3]["loss"] == pytest.approx(8.0)
    for r in records:  # LAST now below uniform at 33% and more than a point lost
        if r["method"] == "last" and r["ratio"] == 0.33:
            r["acc"] = 0.47
    one, two = tool.verdict(result)
    assert "does not hold" in one and "does not hold" in two


def test_config_trains_and_the_tool_prunes_its_checkpoint(tool, tmp_path, capsys):
    """`spectralds fit --config configs/listops.yaml`, shrunk, then the tool on its last.ckpt."""
    from spectralds.cli_lightning import SpectraLDSCLI

    shrink = ["--trainer.max_steps=4", "--trainer.val_check_interval=4",
              "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.seq_len=60",
              "--data.init_args.min_length=10", "--data.init_args.num_train=32",
              "--data.init_args.num_val=8", "--data.init_args.num_test=20", "--data.init_args.batch_size=8",
              "--model.init_args.num_layers=2", "--model.init_args.dim=16"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = SpectraLDSCLI(args=["fit", "--config", str(REPO / "configs" / "listops.yaml"), *shrink])
    assert cli.trainer.global_step == 4 and cli.model.seq_len == 60
    ckpt = next(tmp_path.glob("listops/version_0/checkpoints/last.ckpt"))
    result = tool.main(["--ckpt", str(ckpt), "--ratios", "0", "0.5", "--seeds", "2", "--repeats", "1",
                        "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "claim 1" in out and "claim 2" in out and (tmp_path / "p.png").stat().st_size > 0
    assert result["test_size"] == 20 and result["unpruned"]["states"] == 2 * 64
    at33 = [r for r in result["records"] if r["ratio"] == 0.33 and r["method"] == "last"][0]
    assert at33["states"] == round(128 * 0.67) and at33["params"] < result["unpruned"]["params"]
