"""`spectralds export --format hf`: a transformers directory that loads in a fresh process with
`AutoModelForCausalLM` and gives our logits, our generations (greedy and seeded sampling, decoding from
the model's own states), and left-padded rows equal to their unpadded runs; one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from cli_helpers import one_line_error, run_cli  # noqa: E402

from spectralds.distill.prune import prune_lds_layers  # noqa: E402
from spectralds.errors import UserError  # noqa: E402
from spectralds.generate import generate  # noqa: E402
from spectralds.layers import build_layer, layer_specs  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ, NEW, SEED, TEMPERATURE, TOP_K = 48, 12, 3, 0.8, 20
PADDED_LENGTHS = (6, 2, 4)
KINDS = ("stu", "stu_t", "lds", "hybrid", "pruned", "ar", "hybrid64", "lds_bf16")


def make_model(kind: str) -> LanguageModel:
    """Tiny byte-level models of every kind; "lds"/"pruned" are swapped after construction, as a
    distillation does, so only the layer specs say what they are."""
    torch.manual_seed(0)
    pattern = {"stu": ["stu"], "stu_t": ["stu_t"], "lds": ["stu"], "pruned": ["stu_t"],
               "ar": ["stu", "lds_ar", "attn"]}
    options = {"stu_t": {"mlp_activation": "gelu_tanh", "head_bias": True, "tie_embeddings": False}}
    model = LanguageModel(
        vocab_size=256, dim=16, num_layers=3 if kind == "ar" else 2, seq_len=SEQ, num_filters=4,
        mlp_ratio=2.0, layer_pattern=pattern.get(kind, ["stu", "attn"]), **options.get(kind, {}),
        layer_kwargs={"attn": {"num_heads": 2, "window_size": 8}, "lds_ar": {"state_dim": 6, "ar_order": 2},
                      "stu": {"ar_order": 2 if kind == "ar" else 0}},
    )
    if kind in ("lds", "pruned", "lds_bf16"):
        g = torch.Generator().manual_seed(1)
        for block in model.blocks:
            mode = "tensordot" if kind == "pruned" else "exact"
            lds = build_layer("lds", dim=16, seq_len=SEQ, num_filters=4, state_dim=12, mode=mode,
                              learnable=False)
            A = torch.rand(12, generator=g, dtype=torch.float64) * 1.8 - 0.9  # fitted: float64 buffers
            lds.set_system(A, torch.randn(12, generator=g, dtype=torch.float64),
                           torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.3)
            block.mixer = lds
    if kind == "pruned":
        prune_lds_layers(model, 0.5)
    dtypes = {"hybrid64": torch.float64, "lds_bf16": torch.bfloat16}  # an LDS keeps its float64 system
    return model.to(dtypes.get(kind, torch.float32)).eval()


def save_checkpoint(model: LanguageModel, path: Path) -> Path:
    """What `spectralds fit` saves, as far as `load_model` reads it."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "spectralds_layers": layer_specs(model), "spectralds_model": "LanguageModel"}, path)
    return path


def left_padded(lengths=PADDED_LENGTHS) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0: any id, it is masked
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    return prompts, ids, mask


