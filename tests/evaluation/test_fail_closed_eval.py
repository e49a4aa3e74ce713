"""`spectralds eval` and lm-eval's CLI through our wrapper, fail closed (issue 26, sections 3 and 4):
nothing of the user's is overwritten, and every bad task file, document or argument is exit status 2,
one error line naming the problem, no traceback, every file that existed before unchanged by hash.

Tasks are copies of the shipped local tasks in tmp_path, edited per case; the model is a tiny untrained
byte-level STU LM (the checks run before any model would matter)."""

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402
import lm_eval.utils  # noqa: E402
from cli_helpers import fails, run_cli, sha256s  # noqa: E402

from spectralds.evaluation.outputs import REPORT_MARK, run_name  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

SHIPPED = Path(__file__).parents[2] / "spectralds" / "evaluation" / "tasks"
MC = '{"question": "Q%d?", "choices": ["yes", "no"], "answer": 0}\n'

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """`--offline` switches datasets/huggingface_hub in-process: undone after each test."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    for module, name in [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")]:
        monkeypatch.setattr(module, name, getattr(module, name))


def _checkpoint(path: Path, **extra) -> Path:
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=256, dim=16, num_layers=1, layer_pattern=["stu"], seq_len=64,
                          num_filters=4, mlp_ratio=2.0)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), **extra}, path)
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _checkpoint(tmp_path / "model.ckpt")


def _tasks(root: Path, which: str = "mc", jsonl: str | None = None, edit=None) -> Path:
    """A copy of the shipped tasks under root/tasks, its `which`.jsonl and spectralds_`which`.yaml changed."""
    folder = root / "tasks"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("__pycache__"))
    if jsonl is not None:
        (folder / f"{which}.jsonl").write_text(jsonl)
    if edit is not None:
        yaml = folder / f"spectralds_{which}.yaml"
        text = yaml.read_text()
        assert edit[0] in text
        yaml.write_text(text.replace(*edit))
    return folder


def evaluate(ckpt: Path, tasks: Path, *extra: str, task: str = "spectralds_mc") -> list[str]:
    return ["eval", "--ckpt", str(ckpt), "--tasks", task, "--include-path", str(tasks), "--offline", *extra]


# ---- section 3: nothing of the user's overwritten --------------------------------------------------


def test_output_naming_an_input_is_refused(ckpt, tmp_path, capsys):
    """The checkpoint itself, a symlink and a hard link to it, a task file, the --tokenizer file and the
    tokenizer file a checkpoint names: each refused before the evaluation, all unchanged."""
    tasks = _tasks(tmp_path)
    (tmp_path / "link.ckpt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.ckpt")
    tok = tmp_path / "tok.tiktoken"
    tok.write_text("not read: refused before\n")
    named = _checkpoint(tmp_path / "named.ckpt", datamodule_hyper_parameters={"tokenizer": str(tok)})
    odd = _checkpoint(tmp_path / "weights.md")
    for model, output, extra, what in [
        (ckpt, ckpt, [], "is the checkpoint"),
        (ckpt, tmp_path / "link.ckpt", [], "is the checkpoint"),
        (ckpt, tmp_path / "hard.ckpt", [], "is the checkpoint"),
        (ckpt, tasks / "mc.jsonl", [], "is the task file"),
        (ckpt, tasks / "spectralds_mc.yaml", [], "is the task file"),
        (ckpt, tasks / "local_json.py", [], "is the task file"),
        (ckpt, tok, ["--tokenizer", str(tok)], "is the tokenizer"),
        (named, tok, [], "is the tokenizer"),
        (odd, tmp_path / "weights.json", [], "the report of --output"),  # the report would be weights.md
    ]:
        fails(capsys, tmp_path, evaluate(model, tasks, "--output", str(output), *extra), what)


def test_report_beside_output(ckpt, tmp_path, capsys):
    """--output R.json: the report is R.md; a user's R.md is never replaced, --output R.md is refused;
    a report spectralds wrote is replaced by the next run."""
    tasks = _tasks(tmp_path)
    (tmp_path / "notes.md").write_text("my notes\n")
    fails(capsys, tmp_path, evaluate(ckpt, tasks, "--output", "notes.json"), "refusing to overwrite notes.md",
          "not written by spectralds eval")
    fails(capsys, tmp_path, evaluate(ckpt, tasks, "--output", "notes.md"), "ends in .md")
    assert not (tmp_path / "notes.json").exists()
    (tmp_path / "report.md").write_text("a user's report.md: not ours to touch\n")
    for _ in range(2):  # the second run replaces the report the first one wrote
        assert run_cli(evaluate(ckpt, tasks, "--limit", "2", "--output", "out/results.json")) == 0
    capsys.readouterr()
    # an earlier run's results in the task folder are not a task file: replaced as asked
    (tasks / "results.json").write_text("{}")
    assert run_cli(evaluate(ckpt, tasks, "--limit", "1", "--output", str(tasks / "results.json"))) == 0
    assert "spectralds_mc" in (tasks / "results.json").read_text()
    capsys.readouterr()
    assert (tmp_path / "out" / "results.md").read_text().startswith(REPORT_MARK)
    assert "spectralds_mc" in (tmp_path / "out" / "results.json").read_text()
    assert (tmp_path / "report.md").read_text().startswith("a user's")


def test_labels_stay_inside_log_dir(tmp_path, capsys):
    """--label .. or a/../.. logs under --log-dir; labels that would share a run folder are refused."""
    tasks = _tasks(tmp_path)
    one, two = _checkpoint(tmp_path / "a.ckpt"), _checkpoint(tmp_path / "b.ckpt")
    assert run_name("..") == "__" and run_name("") == "_" and run_name("a/../..") == "a_.._.."
    args = ["eval", "--ckpt", str(one), "--ckpt", str(two), "--label", "..", "--label", "a/../..",
            "--tasks", "spectralds_mc", "--include-path", str(tasks), "--offline", "--limit", "1",
            "--log-dir", str(tmp_path / "logs" / "tb")]
    outside = {p for p in tmp_path.rglob("*") if "events" in p.name}
    assert run_cli(args) == 0
    capsys.readouterr()
    events = {p for p in tmp_path.rglob("*") if "events" in p.name} - outside
    assert events and all((tmp_path / "logs" / "tb") in p.parents for p in events)
    assert {p.parent.name for p in events} == {"tb", "__", "a_.._.."}
    clash = [*args[:5], "--label", "x/y", "--label", "x_y", *args[9:]]
    fails(capsys, tmp_path, clash, "same TensorBoard run folder x_y")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--log-dir", "user.txt"], "--log-dir user.txt exists and is not a directory"),
        (["--log-dir", "user.txt/tb"], "is not a writable directory"),
        (["--log-dir", "r.json", "--output", "r.json"], "name the same place"),
        (["--log-dir", "tb", "--label", "model.ckpt"], "not a directory"),  # tb/model.ckpt is a file
    ],
)
def test_bad_log_dir_is_refused_before_the_evaluation(extra, expected, ckpt, tmp_path, capsys):
    tasks = _tasks(tmp_path)
    (tmp_path / "user.txt").write_text("mine\n")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "model.ckpt").write_text("a file where the run folder would go\n")
    fails(capsys, tmp_path, evaluate(ckpt, tasks, *extra), expected)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("where", ["tensorboard", "report"])
def test_a_failure_at_the_end_leaves_no_results_json(where, ckpt, tmp_path, capsys, monkeypatch):
    """The JSON is written last: a run that fails writing TensorBoard or the report leaves the previous
    results.json as it was, and none where there was none."""
    import spectralds.evaluation
    import spectralds.evaluation.table as table
    from spectralds.errors import FileWriteError

    def broken(*args, **kwargs):
        raise FileWriteError("could not write it: No space left on device")

    if where == "tensorboard":
        monkeypatch.setattr(spectralds.evaluation, "log_tensorboard", broken)
    else:
        real = table.atomic_write
        monkeypatch.setattr(table, "atomic_write",
                            lambda path, data: broken() if str(path).endswith(".md") else real(path, data))
    tasks = _tasks(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text('{"from": "an earlier run"}')
    before = sha256s(tmp_path)
    for output in ("old/results.json", "new/results.json"):
        assert run_cli(evaluate(ckpt, tasks, "--limit", "1", "--output", output, "--log-dir", "tb")) == 2
        err = capsys.readouterr().err  # lm-eval ran: its git lookup may have printed "fatal: ..." before
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("spectralds: error:")
        assert "No space left on device" in err
    assert {k: sha256s(tmp_path).get(k) for k in before} == before
    assert not (tmp_path / "new" / "results.json").exists()


# ---- section 4: bad task files, documents and arguments ---------------------------------------------


@pytest.mark.parametrize(
    "limit, expected",
    [("inf", "limit must be a finite number, got inf"), ("nan", "finite number, got nan"),
     ("-1", "limit must be > 0"), ("0", "limit must be > 0"), ("2.5", "whole number of documents")],
)
def test_bad_limit(limit, expected, ckpt, tmp_path, capsys):
    fails(capsys, tmp_path, evaluate(ckpt, _tasks(tmp_path), "--limit", limit), expected)


BAD_TASKS = [
    ("malformed JSONL", "mc", MC % 1 + '{"question": \n', None,
     ["could not be read", "JSON parse error"]),
    ("empty JSONL", "mc", "", None, ["spectralds_mc.yaml", "no documents"]),
    ("empty choice", "mc", MC % 1 + '{"question": "Q", "choices": ["yes", ""], "answer": 0}\n', None,
     ["document 2: answer choice 1 is empty"]),
    ("index out of range", "mc", MC % 1 + MC.replace('"answer": 0', '"answer": 5') % 2, None,
     ["document 2: answer index 5 is out of range for 2 choices"]),
    ("negative index", "mc", MC % 1 + MC.replace('"answer": 0', '"answer": -1') % 2, None,
     ["document 2: answer", "-1"]),
    ("first document bad", "mc", MC.replace('"answer": 0', '"answer": 7') % 1, None,
     ["task spectralds_mc could not be built", "first document"]),
    ("missing !function module", "mc", None, ("local_json.load", "no_such_module.load"),
     ["Cannot import module 'no_such_module'"]),
    ("missing !function", "mc", None, ("local_json.load", "local_json.nothing"),
     ["no function 'nothing'"]),
    ("YAML syntax error", "mc", None, ("output_type: multiple_choice", "output_type: [multiple_choice"),
     ["spectralds_mc.yaml line 9"]),
    ("unknown metric", "mc", None, ("metric: acc_norm", "metric: acc_nrom"),
     ["unknown metric(s) acc_nrom"]),
    ("unknown aggregation", "mc", None, ("aggregation: mean", "aggregation: meen"),
     ["unknown aggregation"]),
    ("unknown output type", "mc", None, ("multiple_choice", "multiple_choise"), ["invalid output_type"]),
    ("missing split", "mc", None, ("test_split: test", "test_split: validation"),
     ["'validation' is not in"]),
    ("missing field", "mc", '{"q": "Q?", "choices": ["a"], "answer": 0}\n', None,
     ["'question' is undefined"]),
    ("empty text to score", "ppl", '{"text": "a b"}\n{"text": " "}\n', None,
     ["document 2: it has no text"]),
    ("temperature nan", "gen", None, ("do_sample: false", "do_sample: true\n  temperature: .nan"),
     ["generation_kwargs: temperature must be a finite number"]),
    ("top_k negative", "gen", None, ("do_sample: false", "do_sample: true\n  top_k: -1"),
     ["top_k must be >= 0, got -1"]),
    ("top_p unsupported", "gen", None, ("do_sample: false", "do_sample: true\n  top_p: 0.9"),
     ["top_p=0.9 is not supported"]),
    ("unknown generation key", "gen", None, ("do_sample: false", "do_sample: false\n  beams: 4"),
     ["beams not supported"]),
    ("empty stop string", "gen", None, ('until: ["\\n"]', 'until: ["\\n", ""]'),
     ["until must be a non-empty string"]),
    ("negative num_fewshot in the YAML", "mc", None,
     ("fewshot_split: test", "fewshot_split: test\nnum_fewshot: -1"),
     ["num_fewshot must be >= 0, got -1"]),
    ("choices not a list", "mc", MC % 1 + '{"question": "Q", "choices": "yes", "answer": 0}\n',
     ("doc_to_choice: \"{{choices}}\"", "doc_to_choice: choices"), ["document 2: its choices are 'yes'"]),
    ("!function module that fails", "mc", None, ("local_json.load", "broken.load"), ["SyntaxError"]),
    ("max_gen_toks 0", "gen", None, ("max_gen_toks: 12", "max_gen_toks: 0"),
     ["max_gen_toks must be >= 1"]),
]


@pytest.mark.parametrize("case, which, jsonl, edit, expected", BAD_TASKS, ids=[c[0] for c in BAD_TASKS])
def test_bad_task_file_or_document(case, which, jsonl, edit, expected, ckpt, tmp_path, capsys):
    tasks = _tasks(tmp_path, which, jsonl, edit)
    (tasks / "broken.py").write_text("def load(:\n")
    fails(capsys, tmp_path, evaluate(ckpt, tasks, task=f"spectralds_{which}"), *expected)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num-fewshot", "16"], "16-shot needs 16 few-shot documents, its few-shot split has 15"),
        (["--num-fewshot", "spectralds_mc=100000000000"], "100000000000-shot needs"),
        (["--num-fewshot", "-1"], "expected N or TASK=N"),
        (["--device", "no_such_device"], "unknown device 'no_such_device'"),
        (["--device", "cuda:99"], "CUDA device(s); use --device cpu"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
    ],
)
def test_bad_argument(extra, expected, ckpt, tmp_path, capsys):
    fails(capsys, tmp_path, evaluate(ckpt, _tasks(tmp_path), "--limit", "1", *extra), expected)


@pytest.mark.slow  # an unknown task makes lm-eval index its ~15,000 built-in YAMLs (13 s)
def test_empty_task_folder(ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, tmp_path, evaluate(ckpt, tmp_path / "empty"), "unknown task(s) spectralds_mc")


# ---- lm-eval's own CLI through spectralds.evaluation.lm_eval_cli ---------------------------------------


@pytest.fixture
def lm_eval_cli(monkeypatch):
    """lm-eval's CLI in-process: its logging set-up undone after, and only the local tasks indexed."""
    from spectralds.evaluation.lm_eval_cli import main

    logger = logging.getLogger("lm_eval")
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, [] if attr == "handlers" else getattr(logger, attr))
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", False)
    local_only = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: local_only(**kw, include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["lm-eval"])
    return main


