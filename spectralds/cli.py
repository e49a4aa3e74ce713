"""`spectralds` command line: LightningCLI (fit/validate/test/predict) plus the commands in `COMMANDS`.

This is the one place where exceptions become one-line user errors (`spectralds: error: ...`, exit 2);
set SPECTRALDS_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from spectralds.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from spectralds.cli_errors import check_config_files, parser_problem
from spectralds.cli_eval import eval_main
from spectralds.cli_export import export_main
from spectralds.cli_fits import distill_filters_main, import_fit_main
from spectralds.cli_generate import generate_main
from spectralds.compat import parse_written, subcommand_parser
from spectralds.errors import UserError, first_line


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the run's log dir (Lightning) and logs it as TensorBoard hparams."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, Logger):
            trainer.logger.log_hyperparams(_flatten(self.config.as_dict()))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class SpectraLDSCLI(LightningCLI):
    """Model and data chosen by class_path; optimizer/scheduler are callables in the model's init."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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
        # The model's vocabulary comes from the data's tokenizer, written nowhere in a config. A parse
        # link (not one on instantiation) keeps the model built before the data, so a config error in
        # the model is reported first. Models or data modules without these arguments skip it.
        parser.link_arguments(
            ("data.init_args.tokenizer", "data.init_args.bpe_vocab_size"),
            "model.init_args.vocab_size",
            compute_fn=tokenizer_vocab_size,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; fill in the seq_len a config left out (see `_derive_seq_len`); print the result for
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
            read_checkpoint(ckpt_path, mmap=True)

    def _apply_written_rules(self, parser: LightningArgumentParser, argv: list[str]) -> None:
        """The parse-time rules that depend on what the user wrote, not on the parser's defaults."""
        config, given = self._subcommand_sections(parse_written(parser, argv))
        if given is not None:
            self._derive_seq_len(config, given)
            self._keep_written_vocab_size(config, given)

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

    def _keep_written_vocab_size(self, config: Any, given: Any) -> None:
        """A vocab_size the user wrote wins over the tokenizer link (a padded vocabulary, say), but it
        must hold every token id: never replaced silently, never too small."""
        written = given.get("model.init_args.vocab_size")
        model = config.get("model.init_args")
        if written is None or model is None or "vocab_size" not in model:
            return
        data = config.get("data.init_args") or {}
        needed = model.vocab_size  # linked, padded; the tokenizer's own count when there is one:
        if "tokenizer" in data:  # a written size between the two is fine
            needed = tokenizer_token_count(data.tokenizer, data.get("bpe_vocab_size"))
        if written < needed:
            raise UserError(f"model vocab_size {written} is smaller than the tokenizer's {needed} tokens")
        model.vocab_size = written

    def _derive_seq_len(self, config: Any, given: Any) -> None:
        """seq_len written once: where a config (or the command line) sets it for only one of model and
        data, the other follows: the model's is the data's longest sequence (training or validation),
        the data's is the model's. Not a jsonargparse link, which would also override a value that
        was written (lengthgen configs train at 128 and validate at 2048 with one 2048 model)."""
        model, data = config.get("model.init_args"), config.get("data.init_args")
        if model is None or data is None or "seq_len" not in model or "seq_len" not in data:
            return
        wrote_model = given.get("model.init_args.seq_len") is not None
        wrote_data = given.get("data.init_args.seq_len") is not None
        if wrote_data and not wrote_model:
            model.seq_len = max(data.seq_len, data.get("val_seq_len") or 0)
        elif wrote_model and not wrote_data:
            data.seq_len = model.seq_len

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

    before_fit = before_validate = before_test = before_predict = _check_run_dirs


# --print_config's flags -> dump() options (the ones jsonargparse takes).
PRINT_FLAGS = {"skip_default": "skip_default", "skip_unset": "skip_unset", "comments": "with_comments"}


def split_print_config(argv: list[str]) -> tuple[list[str], dict[str, bool] | None]:
    """`argv` without `--print_config[=flag,...]`, and the dump options its flags ask for (None when
    not given)."""
    rest, options = [], None
    for arg in argv:
        name, _, flags = arg.partition("=")
        if name != "--print_config":
            rest.append(arg)
            continue
        options = options or {}
        for flag in filter(None, flags.split(",")):
            if flag not in PRINT_FLAGS:
                raise UserError(f"--print_config takes the flags {', '.join(PRINT_FLAGS)}; got {flag!r}")
            if flag == "comments" and importlib.util.find_spec("ruamel") is None:
                raise UserError("--print_config=comments needs ruamel.yaml (pip install ruamel.yaml)")
            options[PRINT_FLAGS[flag]] = True
    return rest, options


def tokenizer_token_count(tokenizer: str, bpe_vocab_size: int) -> int:
    """How many token ids TextDataModule's tokenizer for these arguments produces."""
    from spectralds.data import build_tokenizer

    return bpe_vocab_size if tokenizer == "bpe" else build_tokenizer(tokenizer).vocab_size


def tokenizer_vocab_size(tokenizer: str, bpe_vocab_size: int) -> int:
    """The model's vocab_size linked from the data: the token count padded to a multiple of 64 (fast
    matmuls)."""
    return -(-tokenizer_token_count(tokenizer, bpe_vocab_size) // 64) * 64


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


# LightningCLI's subcommands (their options come from the Trainer and the config).
LIGHTNING_COMMANDS = {
    "fit": "train a model from --config files (LightningCLI)",
    "validate": "run one validation epoch of a model (LightningCLI)",
    "test": "run one test epoch of a model (LightningCLI)",
    "predict": "run prediction over a data module (LightningCLI)",
}
# Our own commands: name -> (function of the remaining arguments, one-line help). Add one entry here.
COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "generate": (generate_main, "generate text from a checkpoint"),
    "distill-filters": (distill_filters_main, "fit one diagonal LDS to the spectral filters"),
    "import-fit": (import_fit_main, "convert a released Flash STU 2 / SpectraLDS fit to ours, measured"),
    "eval": (eval_main, "lm-evaluation-harness tasks on several checkpoints, side by side"),
    "export": (export_main, "write a checkpoint as a transformers directory (or Flash STU 2's format)"),
}


def print_help() -> None:
    lines = ["usage: spectralds <command> [options]", "", "commands:"]
    helps = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in COMMANDS.items()}}
    lines += [f"  {name:<17} {text}" for name, text in helps.items()]
    lines += ["", "`spectralds <command> --help` lists a command's options."]
    print("\n".join(lines))


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind `error`, if any: jsonargparse and Lightning wrap what __init__ raises."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _lightning_command(argv: list[str]) -> str:
    return next((a for a in argv if a in LIGHTNING_COMMANDS), "fit")


