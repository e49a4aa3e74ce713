"""`spectralds generate` on inputs that crashed it (issue 26 section 4): a vocabulary padded past the
tokenizer's (ids it cannot decode are never sampled), a tokenizer larger than the model, a prompt byte
that is not UTF-8, tiktoken files with duplicate ranks, and prompts files with unicode line separators
or a byte order mark."""

import base64

import pytest
import torch
from cli_helpers import run_cli
from test_adversarial_cli import HPARAMS, fails

from spectralds.cli_generate import _read_prompts
from spectralds.generate import generate
from spectralds.models import LanguageModel

pytestmark = pytest.mark.usefixtures("cli_env")
PADDED = {**HPARAMS, "vocab_size": 1024}


def padded_model() -> LanguageModel:
    """vocab_size 1024 with the byte tokenizer, its logits beyond 255 made to dominate."""
    torch.manual_seed(0)
    model = LanguageModel(**PADDED)
    with torch.no_grad():
        model.head.weight[256:] *= 100
    return model.eval()


def checkpoint(path, model: LanguageModel, hparams: dict) -> str:
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"_class_path": "spectralds.models.LanguageModel", **hparams}}, path)
    return str(path)


def test_padded_vocabulary_never_samples_undecodable_ids():
    model, prompt = padded_model(), torch.tensor([list(b"def f(")])
    unmasked = generate(model, prompt, 8)
    assert (unmasked[0, 6:] >= 256).all()  # the padding wins without the mask: the test can fail
    greedy = generate(model, prompt, 8, vocab_size=256)
    assert (greedy[0, 6:] < 256).all()
    for seed in range(5):
        for top_k in (None, 3):
            sampled = generate(model, prompt, 8, temperature=1.5, top_k=top_k,
                               generator=torch.Generator().manual_seed(seed), vocab_size=256)
            assert (sampled[0, 6:] < 256).all()
    # the mask only removes ids: the greedy choice among the decodable ones is the model's own
    logits, _ = model.prefill(prompt)
    assert int(greedy[0, 6]) == int(logits[0, :256].argmax())


@pytest.mark.parametrize("extra", [[], ["--temperature", "1.0"], ["--temperature", "2", "--top-k", "5"]])
def test_padded_vocabulary_through_the_command(extra, capsys, tmp_path):
    ckpt = checkpoint(tmp_path / "padded.ckpt", padded_model(), PADDED)
    args = ["generate", "--ckpt", ckpt, "--prompt", "def f(", "--max-new-tokens", "6", *extra]
    assert run_cli(args) == 0
    assert capsys.readouterr().out.startswith("def f(")


