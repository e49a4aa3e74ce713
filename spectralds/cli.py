"""`spectralds` command line: LightningCLI (fit/validate/test/predict) plus distill-filters and generate.

This is the one place where exceptions become one-line user errors; set SPECTRALDS_DEBUG=1 for
the full traceback.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import Strategy

from spectralds.checkpoint_io import AtomicCheckpointIO
from spectralds.cli_eval import eval_main
from spectralds.errors import UserError, first_line
from spectralds.io import check_output_path


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
            parser_kwargs={"parser_mode": "omegaconf"},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                }
            },
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Crash-safe checkpoints by default: AtomicCheckpointIO (unless the config sets a CheckpointIO)
        and, when the config names no ModelCheckpoint, Lightning's default one plus a last.ckpt to resume."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins, callbacks = _as_list(config.get("plugins")), _as_list(config.get("callbacks"))
        strategy = config.get("strategy")
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not (
            isinstance(strategy, Strategy) and strategy._checkpoint_io is not None
        ):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, ModelCheckpoint(save_last=True)]
        return super().instantiate_trainer(**kwargs)

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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters with a bare torch.load: name the file when
        # that fails (a truncated last.ckpt, say) instead of showing torch's error alone.
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UserError(f"checkpoint {path} could not be read ({_user_message(e)})") from e


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def distill_filters_main(argv: list[str]) -> None:
    from spectralds.distill import fit_filters, save_fit

    p = argparse.ArgumentParser(
        prog="spectralds distill-filters", description="Fit one diagonal LDS to the 2K spectral filters."
    )
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--num-filters", type=int, default=24)
    p.add_argument("--state-dim", type=int, default=80)
    p.add_argument("--variant", default="hankel")
    p.add_argument("--method", default=None, help="fit method (default: the library's best)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    check_output_path(a.out)  # before the fit, not after it
    kwargs = {"method": a.method} if a.method else {}
    fit = fit_filters(
        a.seq_len, a.num_filters, a.state_dim, variant=a.variant, progress=not a.no_progress, **kwargs
    )
    save_fit(fit, a.out)
    print(
        f"wrote {a.out}: {fit.state_dim} states, relative MSE float64 {fit.rel_mse_f64:.3e}, "
        f"float32 {fit.rel_mse_f32:.3e}, worst filter {max(fit.rel_mse_f64_per_filter):.3e}"
    )


def generate_main(argv: list[str]) -> None:
    import torch

    from spectralds.checkpoint import load_model, read_checkpoint, tokenizer_spec
    from spectralds.data import build_tokenizer
    from spectralds.generate import generate, set_decode_method

    p = argparse.ArgumentParser(prog="spectralds generate", description="Generate text from a checkpoint.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one the model trained with)")
    p.add_argument("--decode", choices=["futurefill", "naive"], default="futurefill", help="STU decoding")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    checkpoint = read_checkpoint(a.ckpt)
    model = load_model(a.ckpt, checkpoint=checkpoint)
    set_decode_method(model, a.decode)
    spec = a.tokenizer or tokenizer_spec(checkpoint)
    if spec == "bpe":
        raise UserError(
            "this model used a BPE tokenizer trained on its corpus: pass --tokenizer tokenizer.json"
        )
    tokenizer = build_tokenizer(spec)
    prompt = torch.tensor([tokenizer.encode(a.prompt)], dtype=torch.long)
    if prompt.shape[1] == 0:
        raise UserError("the prompt is empty")
    generator = torch.Generator().manual_seed(a.seed)
    out = generate(model, prompt, a.max_new_tokens, a.temperature, a.top_k, generator)
    print(tokenizer.decode(out[0].tolist()))


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind `error`, if any: jsonargparse and Lightning wrap what __init__ raises."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _user_message(error: BaseException) -> str:
    found = user_error_in(error)
    return first_line(found if found is not None else error)


SUBCOMMANDS = {"distill-filters": distill_filters_main, "generate": generate_main, "eval": eval_main}


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            SUBCOMMANDS[argv[0]](argv[1:])
        else:  # LightningCLI reads sys.argv itself and warns when given both
            SpectraLDSCLI(args=None if from_command_line else argv)
    except Exception as e:
        user_error = user_error_in(e)
        if user_error is None and "Error(s) in loading state_dict" in str(e):
            # fit --ckpt_path: Lightning loads the weights itself
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            user_error = UserError(f"the checkpoint does not match the model: {lines[-1]}")
        if user_error is None or os.environ.get("SPECTRALDS_DEBUG"):
            raise
        print(f"spectralds: error: {first_line(user_error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
