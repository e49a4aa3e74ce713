"""lm-eval evaluation: three local tasks (multiple choice, perplexity, generation) on a tiny trained STU
model and its distilled LDS, through `spectralds eval` and through lm-eval's own CLI; one-line errors."""

import base64
import json
import logging
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402
import lm_eval.utils  # noqa: E402
from cli_helpers import one_line_error, run_cli  # noqa: E402

from spectralds.callbacks import STUToLDSDistillation  # noqa: E402
from spectralds.checkpoint_io import load_model  # noqa: E402
from spectralds.errors import UserError  # noqa: E402
from spectralds.evaluation import evaluate_models, format_table, rows  # noqa: E402
from spectralds.evaluation.lm_eval_backend import SpectraLDSLM  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

ASSETS = Path(__file__).parents[1] / "assets"
TASKS_DIR = Path(__file__).parents[2] / "spectralds" / "evaluation" / "tasks"  # shipped: configs use them
TASKS = "spectralds_mc,spectralds_ppl,spectralds_gen"
SEQ = 64


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """The CLI switches datasets/huggingface_hub to offline mode in-process: undo it after each test."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)


def _corpus_tokens() -> torch.Tensor:
    text = "\n\n".join(
        p.read_text(encoding="utf-8") for p in sorted((ASSETS / "data" / "corpus").rglob("*")) if p.suffix in
        (".md", ".txt")
    )
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A byte-level STU LM trained for a few steps (stu.ckpt) and its distilled LDS (lds.ckpt)."""
    out = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    tokens = _corpus_tokens()
    starts = torch.randint(0, len(tokens) - SEQ - 1, (64,))
    windows = torch.stack([tokens[s : s + SEQ + 1] for s in starts])
    data = DataLoader(TensorDataset(windows[:, :-1], windows[:, 1:]), batch_size=16)
    model = LanguageModel(vocab_size=256, dim=16, num_layers=2, layer_pattern=["stu"], seq_len=SEQ,
                          num_filters=4, mlp_ratio=2.0)
    steps = 8
    callbacks = [
        ModelCheckpoint(dirpath=out, filename="stu", every_n_train_steps=steps, save_top_k=-1),
        STUToLDSDistillation(state_dim=16, save_path=str(out / "lds.ckpt"), validate=False, log_plot=False),
    ]
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=callbacks, default_root_dir=out).fit(model, data)
    return out / "stu.ckpt", out / "lds.ckpt"


def _floats(tree) -> list[float]:
    """Every float in lm-eval's nested per-sample responses (is_greedy flags are bools: left out)."""
    if isinstance(tree, (list, tuple)):
        return [f for item in tree for f in _floats(item)]
    return [tree] if isinstance(tree, float) else []


def _metrics(results: dict, label: str) -> dict:
    return results["models"][label]["results"]


def test_backend_scores_match_a_direct_forward(checkpoints):
    """loglikelihood = the sum of log-softmax at the continuation's positions; long contexts are cut on
    the left to seq_len; is_greedy is the argmax check; results come back in request order."""
    from lm_eval.api.instance import Instance

    model = load_model(checkpoints[0])
    lm = SpectraLDSLM(model=model, batch_size=3)
    pairs = [("Question: what is this", " a test"), ("x" * 150, " yz"), ("ab", "c"), ("", "hello")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        ctx = list(context.encode()) or [lm.eot_token_id]
        full = (ctx + list(continuation.encode()))[-(SEQ + 1) :]
        n = len(continuation.encode())
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0, -n:]
        target = torch.tensor(full[-n:])
        assert logprob == pytest.approx(float(lp.gather(1, target[:, None]).sum()), rel=1e-5)
        assert greedy == bool((lp.argmax(-1) == target).all())
    # the token the model predicts is greedy, any other is not
    with torch.no_grad():
        nxt = int(model(torch.tensor([list(b"abc")]))[0, -1].argmax())
    scored = lm._loglikelihood_tokens([(None, list(b"abc"), [nxt]), (None, list(b"abc"), [(nxt + 1) % 256])])
    assert [greedy for _, greedy in scored] == [True, False]


