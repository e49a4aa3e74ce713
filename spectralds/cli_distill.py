"""`spectralds distill`: a trained or imported checkpoint -> its distilled (optionally pruned) LDS checkpoint,
without training, through the code `STUToLDSDistillation` and `LayerAdaptiveStatePruning` run."""

from __future__ import annotations

import os
from pathlib import Path

from spectralds.cli_errors import CommandParser
from spectralds.errors import UserError, check_float, check_int
from spectralds.io import check_output_path

# Training state that belongs to the STU run and names its parameters: not carried to the new model.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # links and other spellings of one file included
    return Path(a).resolve() == Path(b).resolve()


def distill_main(argv: list[str]) -> None:
    """Entry point of the `distill` subcommand (argv without the subcommand name)."""
    from spectralds.checkpoint_io import AtomicCheckpointIO, load_model, read_checkpoint
    from spectralds.distill.prune import DEFAULT_METHOD, check_ratio, prune_lds_layers, pruning_table
    from spectralds.distill.swap import (
        DEFAULT_MAX_FIT_ERROR,
        STATE_DIM_RULE,
        distill_stu_layers,
        distillation_table,
        layer_fit,
    )
    from spectralds.layers import layer_specs

    p = CommandParser(
        "spectralds distill",
        "Swap every STU layer of a checkpoint's model for its fitted LDS layer (measured against the STU, as "
        "STUToLDSDistillation does at the end of training), optionally LAST-prune it, and save the model.",
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint of a model holding STU layers")
    p.add_argument("--out", required=True, help="the distilled checkpoint to write (not --ckpt)")
    p.add_argument("--state-dim", type=int, default=None, help=f"LDS states (None: {STATE_DIM_RULE})")
    p.add_argument("--max-fit-error", type=float, default=DEFAULT_MAX_FIT_ERROR,
                   help="refuse when a layer's measured relative MSE vs its STU is above this")
    p.add_argument("--prune", type=float, default=None, metavar="RATIO",
                   help=f"then prune this fraction of the LDS states ({DEFAULT_METHOD}, as "
                   "LayerAdaptiveStatePruning); None: no pruning")
    a = p.parse_args(argv)
    # Every argument and the output path are checked before the checkpoint is read.
    if a.state_dim is not None:
        check_int("--state-dim", a.state_dim, minimum=2)
    check_float("--max-fit-error", a.max_fit_error, minimum=0.0, strict=True)
    if a.prune is not None:
        check_ratio("--prune", a.prune)
    check_output_path(a.out, make_parents=True)
    if _same_file(a.out, a.ckpt):
        raise UserError(f"refusing to write {a.out}: it is the input checkpoint --ckpt")

    checkpoint = read_checkpoint(a.ckpt)
    model = load_model(a.ckpt, checkpoint=checkpoint)  # refuses NaN/Inf weights
    reports, _ = distill_stu_layers(model, lambda stu: layer_fit(stu, a.state_dim), a.max_fit_error)
    print(distillation_table(reports))
    if a.prune is not None:
        print(pruning_table(prune_lds_layers(model, a.prune, DEFAULT_METHOD), DEFAULT_METHOD, a.prune))
    out = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
    out["state_dict"] = model.state_dict()
    out["spectralds_layers"] = layer_specs(model)  # how load_model rebuilds the LDS layers
    AtomicCheckpointIO().save_checkpoint(out, a.out)  # atomic; refuses NaN/Inf
    print(f"saved the {'pruned ' if a.prune is not None else 'distilled '}LDS model to {a.out}")
