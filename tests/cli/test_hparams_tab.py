"""The resolved config shows in TensorBoard's HPARAMS tab, with the run's losses as its metric columns and
no placeholder metric (read from the event file as TensorBoard's hparams plugin reads it)."""

from pathlib import Path

import pytest
from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("cli_env")

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


def test_a_fit_fills_the_hparams_tab_with_its_config_and_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger.init_args.name=hp",
            "--trainer.max_steps=2"]
    assert run_cli(args) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "hp" / "version_0"))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)  # what the HPARAMS tab is built from
    assert {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG} <= set(content)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["train/loss", "val/loss"]
    assert all(tag in events.Tags()["scalars"] for tag in ("train/loss", "val/loss"))  # the columns' values
    assert "hp_metric" not in events.Tags()["scalars"]  # no -1 placeholder
    session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert session.hparams["model/init_args/dim"].number_value == 16
    assert session.hparams["model/class_path"].string_value == "spectralds.models.LanguageModel"
    assert session.hparams["trainer/max_steps"].number_value == 2