def test_rolling_loglikelihood_covers_every_token_once(checkpoints):
    """A text longer than seq_len, in lm-eval's disjoint windows (its LM.loglikelihood_rolling docs): every
    token scored once, from the context that starts where its window starts."""
    from lm_eval.api.instance import Instance

    model = load_model(checkpoints[0])
    lm = SpectraLDSLM(model=model, batch_size=2)
    text = "The river bends twice before the mill. " * 4  # 156 bytes: three windows of 64
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    t = list(text.encode())
    # window 1: prefix + t[:63] predicts t[0:64]; window 2: t[63:127] predicts t[64:128]; window 3 (the
    # last, still a full 64-token input): t[91:155] predicts t[128:156]
    contexts = [[lm.eot_token_id] + t[:j] for j in range(64)]
    contexts += [t[63:j] for j in range(64, 128)] + [t[91:j] for j in range(128, 156)]
    expected = 0.0
    with torch.no_grad():
        for j, ctx in enumerate(contexts):
            expected += float(torch.log_softmax(model(torch.tensor([ctx]))[0, -1].float(), -1)[t[j]])
    assert math.isfinite(total) and total == pytest.approx(expected, rel=1e-5)


def test_stu_and_lds_agree_on_all_three_tasks(checkpoints, capsys):
    stu, lds = checkpoints
    results = evaluate_models({"STU": stu, "LDS": lds}, TASKS.split(","), include_path=TASKS_DIR,
                              num_fewshot=0, batch_size=4, log_samples=True)
    a, b = _metrics(results, "STU"), _metrics(results, "LDS")
    assert set(a) == set(TASKS.split(","))
    assert a["spectralds_mc"]["acc"] == b["spectralds_mc"]["acc"]
    assert a["spectralds_mc"]["acc_norm"] == b["spectralds_mc"]["acc_norm"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert b["spectralds_ppl"][metric] == pytest.approx(a["spectralds_ppl"][metric], rel=1e-4)
    assert a["spectralds_ppl"]["bits_per_byte"] > 0
    samples = {label: results["models"][label]["samples"] for label in ("STU", "LDS")}
    for task in ("spectralds_mc", "spectralds_ppl"):  # every loglikelihood, not only the aggregates
        x, y = (_floats([s["resps"] for s in samples[label][task]]) for label in ("STU", "LDS"))
        assert len(x) == {"spectralds_mc": 64, "spectralds_ppl": 6}[task]
        assert y == pytest.approx(x, rel=1e-4)
    gen_stu = [s["resps"] for s in samples["STU"]["spectralds_gen"]]
    assert gen_stu == [s["resps"] for s in samples["LDS"]["spectralds_gen"]]
    assert len(gen_stu) == 8 and any(r[0][0] for r in gen_stu)  # something was generated
    header, table = rows(results)
    assert header[-1] == "avg" and len(table) == 3
    assert table[2][header.index("spectralds_mc/acc")] == 0.0
    assert "LDS - STU" in format_table(results)
    print(format_table(results))


@pytest.mark.slow  # lm-eval's CLI indexes its ~15,000 built-in task YAMLs (13 s here)
def test_both_entry_points_give_the_same_table(checkpoints, cli_env, tmp_path, capsys, monkeypatch):
    """`spectralds eval` (table, JSON, .md report, TensorBoard) and lm-eval's own CLI through our wrapper."""
    from spectralds.evaluation.lm_eval_cli import main as lm_eval_main

    stu, lds = checkpoints
    out = tmp_path / "results.json"
    args = ["eval", "--ckpt", str(stu), "--ckpt", str(lds), "--tasks", TASKS,
            "--include-path", str(TASKS_DIR), "--num-fewshot", "0", "--batch-size", "8", "--offline",
            "--output", str(out), "--log-dir", str(tmp_path / "tb")]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "lds.ckpt - stu.ckpt" in printed and "spectralds_mc/acc" in printed
    ours = json.loads(out.read_text())
    assert list(ours["models"]) == ["stu.ckpt", "lds.ckpt"]
    assert "| lds.ckpt - stu.ckpt |" in (tmp_path / "results.md").read_text()
    assert any((tmp_path / "tb" / "lds.ckpt").iterdir())

    theirs = tmp_path / "lm_eval_out"
    monkeypatch.setattr(sys, "argv", ["lm-eval"])
    lm_eval_logger = logging.getLogger("lm_eval")  # lm-eval's CLI adds a stderr handler: undo it after
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(lm_eval_logger, attr, [] if attr == "handlers" else getattr(lm_eval_logger, attr))
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", False)
    lm_eval_main(["run", "--model", "spectralds", "--model_args", f"ckpt={lds},decode=naive",
                  "--tasks", TASKS, "--include_path", str(TASKS_DIR), "--num_fewshot", "0",
                  "--batch_size", "8", "--output_path", str(theirs)])
    [written] = list(theirs.rglob("results*.json"))
    results = json.loads(written.read_text())["results"]
    mine = ours["models"]["lds.ckpt"]["results"]
    assert results["spectralds_mc"]["acc,none"] == mine["spectralds_mc"]["acc"]
    assert results["spectralds_ppl"]["bits_per_byte,none"] == pytest.approx(
        mine["spectralds_ppl"]["bits_per_byte"], rel=1e-6)
    assert results["spectralds_gen"]["exact_match,none"] == mine["spectralds_gen"]["exact_match"]
    capsys.readouterr()
    # our one-line errors through lm-eval's CLI too (indexing only the local tasks this time: 13 s less)
    local_only = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: local_only(**kw, include_defaults=False))
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main(["run", "--model", "spectralds", "--model_args", f"ckpt={tmp_path / 'none.ckpt'}",
                      "--tasks", "spectralds_mc", "--include_path", str(TASKS_DIR)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith("lm-eval: error: checkpoint") and "exist" in err


@pytest.mark.parametrize(
    "case, expected",
    [
        # these two index lm-eval's built-in tasks (13 s, once per process)
        pytest.param("unknown_task", "unknown task(s) no_such_task", marks=pytest.mark.slow),
        pytest.param("hub_task", "could not be loaded", marks=pytest.mark.slow),
        ("not_ours", "is not a Lightning checkpoint"),
        ("not_an_lm", "not a language model"),
        ("missing", "does not exist"),
        ("bad_output_dir", "is not a directory"),
    ],
)
def test_bad_input_is_one_line(case, expected, checkpoints, cli_env, tmp_path, capsys):
    stu = str(checkpoints[0])
    tasks, ckpt, extra = "spectralds_mc", stu, []
    if case == "unknown_task":
        tasks = "spectralds_mc,no_such_task"
    elif case == "hub_task":
        tasks = "arc_easy"  # lm-eval knows it, but its data is on the hub and we are offline
    elif case == "not_ours":
        ckpt = str(tmp_path / "other.ckpt")
        torch.save({"model": {"w": torch.zeros(2)}}, ckpt)
    elif case == "not_an_lm":
        ckpt = str(tmp_path / "regression.ckpt")
        torch.save({"state_dict": {}, "spectralds_model": "SequenceRegression"}, ckpt)
    elif case == "missing":
        ckpt = str(tmp_path / "nowhere.ckpt")
    elif case == "bad_output_dir":
        (tmp_path / "a_file").write_text("")
        extra = ["--output", str(tmp_path / "a_file" / "dir" / "r.json")]
    err = one_line_error(capsys, ["eval", "--ckpt", ckpt, "--tasks", tasks, "--include-path", str(TASKS_DIR),
                                  "--offline", *extra])
    assert expected in err


def _write_tiktoken(path: Path, merges: list[bytes]) -> None:
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


@pytest.mark.parametrize("kind", ["bpe", "tiktoken"])
def test_tokenizer_files_from_the_checkpoint(kind, tmp_path, monkeypatch):
    """A BPE tokenizer.json or a .tiktoken file named in the checkpoint: contexts and continuations are
    split by tokens of that tokenizer, and generation decodes with it."""
    from lm_eval.api.instance import Instance

    from spectralds.data.tokenizers import BPETokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    if kind == "bpe":
        path = tmp_path / "tokenizer.json"
        BPETokenizer.train(["the river and the other river; " * 20], 270).save(path)
    else:
        path = tmp_path / "tiny.tiktoken"
        _write_tiktoken(path, [b"th", b"the", b" the", b"er", b" r", b"iv"])
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=320, dim=16, num_layers=1, layer_pattern=["stu"], seq_len=32,
                          num_filters=4, mlp_ratio=2.0)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"tokenizer": str(path)}}, ckpt)
    lm = SpectraLDSLM(ckpt=str(ckpt), batch_size=2)
    assert lm.tok.name.startswith("bpe:" if kind == "bpe" else "tiktoken:")
    context, continuation = "the river", " the other"
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)],
                                      disable_tqdm=True)
    whole, ctx = lm.tok.encode(context + continuation), lm.tok.encode(context)
    assert len(whole) < len(context + continuation)  # merges were used
    with torch.no_grad():
        lp = torch.log_softmax(model.eval()(torch.tensor([whole[:-1]])).float(), -1)[0, len(ctx) - 1 :]
    target = torch.tensor(whole[len(ctx) :])
    assert logprob == pytest.approx(float(lp.gather(1, target[:, None]).sum()), rel=1e-5)
    [text] = lm.generate_until([Instance("generate_until", {}, ("the river", {"until": ["zzz"],
                                                                            "max_gen_toks": 5}), 0)])
    # the model's 320 ids include 58 the tokenizer lacks: never generated (decoding them would fail)
    assert isinstance(text, str) and text