def rank_file(path, merges: int) -> str:
    tokens = [bytes([b]) for b in range(256)] + [bytes([97 + i // 26, 97 + i % 26]) for i in range(merges)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return str(path)


def test_tokenizer_larger_than_the_model(capsys, tmp_path):
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    tok = rank_file(tmp_path / "big.tiktoken", 44)
    args = ["generate", "--ckpt", ckpt, "--prompt", "abc", "--tokenizer", tok]
    fails(capsys, tmp_path, args, "the tokenizer tiktoken:big.tiktoken has 300 tokens", "vocab_size is 256")


def test_duplicate_ranks_in_a_tiktoken_file(capsys, tmp_path):
    """tiktoken panicked in Rust ("Encoder and decoder must be of equal length")."""
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    tok = tmp_path / "dup.tiktoken"
    rank_file(tok, 0)
    tok.write_text(tok.read_text() + f"{base64.b64encode(b'ab').decode()} 5\n")
    args = ["generate", "--ckpt", ckpt, "--prompt", "abc", "--tokenizer", str(tok)]
    fails(capsys, tmp_path, args, str(tok), "line 257 repeats rank 5 of line 6")


def test_a_prompt_byte_that_is_not_utf8(capsys, tmp_path):
    """Decided: the byte tokenizer reads the bytes given; a text tokenizer refuses in one line (tiktoken
    would silently read U+FFFD)."""
    torch.manual_seed(0)
    model = LanguageModel(**HPARAMS)
    ckpt = checkpoint(tmp_path / "m.ckpt", model, HPARAMS)
    prompt = b"a\xffb".decode("utf-8", errors="surrogateescape")  # as Python reads it from argv
    assert run_cli(["generate", "--ckpt", ckpt, "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    expected = generate(model.eval(), torch.tensor([[97, 255, 98]]), 3)[0].tolist()
    assert out.rstrip("\n") == bytes(expected).decode("utf-8", errors="replace")
    tok = rank_file(tmp_path / "t.tiktoken", 0)
    args = ["generate", "--ckpt", ckpt, "--prompt", "x", "--prompt", prompt, "--tokenizer", tok]
    fails(capsys, tmp_path, args, "prompt 2 holds byte 0xff at character 2, which is not UTF-8 text")


SEPARATORS = ["\f", "\x0b", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(s):04X}" for s in SEPARATORS])
def test_unicode_line_separators_stay_inside_a_prompt(sep, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"one{sep}two\nthree\r\nfour", encoding="utf-8", newline="")
    assert _read_prompts(str(path)) == [f"one{sep}two", "three", "four"]


def test_a_byte_order_mark_is_not_part_of_prompt_one(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffdef f(\nx\n".encode())
    assert _read_prompts(str(path)) == ["def f(", "x"]
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    base = ["generate", "--ckpt", ckpt, "--max-new-tokens", "3"]
    assert run_cli([*base, "--prompt", "def f("]) == 0
    alone = capsys.readouterr().out
    assert run_cli([*base, "--prompts-file", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"=== completion 1/2 ===\n{alone}")


def test_a_blank_line_with_crlf_or_a_separator_only_is_still_refused(capsys, tmp_path):
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"one\r\n\r\nthree\r\n")
    args = ["generate", "--ckpt", ckpt, "--prompts-file", str(path)]
    fails(capsys, tmp_path, args, f"line 2 of the prompts file {path} is empty")


def fifo(tmp_path) -> str:
    import os

    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


@pytest.mark.parametrize(
    "source, expected",
    [
        (lambda tmp: "/dev/zero", "is not a regular file (a device or a FIFO)"),
        (fifo, "is not a regular file"),
        (lambda tmp: str(tmp), "is a directory"),
        (lambda tmp: _huge(tmp), "has 16,777,217 bytes, more than"),
    ],
    ids=["dev-zero", "fifo", "directory", "huge"],
)
def test_prompts_file_reads_are_bounded(source, expected, capsys, tmp_path):
    """--prompts-file /dev/zero read until memory ran out (MemoryError traceback); a FIFO blocked."""
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    path = source(tmp_path)
    fails(capsys, tmp_path, ["generate", "--ckpt", ckpt, "--prompts-file", path],
          f"the prompts file {path}", expected)


def _huge(tmp_path) -> str:
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(2**24 + 1)  # sparse on disk
    return str(path)


@pytest.mark.parametrize(
    "weight, expected",
    [
        (lambda w: w.to_sparse(), "'norm.weight' is a torch.sparse_coo tensor"),
        (lambda w: torch.empty_like(w, device="meta"), "'norm.weight' is a meta tensor"),
    ],
    ids=["sparse", "meta"],
)
def test_checkpoint_weights_without_numbers(weight, expected, capsys, tmp_path):
    """A meta weight was a traceback ("Tensor.item() cannot be called on meta tensors"), a sparse one an
    unclear "does not match ... Error(s) in loading state_dict"."""
    torch.manual_seed(0)
    model = LanguageModel(**HPARAMS)
    state = model.state_dict()
    state["norm.weight"] = weight(state["norm.weight"])
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"_class_path": "spectralds.models.LanguageModel",
                                                          **HPARAMS}}, ckpt)
    fails(capsys, tmp_path, ["generate", "--ckpt", str(ckpt), "--prompt", "ab"], str(ckpt), expected)


@pytest.mark.parametrize(
    "seed, expected",
    [("99999999999999999999999", "--seed must be <= 18446744073709551615"), ("-1", "--seed must be >= 0")],
)
def test_seed_out_of_range(seed, expected, capsys, tmp_path):
    """An overflowing seed was torch's "Overflow when unpacking long long" traceback."""
    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "m.ckpt", LanguageModel(**HPARAMS), HPARAMS)
    fails(capsys, tmp_path, ["generate", "--ckpt", ckpt, "--prompt", "ab", "--seed", seed], expected)


def test_checkpoint_that_is_a_device(capsys, tmp_path):
    fails(capsys, tmp_path, ["generate", "--ckpt", "/dev/zero", "--prompt", "ab"],
          "checkpoint /dev/zero is not a regular file")


@pytest.mark.parametrize("temperature", [1e-320, 1e-40, 1e300, 1.7e308])
def test_extreme_temperatures_sample_a_valid_distribution(temperature):
    """A tiny temperature overflowed the scaled logits to inf, a huge one turned the padding's -inf mask
    into NaN: both were torch's "probability tensor contains inf, nan" traceback."""
    model, prompt = padded_model(), torch.tensor([list(b"def f(")])
    out = generate(model, prompt, 6, temperature=temperature,
                   generator=torch.Generator().manual_seed(0), vocab_size=256)
    assert (out[0, 6:] < 256).all()
    if temperature < 1e-30:  # the limit is greedy
        assert torch.equal(out, generate(model, prompt, 6, vocab_size=256))


def test_extreme_temperature_through_the_command(capsys, tmp_path):
    ckpt = checkpoint(tmp_path / "padded.ckpt", padded_model(), PADDED)
    base = ["generate", "--ckpt", ckpt, "--prompt", "def f(", "--max-new-tokens", "4"]
    assert run_cli(base) == 0
    greedy = capsys.readouterr().out
    assert run_cli([*base, "--temperature", "1e-320"]) == 0
    assert capsys.readouterr().out == greedy
