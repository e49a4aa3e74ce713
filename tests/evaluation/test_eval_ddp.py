"""Data-parallel evaluation: lm-eval's rank/world_size/gather hooks over torch.distributed (gloo, 2 CPU
processes); `spectralds eval` under torchrun and StageReport's evaluation under DDP: one process's table."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("lm_eval")
from cli_helpers import run_cli  # noqa: E402
from collectives_worker import collectives  # noqa: E402
from test_readme import readme_block  # noqa: E402

from spectralds.errors import UserError  # noqa: E402
from spectralds.evaluation import data_parallel  # noqa: E402
from spectralds.evaluation.lm_eval_backend import SpectraLDSLM  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("ddp_eval_worker.py")
TASKS = ["spectralds_mc", "spectralds_ppl", "spectralds_gen"]


# ---- the hooks, one process and two ---------------------------------------------------------------------
def test_one_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    lm = SpectraLDSLM(model=LanguageModel(dim=16, num_layers=1, seq_len=32, num_filters=4), batch_size=2)
    assert (lm.rank, lm.world_size) == (0, 1)
    x = torch.arange(3)
    assert lm.all_gather(x) is x and lm.gather_object({"a": 1}) == [{"a": 1}]
    lm.barrier()


def test_devices_and_world_size_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert data_parallel.local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert data_parallel.local_device(torch.device("cuda:0")) == torch.device("cuda", 3)  # one GPU each
    assert data_parallel.local_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert data_parallel.local_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        data_parallel.launched_world_size()


def test_collectives_over_two_gloo_processes(tmp_path):
    mp.spawn(collectives, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["ranks"] for g in got] == [[0, 2], [1, 2]]
    assert got[0]["count"] == got[1]["count"] == [10, 11]
    assert got[0]["rows"] == [[0, 0, 0]] * 2 + [[1, 1, 1]] * 2
    assert got[0]["objects"] == [{"rank": 0}, {"rank": 1}] and got[1]["objects"] is None
    assert got[0]["broadcast"] == got[1]["broadcast"] == "from 0"


# ---- end to end ----------------------------------------------------------------------------------------
def _checkpoint(path: Path, layer_pattern: list[str]) -> None:
    """An untrained byte LM saved as `spectralds fit` saves one (the parts eval reads)."""
    hparams = dict(vocab_size=256, dim=16, num_layers=2, layer_pattern=layer_pattern, seq_len=64,
                   num_filters=4, mlp_ratio=2.0)
    torch.manual_seed(len(layer_pattern[0]))
    model = LanguageModel(**hparams)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"_class_path": "spectralds.models.LanguageModel", **hparams}}, path)


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1",
                HF_HUB_OFFLINE="1", SPECTRALDS_CACHE_DIR=str(tmp_path / "cache"))


def _metrics(results: dict) -> dict:
    return {label: model["results"] for label, model in results["models"].items()}


def _assert_same_numbers(two: dict, one: dict) -> None:
    """Accuracies exactly; perplexities to float32 rounding (the ranks batch other requests together, and
    a padded batch's width changes the last bits, as a different batch size does in one process)."""
    assert two.keys() == one.keys()
    for label in one:
        assert two[label].keys() == one[label].keys()
        for task, metrics in one[label].items():
            for name, value in metrics.items():
                if name in ("acc", "acc_norm", "exact_match"):
                    assert two[label][task][name] == value, (task, name)
                else:
                    assert two[label][task][name] == pytest.approx(value, rel=1e-6), (task, name)


@pytest.mark.slow  # two processes, each importing lm-eval and building the tasks: about 40 s on 2 cores
def test_readme_cpu_command_under_torchrun_equals_one_process(cli_env, tmp_path):
    [line] = [c for c in readme_block("Data-parallel on the CPU") if c.startswith("torchrun ")]
    args = shlex.split(line)
    ckpts = [Path(args[i + 1]) for i, a in enumerate(args) if a == "--ckpt"]
    assert [c.name for c in ckpts] == ["last.ckpt", "lds.ckpt"] and "--output" in args
    _checkpoint(tmp_path / ckpts[0], ["stu_t", "attn"])  # a hybrid and an LDS model
    _checkpoint(tmp_path / ckpts[1], ["lds"])
    os.symlink(ROOT / "spectralds", tmp_path / "spectralds")  # --include-path names the repository's folder
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run(launcher + args[1:], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("LDS - STU") == 1  # rank 0 alone prints the table
    output = Path(args[args.index("--output") + 1])
    two = json.loads((tmp_path / output).read_text())
    two_report = (tmp_path / output.with_name("results.md")).read_text()

    single = args[args.index("-m") + 2 :]  # the same command in one process: spectralds eval ...
    single[single.index("--output") + 1] = "one/results.json"
    assert run_cli(single) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (tmp_path / "one" / "results.md").read_text() == two_report  # the table, as printed
    _assert_same_numbers(_metrics(two), _metrics(one))


@pytest.mark.slow  # a 2-process Lightning DDP run with lm-eval in each: about 60 s on 2 cores
def test_stage_report_under_ddp_gives_the_single_process_table(cli_env, tmp_path):
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "final.ckpt"
    tasks_dir = ROOT / "spectralds" / "evaluation" / "tasks"
    assert run_cli(["eval", "--ckpt", str(ckpt), "--label", "hybrid", "--tasks", ",".join(TASKS), "--offline",
                    "--include-path", str(tasks_dir), "--num-fewshot", "0", "--batch-size", "3",
                    "--output", str(tmp_path / "one" / "results.json")]) == 0
    assert (tmp_path / "eval.md").read_text() == (tmp_path / "one" / "results.md").read_text()
    in_run = json.loads((tmp_path / "eval.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    _assert_same_numbers(_metrics(in_run), _metrics(one))

    # Per document: every rank returned rank 0's gathered records, in document order, equal to one process's.
    ranks = [json.loads((tmp_path / f"samples-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    from spectralds.evaluation import evaluate_models

    alone = evaluate_models({"hybrid": ckpt}, TASKS, include_path=tasks_dir, num_fewshot=0, batch_size=3,
                            log_samples=True)
    for task in TASKS:
        two_docs = ranks[0]["models"]["hybrid"]["samples"][task]
        one_docs = alone["models"]["hybrid"]["samples"][task]
        doc_ids = [d["doc_id"] for d in one_docs]
        assert [d["doc_id"] for d in two_docs] == doc_ids == list(range(len(one_docs)))
        for a, b in zip(two_docs, one_docs, strict=True):
            assert a["arguments"] == json.loads(json.dumps(b["arguments"]))
            got, expected = _leaves(a["resps"]), _leaves(b["resps"])
            assert [type(x) for x in got] == [type(x) for x in expected]
            flags_and_texts = [x for x in expected if not isinstance(x, float)]
            assert [x for x in got if not isinstance(x, float)] == flags_and_texts
            floats = [x for x in expected if isinstance(x, float)]
            assert [x for x in got if isinstance(x, float)] == pytest.approx(floats, rel=1e-6)


def _leaves(tree) -> list:
    """Every value in lm-eval's nested per-request responses: loglikelihoods, is_greedy flags, texts."""
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]
