"""configs/quickstart.yaml + configs/quickstart/distill_prune.yaml end to end (train STU -> distill ->
prune -> table), and StageReport itself."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import spectralds.callbacks.report as report_module
import spectralds.callbacks.stage_table as stage_table
from spectralds.callbacks import StageReport, STUToLDSDistillation
from spectralds.cli import main
from spectralds.cli_config import resolved_config
from spectralds.models import LanguageModel

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "quickstart" / "distill_prune.yaml"]


pytestmark = pytest.mark.usefixtures("cli_env")



@pytest.fixture
def validations(monkeypatch):
    """Counts the validation passes StageReport runs itself (instead of reusing the last one)."""
    calls = []
    original = report_module.run_validation
    monkeypatch.setattr(report_module, "run_validation", lambda trainer: calls.append(1) or original(trainer))
    return calls


def tiny_config(tmp_path: Path, val_check_interval: int = 3) -> Path:
    """The shipped configs as the run resolves them, with CPU-seconds sizes; callbacks, data source and
    logger stay as shipped."""
    cfg = resolved_config(CONFIGS)
    trainer = cfg["trainer"]
    trainer.update(max_steps=6, val_check_interval=val_check_interval, limit_val_batches=4)
    trainer.update(log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    model = cfg["model"]["init_args"]
    model.update(dim=16, num_layers=2, seq_len=64, num_filters=4, mlp_ratio=2.0)
    model["lr_scheduler"]["init_args"].update(warmup_steps=2, total_steps=6)
    cfg["data"]["init_args"].update(seq_len=64, batch_size=4, max_bytes=200_000)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("STUToLDSDistillation"):
            callback["init_args"]["state_dim"] = 16
        if callback["class_path"].endswith("StageReport"):
            callback["init_args"]["decode_tokens"] = 16
            callback["init_args"]["eval_include_path"] = str(ROOT / "spectralds" / "evaluation" / "tasks")
            callback["init_args"]["eval_limit"] = 4
    path = tmp_path / "tiny_distill_prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # no header


def test_distill_prune_config_prints_the_table(tmp_path, capsys, validations):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        main(["fit", "--config", str(tiny_config(tmp_path))])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["STU", "LDS", "LDS pruned 50%"]
    assert [r[1] for r in rows] == ["2 stu_t", "2 lds", "2 lds"]
    stu, lds, pruned = ({"states": r[2], "loss": float(r[4]), "ms": float(r[5])} for r in rows)
    assert stu["states"] == "-" and lds["states"] == "32"
    assert abs(int(pruned["states"]) - 16) <= 1
    assert lds["loss"] == pytest.approx(stu["loss"], rel=1e-3)  # distillation keeps the function
    assert all(math.isfinite(r["loss"]) and r["ms"] > 0 for r in (stu, lds, pruned))
    assert "held-out validation split" in out

    run_dir = tmp_path / "runs" / "distill_prune" / "version_0"
    assert table_rows((run_dir / "report.md").read_text()) == rows
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["split"] == "validation" and len(saved["rows"]) == 3
    assert saved["rows"][2]["lds_states_per_layer"] == [int(s) for s in rows[2][3].split("/")]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    # Full precision, and the last three validation passes the run logged: the STU's at the last step,
    # then the LDS's and the pruned LDS's.
    logged = [e.value for e in events.Scalars("val/loss")]
    assert logged[-3:] == [pytest.approx(row["val_loss"], rel=1e-6) for row in saved["rows"]]
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert scalars["report/lds_pruned_50/lds_states"] == int(pruned["states"])
    # The STU reuses the validation at the last step; the changed models are validated once each.
    assert len(validations) == 2
    # The distilled model's checkpoint (saved between the stages) carries the STU's row.
    checkpoint = torch.load(run_dir / "checkpoints" / "lds.ckpt", weights_only=True)
    assert checkpoint["callbacks"][StageReport("STU").state_key]["row"] == saved["rows"][0]
    # "Swap, then evaluate": the lm-eval table has one row per stage; the LDS scores as the STU does.
    scored = json.loads((run_dir / "eval.json").read_text())["models"]
    assert list(scored) == ["STU", "LDS", "LDS pruned 50%"]
    assert set(scored["STU"]["results"]) == {"spectralds_mc", "spectralds_ppl", "spectralds_gen"}
    assert scored["LDS"]["results"]["spectralds_mc"] == scored["STU"]["results"]["spectralds_mc"]
    ppl = [scored[m]["results"]["spectralds_ppl"]["bits_per_byte"] for m in ("STU", "LDS")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)
    assert "LDS - STU" in out


def lm_trainer(tmp_path, callbacks, val_check_interval: int):
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=16, dim=8, num_layers=2, seq_len=64, num_filters=4)
    tokens = torch.randint(0, 16, (16, 65), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    trainer = L.Trainer(
        callbacks=callbacks,
        max_steps=6,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, data, data)
    return model


@pytest.mark.parametrize("val_check_interval, expected_runs", [(3, 0), (4, 1)])
def test_stage_report_revalidates_only_when_weights_changed(
    tmp_path, validations, val_check_interval, expected_runs
):
    """With validation at step 4 of 6, the trained weights were never validated: StageReport must run it."""
    first = StageReport("STU", decode_tokens=4)
    distill = STUToLDSDistillation(state_dim=16, save_path=None, log_plot=False)
    last = StageReport("LDS", print_table=True, decode_tokens=4)
    lm_trainer(tmp_path, [first, distill, last], val_check_interval)
    assert len(validations) == expected_runs
    assert first.row["val_loss"] == distill.results["distill/val_loss_stu"]
    assert last.row["val_loss"] == distill.results["distill/val_loss_lds"]
    assert (tmp_path / "report.md").is_file()  # no logger: the default root dir


def test_format_table_marks_missing_values():
    row = {
        "model": "user model",
        "layers": "2 stu",
        "lds_states": None,
        "lds_states_per_layer": [],
        "val_loss": None,
        "val_batches": 0,
        "decode_ms_per_token": None,
        "decode": [],
    }
    (cells,) = table_rows(stage_table.format_table([row]))
    assert cells == ["user model", "2 stu", "-", "-", "-", "-"]
    assert "decode:" not in stage_table.format_table([row])


@pytest.mark.slow
def test_distill_prune_config_under_ddp(tmp_path):
    """2 CPU ranks (gloo): the stages' collectives line up, and only rank 0 prints and writes the table."""
    env = dict(os.environ, SPECTRALDS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = ["fit", "--config", str(tiny_config(tmp_path)), "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = subprocess.run(
        [sys.executable, "-m", "spectralds", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| LDS pruned 50%") == 1
    rows = table_rows(result.stdout)
    assert [r[2] for r in rows][:2] == ["-", "32"] and all(float(r[5]) > 0 for r in rows)
    saved = json.loads((tmp_path / "runs" / "distill_prune" / "version_0" / "report.json").read_text())
    assert table_rows((tmp_path / "runs" / "distill_prune" / "version_0" / "report.md").read_text()) == rows
    assert saved["rows"][1]["val_loss"] == pytest.approx(saved["rows"][0]["val_loss"], rel=1e-3)
