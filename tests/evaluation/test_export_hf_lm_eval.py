"""lm-eval's own `hf` backend on an exported directory scores like `spectralds eval` on the model: the
same metrics and, request by request, the same loglikelihoods (1e-5) and generations, on the three
local tasks of tests/assets/lm_eval (multiple choice, rolling perplexity, generate-until with lm-eval's
left-padded batches)."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
from test_evaluation import TASKS, TASKS_DIR, _floats, _isolated  # noqa: E402, F401

from spectralds.data.tokenizers import ByteTokenizer  # noqa: E402
from spectralds.evaluation import evaluate_models  # noqa: E402
from spectralds.evaluation.run import task_manager  # noqa: E402
from spectralds.interop.hf_export import export_hf  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

SEQ = 64


def _by_doc(samples: list[dict]) -> dict:
    return {s["doc_id"]: s for s in samples}


@pytest.mark.slow
def test_lm_eval_hf_backend_equals_spectralds_eval(tmp_path: Path):
    from lm_eval import simple_evaluate

    torch.manual_seed(0)
    model = LanguageModel(vocab_size=256, dim=16, num_layers=2, layer_pattern=["stu", "attn"], seq_len=SEQ,
                          num_filters=4, mlp_ratio=2.0,
                          layer_kwargs={"attn": {"num_heads": 2, "window_size": 16}})
    model.eval()
    export_hf(model, tmp_path / "hf", ByteTokenizer())
    tasks = TASKS.split(",")
    ours = evaluate_models({"ours": model}, tasks, include_path=TASKS_DIR, num_fewshot=0, batch_size=4,
                           tokenizer="byte", device="cpu", log_samples=True)["models"]["ours"]
    theirs = simple_evaluate(
        model="hf", model_args={"pretrained": str(tmp_path / "hf"), "trust_remote_code": True,
                                "dtype": "float32", "device": "cpu"},
        tasks=tasks, num_fewshot=0, batch_size=4, task_manager=task_manager(tasks, TASKS_DIR),
        bootstrap_iters=0, log_samples=True, verbosity="ERROR",
    )
    for task in tasks:
        mine, hf = ours["samples"][task], _by_doc(theirs["samples"][task])
        assert len(mine) == len(hf) > 0
        for sample in mine:
            other = hf[sample["doc_id"]]
            assert _floats(other["resps"]) == pytest.approx(_floats(sample["resps"]), rel=1e-5, abs=1e-5)
            if task.endswith("gen"):  # generate_until: the texts themselves
                assert other["filtered_resps"] == sample["filtered_resps"]
        if task.endswith("gen"):  # the prompts differ in length, so lm-eval's batches of 4 were left-padded
            assert any(s["filtered_resps"] != [""] for s in mine)
        for metric, value in ours["results"][task].items():
            got = theirs["results"][task][f"{metric},none"]
            assert got == pytest.approx(value, rel=1e-5), (task, metric)