def run(argv: list[str], from_command_line: bool) -> None:
    """Dispatch one command line; raises what the command raises."""
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
    elif argv[0] in COMMANDS:
        COMMANDS[argv[0]][0](argv[1:])
    elif not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
        names = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
        raise UserError(f"unknown command {argv[0]!r}; commands: {names} (see `spectralds --help`)")
    else:
        check_config_files(argv)
        try:  # LightningCLI reads sys.argv itself and warns when given both
            SpectraLDSCLI(args=None if from_command_line else argv)
        except argparse.ArgumentError as e:
            if user_error_in(e) is not None:
                raise
            help_hint = f"see `spectralds {_lightning_command(argv)} --help`"
            raise UserError(f"{parser_problem(e)} ({help_hint})") from e


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv, from_command_line)
    except Exception as e:
        user_error = user_error_in(e)
        if user_error is None and "Error(s) in loading state_dict" in str(e):
            # fit --ckpt_path: Lightning loads the weights itself
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            user_error = UserError(f"the checkpoint does not match the model: {lines[-1]}")
        if user_error is None or os.environ.get("SPECTRALDS_DEBUG"):
            raise
        sys.stderr.write(f"spectralds: error: {first_line(user_error)}\n")  # one write: DDP ranks interleave
        sys.exit(2)


if __name__ == "__main__":
    main()
