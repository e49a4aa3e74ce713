"""tools/bench_decode.py with several batch sizes and the distilled Flash STU (LDS + window attention)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def decode():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module("bench_decode")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_batches_and_the_hybrid_model(decode, tmp_path, capsys):
    methods = ["lds", "attn-full", "lds-attn"]
    args = ["--quick", "--threads", "1", "--model", "--lds-system", "random-stable", "--window", "16",
            "--attn-prefill-max", "40", "--batch", "1", "3",
            "--prefill-batch", "2", "--methods", *methods]
    records = decode.main([*args, "--plot", str(tmp_path / "d.png")])
    text = capsys.readouterr().out
    assert [(r["method"], r["batch"], r["prompt_len"]) for r in records] == [
        (m, b, p) for m in methods for b in (1, 3) for p in (32, 64)
    ]
    for r in records:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"])
        assert r["prefill"] == ("synthetic" if "attn" in r["method"] and r["prompt_len"] > 40 else "real")
    by_key = {(r["method"], r["batch"], r["prompt_len"]): r for r in records}
    # LDS state: 2 blocks of (batch, dim 16, 80 states) float32, whatever P; it grows with the batch only.
    lds_bytes = 2 * 3 * 16 * 80 * 4
    mb = {key: r["state_mb"] * 2**20 for key, r in by_key.items()}
    assert mb["lds", 3, 64] == lds_bytes == 3 * mb["lds", 1, 32]
    # The hybrid: one LDS block and one window-16 ring (a synthetic cache has the real cache's shape).
    assert mb["lds-attn", 1, 64] == 16 * 80 * 4 + 2 * 8 * 16 * 2 * 4
    assert "tokens/s of lds / attn-full" in text and "lds flatness, batch 3" in text
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG" and "series" not in records[0]


BAD = [(["--methods", "lds-attn"], "add --model"), (["--batch", "0"], "positive"),
       (["--model", "--methods", "lds-attn-graph"], "need --device cuda")]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_arguments(decode, extra, message, capsys):
    with pytest.raises(SystemExit):
        decode.parse_args(["--quick", *extra])
    assert message in capsys.readouterr().err
