"""LightningCLI for `spectralds fit|validate|test|predict`: crash-safe checkpoints by default, the config
completed by `spectralds.config_rules` (seq_len written once, the model's vocab_size linked to the data's
tokenizer), --print_config of the config the run will use. Imported only when one of those commands runs
(Lightning is slow to import)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from spectralds.callbacks._common import OneShotLayerChange
from spectralds.callbacks.final_save import final_weights_saved, last_path, save_final_weights
from spectralds.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from spectralds.cli_config import split_print_config
from spectralds.cli_errors import parser_problem
from spectralds.cli_resume import check_resumed_model
from spectralds.compat import parse_written, subcommand_parser
from spectralds.config_rules import VOCAB_SIZE_LINK, apply_written_rules, tokenizer_vocab_size
from spectralds.errors import StoppedRun, UserError, first_line, user_error_in

# The HPARAMS tab's metric columns: TensorBoard reads their values from the run's own scalars of these tags.
HPARAMS_METRICS = ("train/loss", "val/loss")


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the run's log dir (Lightning) and logs it as hyperparameters; in
    TensorBoard they fill the HPARAMS tab, next to the run's train/val losses."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer.logger, Logger):
            return
        params = _flatten(self.config.as_dict())
        trainer.logger.log_hyperparams(params)
        if isinstance(trainer.logger, TensorBoardLogger):
            _write_hparams_tab(trainer.logger, params)


def _write_hparams_tab(logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    """TensorBoardLogger writes the HPARAMS summaries only with metric values in hand (a -1 placeholder,
    `default_hp_metric`, or a value logged as a scalar at step 0); this names the metric columns without
    a value, so the tab shows the real losses the run logs."""
    from torch.utils.tensorboard.summary import hparams

    summaries = hparams(params, dict.fromkeys(HPARAMS_METRICS, 0.0))  # only the keys are written
    for summary in summaries:
        logger.experiment.file_writer.add_summary(summary)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class SaveOnSignal(Callback):
    """On SIGTERM (a scheduler's preemption, `kill`), Lightning stops after the batch in hand and raises:
    this saves that consistent state where the run's ModelCheckpoint keeps `last.ckpt` (a resume point
    instead of up to a whole interval lost) and remembers what it saved, for the one-line report. At the
    end of training it saves the final weights (`spectralds.callbacks.final_save`); a SIGTERM there (during
    a distillation, say) keeps that last.ckpt, the trained model, and reports the changed models saved.
    """

    def __init__(self) -> None:
        self.saved: str | None = None
        self.next = "resume with --ckpt_path"  # what the report tells the user to do with it

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException,
                     ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        final = final_weights_saved(trainer)
        if final:  # stopped at the end of training: the trained model is saved, layers may be changed
            changes = [c for c in trainer.callbacks if isinstance(c, OneShotLayerChange)]
            made = [c.saved_to for c in changes if c.saved_to]
            trained = f"{final[0]} (global step {trainer.global_step}, the trained model)"
            self.saved = ", ".join([trained, *made])
            missing = [c.checkpoint_name for c in changes if not c.saved_to and c.at_step is None
                       and c.at_epoch is None and c.save_target(trainer)]
            self.next = (f"not made: {', '.join(missing)} (`spectralds distill --ckpt {final[0]}` makes the "
                         "distilled or pruned model)" if missing else "")
            return
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.dirpath), None)
        if checkpoint is None:
            return
        path = last_path(checkpoint)
        trainer.save_checkpoint(path, weights_only=False)  # a full resume point; said, so no notice
        self.saved = f"{path} (global step {trainer.global_step})"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_final_weights(trainer)  # runs without a layer-changing callback: their true last step
        if trainer.received_sigterm:  # came during the end-of-training stages: still a stopped run
            raise SIGTERMException()


class SpectraLDSCLI(LightningCLI):
    """Model and data chosen by class_path; optimizer/scheduler are callables in the model's init."""

    def __init__(
        self, args: list[str] | None = None, run: bool = True, save_on_signal: SaveOnSignal | None = None
    ) -> None:
        self.save_on_signal = save_on_signal or SaveOnSignal()
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggedSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            # exit_on_error=False: parse errors raise ArgumentError, which `main` prints as one line
            # (subcommand parsers inherit it) instead of jsonargparse's usage screen.
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
                }
            },
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's vocabulary comes from the data's tokenizer (spectralds.config_rules).
        sources, target = VOCAB_SIZE_LINK
        parser.link_arguments(sources, target, compute_fn=tokenizer_vocab_size)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; complete the config by `config_rules` (seq_len, vocab_size); print the result for
        --print_config; read a given ckpt_path once (weights_only, memory-mapped): LightningCLI loads
        its hyperparameters next with a bare torch.load, whose errors would not name the file."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list):
            argv, print_options = split_print_config(argv)
            if print_options is not None:
                self._print_config(parser, args, argv, print_options)
        super().parse_arguments(parser, args)
        if isinstance(argv, list):
            self._apply_written_rules(parser, argv)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path:
            checkpoint = read_checkpoint(ckpt_path, mmap=True)
            if subcommand == "fit":
                check_resumed_model(self.config[subcommand].get("model"), checkpoint, ckpt_path)
                self._resumed = (ckpt_path, checkpoint.get("callbacks") or {})

    def _apply_written_rules(self, parser: LightningArgumentParser, argv: list[str]) -> None:
        """`config_rules.apply_written_rules`, given what the user wrote (not the parser's defaults)."""
        config, given = self._subcommand_sections(parse_written(parser, argv))
        if given is not None:
            apply_written_rules(config, given)

    def _print_config(
        self, parser: LightningArgumentParser, args: Any, argv: list[str], options: dict[str, bool]
    ) -> NoReturn:
        """Print the config this run would use, derived seq_len and linked vocab_size included, and
        exit. jsonargparse's own --print_config prints before its parse links and our rules run, so
        it is only the fallback, with a note, for a config that cannot be completed yet (no model
        written, a tokenizer file missing): then it prints what was written."""
        try:
            self.config = parser.parse_args(argv)
            self._apply_written_rules(parser, argv)
        except (argparse.ArgumentError, UserError) as e:
            reason = first_line(user_error_in(e) or UserError(parser_problem(e)))
            sys.stderr.write("spectralds: note: --print_config shows the config without the derived seq_len "
                             f"and the tokenizer's vocab_size, because: {reason}\n")
            super().parse_arguments(parser, args)  # jsonargparse prints and exits
        section, _ = self._subcommand_sections(None)
        options = {"skip_unset": False, **options}  # jsonargparse's --print_config default
        dump = subcommand_parser(self, self.config.get("subcommand")).dump
        sys.stdout.write(dump(section, skip_link_targets=False, **options))
        parser.exit()

    def _subcommand_sections(self, given: Any) -> tuple[Any, Any]:
        """(the parsed config, what the user wrote) of the subcommand being run."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return self.config, given
        return self.config[subcommand], given.get(subcommand) if given is not None else None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Crash-safe checkpoints by default: AtomicCheckpointIO (unless the config sets a CheckpointIO)
        and, when the config names no ModelCheckpoint, Lightning's default one plus a last.ckpt to resume."""
        config = {**self._section(self.config_init, "trainer"), **kwargs}
        plugins, callbacks = _as_list(config.get("plugins")), _as_list(config.get("callbacks"))
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not self._strategy_brings_io_plugin():
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, ModelCheckpoint(save_last=True)]
        kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), self.save_on_signal]
        check_unique_stateful(callbacks)
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:  # Lightning's own checks of trainer settings
            if user_error_in(e) is not None:
                raise
            raise UserError(f"trainer: {first_line(e)}") from e

    def _section(self, config: Any, key: str) -> dict[str, Any]:
        section = config.get(self.subcommand, config) if self.subcommand else config
        return section.get(key) or {}

    def _strategy_brings_io_plugin(self) -> bool:
        # Read from the parsed config, not the instantiated strategy: its public `checkpoint_io`
        # property creates a default TorchCheckpointIO, which would hide whether the user gave one.
        strategy = self._section(self.config, "trainer").get("strategy")
        init_args = strategy.get("init_args") if hasattr(strategy, "get") else None
        return bool(init_args and init_args.get("checkpoint_io") is not None)

    def _check_run_dirs(self) -> None:
        """The run's directories must be creatable before training starts, not at its first log."""
        dirs = [self.trainer.default_root_dir] + [
            lg.save_dir for lg in self.trainer.loggers if isinstance(getattr(lg, "save_dir", None), str)
        ]
        for directory in dirs:
            if "://" in directory:
                continue
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the run directory {directory} ({e.strerror})") from e

    def _check_resumed_callbacks(self) -> None:
        """Callbacks that refuse a resumed state their config contradicts (`check_resumed`) say so now,
        before the run writes its config.yaml, not when Lightning restores them after it."""
        ckpt_path, states = getattr(self, "_resumed", (None, {}))
        for callback in self.trainer.callbacks if ckpt_path else []:
            if callable(getattr(callback, "check_resumed", None)):
                callback.check_resumed(states.get(callback.state_key), f"the checkpoint {ckpt_path}")

    def before_fit(self) -> None:
        self._check_run_dirs()
        self._check_resumed_callbacks()

    before_validate = _check_run_dirs

    def before_test(self) -> None:
        self._check_data("test")

    def before_predict(self) -> None:
        self._check_data("predict")

    def _check_data(self, stage: str) -> None:
        """The model or the data module defines the stage's dataloader: Lightning would raise its
        MisconfigurationException with a traceback only once the run starts."""
        hook = f"{stage}_dataloader"
        sources = [s for s in (self.datamodule, self.model) if s is not None]
        if not any(is_overridden(hook, source) for source in sources):
            names = [type(source).__name__ for source in sources]
            who = f"neither {names[0]} nor {names[1]} defines" if len(names) == 2 else f"{names[0]} lacks"
            raise UserError(f"`spectralds {stage}` needs {stage} data, but {who} {hook}() (give --data a "
                            "data module that has it)")
        self._check_run_dirs()


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def check_unique_stateful(callbacks: list[Any]) -> None:
    """Two stateful callbacks with one state key (say a config's STUToLDSDistillation and the drop-in
    callbacks/distill.yaml) cannot both run: Lightning refuses them with a traceback, we with one line."""
    seen: set[str] = set()
    for callback in callbacks:
        if not isinstance(callback, Callback) or type(callback).state_dict is Callback.state_dict:
            continue
        key = callback.state_key
        if key in seen:
            name = type(callback).__name__
            raise UserError(
                f"trainer.callbacks lists {name} twice and only one can run: remove one (a config that "
                "has its own needs no --trainer.callbacks+= drop-in; set its init_args instead)"
            )
        seen.add(key)


def run_lightning(args: list[str] | None) -> None:
    """A LightningCLI command; a SIGTERM that stopped it becomes a StoppedRun naming what was saved."""
    report = SaveOnSignal()
    try:
        SpectraLDSCLI(args=args, save_on_signal=report)
    except SIGTERMException as e:
        saved = "; ".join(filter(None, [f"saved {report.saved}", report.next])) if report.saved else (
            "nothing was saved")
        raise StoppedRun(f"stopped by SIGTERM: {saved}") from e