def fresh_process(script: Path, *args: str, hf_home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind exported with `spectralds export`, then loaded and run by transformers in one fresh
    process (tests/hf_worker.py)."""
    out = tmp_path_factory.mktemp("hf_export")
    models, jobs = {}, {}
    prompts, ids, mask = left_padded()
    for kind in KINDS:
        models[kind] = model = make_model(kind)
        ckpt = save_checkpoint(model, out / f"{kind}.ckpt")
        assert run_cli(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out / kind)]) == 0
        g = torch.Generator().manual_seed(2)
        jobs[kind] = {"dir": str(out / kind), "x": torch.randint(0, 256, (2, 30), generator=g),
                      "prompt": torch.randint(0, 256, (1, 6), generator=g), "new_tokens": NEW, "seed": SEED,
                      "temperature": TEMPERATURE, "top_k": TOP_K, "padded": (ids, mask)}
    torch.save(jobs, out / "jobs.pt")
    fresh_process(ROOT / "tests" / "hf_worker.py", str(out / "jobs.pt"), str(out / "results.pt"),
                  hf_home=out / "hf_home")
    return models, jobs, torch.load(out / "results.pt", weights_only=False), prompts


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_ours_in_a_fresh_process(exported, kind):
    models, jobs, results, _ = exported
    got = results[kind]
    assert got["module"].startswith("spectralds.interop") or "modeling_spectralds" in got["module"]
    model = models[kind]
    assert got["dtype"] == str(next(model.parameters()).dtype)
    with torch.no_grad():
        ours = model(jobs[kind]["x"])
    assert got["logits"].dtype == ours.dtype
    assert rel(got["logits"], ours) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_ours_greedy_and_seeded(exported, kind):
    """HF samples with torch.multinomial on softmax(logits / temperature) after top-k, drawing from
    torch's global generator; ours draws the same way from the generator it is given. Seeding the
    global generator with SEED there and giving ours torch.Generator().manual_seed(SEED) makes both
    consume one stream in one order (one draw per token), so the tokens must agree."""
    models, jobs, results, _ = exported
    model, job, got = models[kind], jobs[kind], results[kind]
    assert torch.equal(got["greedy"], generate(model, job["prompt"], NEW))
    ours = generate(model, job["prompt"], NEW, TEMPERATURE, TOP_K, torch.Generator().manual_seed(SEED))
    assert torch.equal(got["sampled"], ours)
    assert not torch.equal(ours, generate(model, job["prompt"], NEW))  # sampling differs from greedy here
    # generate ran our prefill once and one step per token after the first: the model's own states.
    assert got["calls"] == {"prefill": 1, "step": NEW - 1}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lds", "pruned"])
def test_lds_cache_is_constant_size(exported, kind):
    """O(1) per token: after 1 and after NEW more tokens the cache holds the same tensors, same shapes."""
    models, _, results, _ = exported
    got = results[kind]
    assert got["cache_type"] == "SpectralDSCache"
    before, after = got["cache_shapes"]
    # exactly the shapes of a fresh state: one (batch, channels, states) tensor per layer, pruned ones smaller
    fresh = [tuple(block.mixer.init_state(1).shape) for block in models[kind].blocks]
    assert before == after == fresh
    assert [shape[-1] for shape in fresh] == [block.mixer.state_dim for block in models[kind].blocks]
    assert (max(shape[-1] for shape in fresh) < 12) == (kind == "pruned")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_equal_their_unpadded_runs(exported, kind):
    models, _, results, prompts = exported
    got = results[kind]
    assert "left_padded_error" not in got, got.get("left_padded_error")
    width = max(PADDED_LENGTHS)
    for row, prompt in enumerate(prompts):
        alone = generate(models[kind], prompt[None], NEW)[0]
        assert torch.equal(got["left_padded"][row, width - len(prompt) :], alone)
        with torch.no_grad():
            ours = models[kind](prompt[None])[0]
        # a padded run rounds differently from an unpadded one: a few units of bfloat16's last place
        tolerance = max(1e-5, 4 * torch.finfo(ours.dtype).eps)
        assert rel(got["left_padded_logits"][row, width - len(prompt) :], ours) <= tolerance


def test_masks_other_than_left_padding_are_refused():
    from spectralds.interop.hf_model import padding_start

    assert padding_start(torch.ones(2, 5, dtype=torch.long)) is None
    assert padding_start(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [2, 0]
    with pytest.raises(UserError, match="left padding"):
        padding_start(torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(UserError, match="left padding"):
        padding_start(torch.tensor([[1, 1, 1, 0]]))  # right padding
    with pytest.raises(UserError, match="no real token"):
        padding_start(torch.tensor([[0, 0], [1, 1]]))


def test_export_refuses_a_non_empty_directory_and_leaves_nothing_behind(tmp_path, capsys):
    ckpt = save_checkpoint(make_model("stu"), tmp_path / "m.ckpt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    err = one_line_error(capsys, ["export", "--ckpt", str(ckpt), "--format", "hf", "--out",
                                  str(tmp_path / "d")])
    assert "not an empty directory" in err
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.ckpt"]  # no staging directory left


@pytest.mark.slow
@pytest.mark.parametrize("first", ["spectralds", "transformers"])
def test_importing_spectralds_registers_the_auto_classes(exported, tmp_path, first):
    """No trust_remote_code: `import spectralds` (before or after transformers) registers the classes,
    without importing transformers itself."""
    directory = exported[1]["stu"]["dir"]
    imports = ["import spectralds, sys", "assert 'transformers' not in sys.modules",
               "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if first == "transformers":
        imports = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "import spectralds"]
    code = "\n".join([*imports, f"m = AutoModelForCausalLM.from_pretrained({directory!r})",
                      f"t = AutoTokenizer.from_pretrained({directory!r})",
                      "assert type(m).__module__ == 'spectralds.interop.hf_model', type(m)",
                      "assert type(t).__name__ == 'SpectralDSTokenizer', type(t)"])
    (tmp_path / "load.py").write_text(code)
    fresh_process(tmp_path / "load.py", hf_home=tmp_path / "hf_home")


def test_what_spectralds_models_cannot_do_is_a_one_line_error():
    from spectralds.interop.hf_export import build_hf_model

    hf = build_hf_model(make_model("lds"))
    prompt = torch.randint(0, 256, (2, 5))
    with pytest.raises(UserError, match="beam search"):
        hf.generate(prompt, num_beams=2, max_new_tokens=3, do_sample=False)
    with pytest.raises(UserError, match="left padding"):  # right padding
        hf.generate(prompt, attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]), max_new_tokens=3)
    with pytest.raises(UserError, match="inputs_embeds"):
        hf(None, inputs_embeds=torch.zeros(2, 5, 16))
    with pytest.raises(UserError, match="output_hidden_states"):
        hf(prompt, output_hidden_states=True)
    with pytest.raises(UserError, match="exceed the model's context"):
        hf.generate(prompt, max_new_tokens=SEQ, do_sample=False)