def _lm_eval(main, capsys, args: list[str]) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "model_args, extra, expected",
    [
        (",batch_size=4", [], "batch_size given inside --model_args; lm-eval passes its own --batch_size"),
        (",device=cpu", [], "device given inside --model_args"),
        ("", ["--gen_kwargs", "top_k=-1"], "top_k must be >= 0, got -1"),
        ("", ["--gen_kwargs", "temperature=nan", "do_sample=True"], "temperature must be a finite number"),
        ("", ["--device", "cuda:99"], "CUDA device(s)"),
        ("", ["--limit", "inf"], "limit must be a finite number"),
        ("", ["--limit", "2.5"], "whole number of documents"),
        ("", ["-L", "-1"], "limit must be > 0"),
        ("", ["--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
        ("", ["--batch_size", "0"], "batch_size must be >= 1"),
        ("", ["--gen_kwargs", "max_gen_toks=-5"], "max_gen_toks must be >= 1"),
        ("", ["--gen_kwargs", "num_beams=4"], "num_beams=4 is not supported"),
    ],
)
def test_lm_eval_cli_bad_arguments(model_args, extra, expected, lm_eval_cli, ckpt, tmp_path, capsys):
    tasks = _tasks(tmp_path)
    before = sha256s(tmp_path)
    code, err = _lm_eval(lm_eval_cli, capsys, [
        "run", "--model", "spectralds", "--model_args", f"ckpt={ckpt}{model_args}",
        "--tasks", "spectralds_gen", "--include_path", str(tasks), "--limit", "1", *extra])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("lm-eval: error:"), err
    assert expected in last, err
    assert {k: sha256s(tmp_path).get(k) for k in before} == before


def test_lm_eval_cli_default_device_says_nothing_of_cuda(lm_eval_cli, ckpt, tmp_path, capsys):
    """Without --device: ours (cuda when available, else cpu), not lm-eval's cuda:0 and a warning."""
    from spectralds.evaluation.lm_eval_cli import _default_device

    tasks = _tasks(tmp_path)
    code, err = _lm_eval(lm_eval_cli, capsys, [
        "run", "--model", "spectralds", "--model_args", f"ckpt={ckpt}", "--tasks", "spectralds_mc",
        "--include_path", str(tasks), "--limit", "1"])
    assert code == 0 and "cuda" not in err.lower(), err
    expected = ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    assert _default_device(["run", "--model", "spectralds"]) == expected
    assert _default_device(["--model", "spectralds"]) == expected  # lm-eval inserts "run"
    assert _default_device(["run", "--device", "cpu"]) == [] == _default_device(["ls", "tasks"])


def test_generation_settings_keep_lm_eval_meanings():
    """do_sample decides (unset: temperature > 0 samples; set with temperature 0: temperature 1), top_k 0
    is no cut, and settings the backend lacks pass only at the value that changes nothing."""
    from spectralds.errors import UserError
    from spectralds.evaluation.backend_args import generation_settings

    def settings(**kwargs):
        s = generation_settings(kwargs)
        return s.temperature, s.top_k, s.until, s.max_gen_toks

    assert settings() == (0.0, None, [], 256)
    assert settings(temperature=0.7) == (0.7, None, [], 256)
    assert settings(temperature=0.7, do_sample=False) == (0.0, None, [], 256)
    assert settings(do_sample=True, top_k=0, until="\n", max_gen_toks="8") == (1.0, None, ["\n"], 8)
    assert settings(do_sample=None, top_p=0.5, num_beams=1, repetition_penalty=1.0, top_k=5.0)[:2] == (0.0, 5)
    for bad, message in [({"do_sample": "yes"}, "do_sample must be true or false"),
                         ({"temperature": "hot"}, "temperature must be a number"),
                         ({"temperature": -1}, "temperature must be >= 0"),
                         ({"top_k": 2.5}, "top_k must be an integer"),
                         ({"repetition_penalty": 1.3}, "repetition_penalty=1.3 is not supported"),
                         ({"until": [1]}, "until must be")]:
        with pytest.raises(UserError, match=message):
            generation_settings(bad)
