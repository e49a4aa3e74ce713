"""The final weights of a fit, saved where the run keeps `last.ckpt`, before any callback changes the layers.

Lightning's ModelCheckpoint saves on its intervals: a run whose max_steps is not a multiple of
every_n_train_steps ends after its last save (the tiny config at 5 steps with every 2 kept step 4), and
its own end-of-training save comes after every other callback, so after a distillation had swapped the
layers. `save_final_weights` is called at the start of the end of training (by the first layer-changing
callback, and by the CLI's SaveOnSignal for runs without one): `last.ckpt` then holds the trained model
at the true last step, the model `lds.ckpt` was distilled from.
"""

from __future__ import annotations

import os
import weakref

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from spectralds.compat import checkpoint_step_saved, save_last_checkpoint

# trainer -> (global step, paths) of its final save: the run's SIGTERM report names them.
_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_path(checkpoint: ModelCheckpoint) -> str:
    """Where a ModelCheckpoint without a last checkpoint of its own gets `last.ckpt` (as on SIGTERM)."""
    return os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)


def save_final_weights(trainer: L.Trainer) -> list[str]:
    """Save the model as it is now as each ModelCheckpoint's last checkpoint (the first one's last.ckpt
    when none keeps a last checkpoint), unless already saved at this global step; returns the paths.
    Nothing when checkpointing is off or in a run that is not fitting."""
    step = trainer.global_step
    done = _SAVED.get(trainer)
    if done is not None and done[0] == step:
        return done[1]
    if trainer.state.fn != "fit" or trainer.fast_dev_run:
        return []
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    paths = []
    for checkpoint in checkpoints:
        if not checkpoint.save_last:
            continue
        if checkpoint_step_saved(checkpoint) != step or not checkpoint.last_model_path:
            save_last_checkpoint(checkpoint, trainer)
        paths.append(checkpoint.last_model_path)
    if checkpoints and not paths:
        path = last_path(checkpoints[0])
        trainer.save_checkpoint(path, weights_only=False)  # a full resume point, as on SIGTERM
        paths.append(path)
    _SAVED[trainer] = (step, paths)
    return paths


def final_weights_saved(trainer: L.Trainer) -> list[str]:
    """The paths `save_final_weights` wrote at the trainer's current global step (none: [])."""
    done = _SAVED.get(trainer)
    return done[1] if done is not None and done[0] == trainer.global_step else []
