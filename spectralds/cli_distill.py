"""`spectralds distill`: a trained or imported checkpoint -> its distilled (optionally pruned) LDS checkpoint,
without training, through the code `STUToLDSDistillation` and `LayerAdaptiveStatePruning` run."""

from __future__ import annotations

from spectralds.cli_signature import library_defaults
from spectralds.distill.prune import DEFAULT_METHOD
from spectralds.distill.swap import (
    STATE_DIM_RULE,  # noqa: F401  (named in a help text)
    distill_stu_layers,
    layer_fit,
)
from spectralds.errors import UserError, check_float, check_int
from spectralds.io import check_output_path, same_file

# Training state that belongs to the STU run and names its parameters: not carried to the new model.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


LAYER_FIT_DEFAULTS = library_defaults(layer_fit)
DISTILL_DEFAULTS = library_defaults(distill_stu_layers)


def distill(
    *,
    ckpt: str,
    out: str,
    state_dim: int | None = LAYER_FIT_DEFAULTS["state_dim"],
    max_fit_error: float = DISTILL_DEFAULTS["max_fit_error"],
    prune: float | None = None,
) -> None:
    """Swap every STU layer of a checkpoint's model for its fitted LDS layer (measured against the STU, as
    STUToLDSDistillation does at the end of training), optionally LAST-prune it, and save the model.

    Args:
        ckpt: a checkpoint of a model holding STU layers
        out: the distilled checkpoint to write (not --ckpt)
        state_dim: LDS states (None: {STATE_DIM_RULE})
        max_fit_error: refuse when a layer's measured relative MSE (vs its STU, or of its float32 decoding vs
            its forward) is above this
        prune: then prune this fraction of the LDS states ({DEFAULT_METHOD}, as LayerAdaptiveStatePruning);
            None: no pruning
    """
    from spectralds.checkpoint_io import AtomicCheckpointIO, load_model, read_checkpoint
    from spectralds.distill.prune import check_ratio, prune_lds_layers, pruning_table
    from spectralds.distill.swap import distillation_table
    from spectralds.layers import layer_specs

    # Every argument and the output path are checked before the checkpoint is read.
    if state_dim is not None:
        check_int("--state-dim", state_dim, minimum=2)
    check_float("--max-fit-error", max_fit_error, minimum=0.0, strict=True)
    if prune is not None:
        check_ratio("--prune", prune)
    check_output_path(out, make_parents=True)
    if same_file(out, ckpt):
        raise UserError(f"refusing to write {out}: it is the input checkpoint --ckpt")

    checkpoint = read_checkpoint(ckpt)
    model = load_model(ckpt, checkpoint=checkpoint)  # refuses NaN/Inf weights
    reports, _ = distill_stu_layers(model, lambda stu: layer_fit(stu, state_dim), max_fit_error)
    print(distillation_table(reports))
    if prune is not None:
        print(pruning_table(prune_lds_layers(model, prune, DEFAULT_METHOD), DEFAULT_METHOD, prune))
    saved = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
    saved["state_dict"] = model.state_dict()
    saved["spectralds_layers"] = layer_specs(model)  # how load_model rebuilds the LDS layers
    AtomicCheckpointIO().save_checkpoint(saved, out)  # atomic; refuses NaN/Inf
    print(f"saved the {'pruned ' if prune is not None else 'distilled '}LDS model to {out}")