def test_generation_greedy_sampled_stopped_and_truncated(checkpoints):
    """Greedy = generate() directly; sampling is reproducible from the seed; `until` cuts the text;
    a context longer than the model's leaves room for max_gen_toks by dropping its start."""
    from lm_eval.api.instance import Instance

    from spectralds.generate import generate

    model = load_model(checkpoints[1])  # the LDS: decodes by stepping its state
    lm = SpectraLDSLM(model=model, batch_size=4)
    prompts = ["one, two,", "abc", "x" * 200, "def f(x):"]

    def run(kwargs, seed=1234):
        lm.seed = seed
        return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i)
                                  for i, p in enumerate(prompts)], disable_tqdm=True)

    greedy = run({"until": [], "max_gen_toks": 40})
    for prompt, text in zip(prompts, greedy, strict=True):
        ids = list(prompt.encode())[-(SEQ - 40) :]
        out = generate(model, torch.tensor([ids]), 40)[0, len(ids) :].tolist()
        assert text == bytes(out).decode("utf-8", errors="replace")
    stop = greedy[0][3:5]
    assert run({"until": [stop], "max_gen_toks": 40})[0] == greedy[0].split(stop)[0]
    sampled = run({"do_sample": True, "temperature": 1.0, "max_gen_toks": 20, "until": []})
    assert sampled == run({"do_sample": True, "temperature": 1.0, "max_gen_toks": 20, "until": []})
    assert sampled != run({"do_sample": True, "temperature": 1.0, "max_gen_toks": 20, "until": []}, seed=7)
    assert sampled != greedy


def test_backend_rejects_bad_arguments():
    model = LanguageModel(vocab_size=16, dim=8, num_layers=1, seq_len=16, num_filters=2)
    with pytest.raises(UserError, match="256 tokens but the model only 16"):
        SpectraLDSLM(model=model)
    with pytest.raises(UserError, match="unknown spectralds model argument.*ckpts"):
        SpectraLDSLM(model=model, tokenizer="byte", ckpts="a.ckpt")
    with pytest.raises(UserError, match="exactly one of"):
        SpectraLDSLM()
    with pytest.raises(UserError, match="'auto' is not supported"):
        SpectraLDSLM.create_from_arg_string("ckpt=x.ckpt", {"batch_size": "auto"})


def test_fewshot_per_task_on_a_module_in_memory(checkpoints):
    """The paper's setting (one task 5-shot, the rest 0-shot) in one call; a module given in memory is
    left in the mode it came in."""
    from spectralds.cli_eval import _fewshot

    assert _fewshot("0,mmlu=5") == {"*": 0, "mmlu": 5} and _fewshot("3") == 3
    model = load_model(checkpoints[0]).train()
    results = evaluate_models({"stu": model}, ["spectralds_mc", "spectralds_gen"], include_path=TASKS_DIR,
                              num_fewshot={"spectralds_mc": 2, "*": 0}, limit=3, log_samples=True)
    assert model.training
    entry = results["models"]["stu"]
    assert entry["n-shot"] == {"spectralds_mc": 2, "spectralds_gen": 0}
    assert set(entry["results"]) == {"spectralds_mc", "spectralds_gen"}
    [first, *_] = entry["samples"]["spectralds_mc"]
    assert str(first["arguments"]).count("Question:") == 4 * 3  # 4 choices, each with 2 shots + itself
    with pytest.raises(UserError, match="not evaluated: mmlu"):
        evaluate_models({"stu": model}, ["spectralds_mc"], include_path=TASKS_DIR, num_fewshot={"mmlu": 5})


def test_table_with_one_model_and_with_a_metric_one_model_lacks():
    """The average covers higher-is-better metrics only; a metric one model lacks is "-"; no
    difference row for a single model."""
    hib = {"t1": {"acc": True}, "t2": {"bits_per_byte": False}}
    one = {"tasks": ["t1", "t2"], "num_fewshot": {"t1": 0, "t2": 0},
           "models": {"A": {"results": {"t1": {"acc": 0.5}, "t2": {"bits_per_byte": 2.0}},
                            "higher_is_better": hib}}}
    header, table = rows(one)
    assert header == ["t1/acc", "t2/bits_per_byte", "avg"] and table == [[0.5, 2.0, 0.5]]
    assert len(format_table(one).splitlines()) == 2
    b = {"results": {"t1": {"acc": 0.75}}, "higher_is_better": hib}
    two = dict(one, models={**one["models"], "B": b})
    header, table = rows(two)
    assert table[1][:1] == [0.75] and math.isnan(table[1][1]) and table[2][0] == 0.25
    assert format_table(two).splitlines()[2].split()[2] == "-"
