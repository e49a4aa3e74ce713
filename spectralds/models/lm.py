"""Language models: Flash STU (all STU or STU/attention hybrid), Transformer, and distilled LDS.

All three are the same module with a different `layer_pattern`; a distilled model is an STU model
whose mixers were swapped for "lds" layers (by `spectralds.callbacks.STUToLDSDistillation`).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from spectralds.errors import UserError, UserTypeError, check_bool, check_float, check_int
from spectralds.filters import MAX_SEQ_LEN
from spectralds.layers.blocks import RMSNorm
from spectralds.layers.registry import SequenceLayer, check_continuation, check_start
from spectralds.models.common import (
    SpectralModule,
    build_blocks,
    check_nonfinite_policy,
    default_optimizer,
    guard_loss,
)


def _check_config(vocab_size, dim, num_layers, layer_pattern, seq_len, mlp_ratio, layer_kwargs) -> None:
    """Clear errors for malformed arguments, before any of them reaches a torch constructor."""
    for name, value in (("vocab_size", vocab_size), ("dim", dim), ("seq_len", seq_len)):
        check_int(name, value)
    check_int("num_layers", num_layers, minimum=0)
    names_ok = isinstance(layer_pattern, Sequence) and not isinstance(layer_pattern, str)
    if layer_pattern is not None and not (names_ok and all(isinstance(n, str) for n in layer_pattern)):
        raise UserTypeError(f"layer_pattern must be a list of layer names, got {layer_pattern!r}")
    ratio_ok = isinstance(mlp_ratio, numbers.Real) and not isinstance(mlp_ratio, bool)
    if not (ratio_ok and 0 <= mlp_ratio < math.inf):
        raise UserError(f"mlp_ratio must be a finite number >= 0 (0: no MLP), got {mlp_ratio!r}")
    if layer_kwargs is not None and not (
        isinstance(layer_kwargs, Mapping) and all(isinstance(v, Mapping) for v in layer_kwargs.values())
    ):
        raise UserTypeError(f"layer_kwargs must map layer names to keyword dicts, got {layer_kwargs!r}")
    check_int("seq_len", seq_len, maximum=MAX_SEQ_LEN)
    # A mistyped size (dim=99999999999) fails in the allocator with a traceback, or fills memory layer
    # by layer: a lower bound of the parameters (embedding, two MLP matrices a layer) against the memory.
    params = vocab_size * dim + num_layers * 2 * int(mlp_ratio * dim) * dim
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > memory:
        raise UserError(f"vocab_size={vocab_size}, dim={dim}, num_layers={num_layers} make at least "
                        f"{params:,} parameters ({4 * params / 2**30:,.0f} GiB in float32), more than this "
                        f"machine's {memory / 2**30:,.0f} GiB of memory")


class LanguageModel(SpectralModule):
    """Decoder-only LM: embedding -> pre-norm blocks (mixer + SwiGLU MLP) -> RMSNorm -> tied head.

    Architecture options (defaults: this project's own): mlp_activation "silu" or "gelu_tanh" (the gate
    of the Flash STU references), mlp_bias / head_bias (biases on the MLP's and the head's linears),
    norm_eps None (each RMSNorm takes the machine epsilon of its input's dtype, as torch.nn.RMSNorm does).

    compile: torch.compile each block's forward in place (`nn.Module.compile`: parameter names, and so
    checkpoints, are unchanged; decoding's prefill/step stay eager). The first step pays the compile.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 128,
        num_layers: int = 4,
        layer_pattern: list[str] | None = None,
        seq_len: int = 256,
        num_filters: int = 24,
        layer_kwargs: dict[str, dict[str, Any]] | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        norm_eps: float | None = 1e-6,
        mlp_activation: str = "silu",
        mlp_bias: bool = False,
        head_bias: bool = False,
        nonfinite_loss: str = "stop",
        compile: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_nonfinite_policy(nonfinite_loss)
        check_float("dropout", dropout, minimum=0.0, maximum=1.0)  # nn.Dropout's own error is a bare one
        _check_config(vocab_size, dim, num_layers, layer_pattern, seq_len, mlp_ratio, layer_kwargs)
        layer_pattern = ["stu"] if layer_pattern is None else list(layer_pattern)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["layer_pattern"] = layer_pattern
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = build_blocks(
            num_layers, layer_pattern, dim, seq_len, num_filters, layer_kwargs, mlp_ratio,
            norm_eps=norm_eps, dropout=dropout, mlp_activation=mlp_activation, mlp_bias=mlp_bias,
        )
        self.norm = RMSNorm(dim, norm_eps)
        # The bias is the head's own parameter, also when its weight is tied to the embedding.
        self.head = nn.Linear(dim, vocab_size, bias=check_bool("head_bias", head_bias))
        self._init_weights(num_layers)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        if not isinstance(compile, bool):
            raise UserTypeError(f"compile must be true or false, got {compile!r}")
        if compile:
            for block in self.blocks:
                block.compile()
        self.val_nll = torchmetrics.MeanMetric()
        self.test_nll = torchmetrics.MeanMetric()

    def _init_weights(self, num_layers: int) -> None:
        std = self.hparams.dim**-0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            # Residual output projections start smaller so the residual stream grows slowly.
            if name.endswith(("mixer.o_proj", "mlp.w2")):
                module.weight.data.mul_((2 * num_layers) ** -0.5)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if getattr(data, "seq_len", 0) > self.seq_len:
            raise UserError(f"data seq_len {data.seq_len} exceeds the model's seq_len {self.seq_len}")
        if getattr(data, "vocab_size", 0) > self.hparams.vocab_size:
            raise UserError(
                f"the tokenizer has {data.vocab_size} tokens but the model's vocab_size is "
                f"{self.hparams.vocab_size}"
            )

    # ---- forward / decoding -------------------------------------------------------------
    def forward(self, idx: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, T, vocab). start: None, or (batch,) each row's first real token (left padding):
        real positions then equal each row's unpadded run, whatever the padded tokens are."""
        if idx.shape[1] > self.seq_len:
            raise UserError(f"input of {idx.shape[1]} tokens exceeds the model's seq_len {self.seq_len}")
        start = self._start(idx, start)
        x = self.dropout(self.embed(idx))
        for block in self.blocks:
            x = block(x) if start is None else block(x, start)
        return self.head(self.norm(x))

    def prefill(
        self,
        idx: torch.Tensor,
        start: torch.Tensor | None = None,
        states: list[Any] | None = None,
        all_logits: bool = False,
        keep_state: bool = True,
    ) -> tuple[torch.Tensor, list[Any]]:
        """Run a prompt: logits of its last position (batch, vocab) and the per-block decoding states
        (aligned with `decoding_layers()`); start: left padding, as in `forward`.

        states: the states of an earlier `prefill` or `step` of this model (same batch, start=None): idx
        is then a chunk following what they have seen, and the logits and states are those of one
        prefill over prefix + chunk (`SequenceLayer.prefill`; the package's layers leave the states as given).
        all_logits: the logits of every position of idx, (batch, T, vocab), instead of the last one's:
        what scoring a continuation needs (its tokens' log-probabilities) from one pass; continuations of
        different lengths may be right-padded in one batch (every layer is causal: padding changes no
        earlier position, only the states after it). Chunk by chunk, a long prompt's activations stay
        those of a chunk; the states are the layers' own (an STU's spans seq_len, an LDS's is fixed).
        keep_state=False (with `states`): only the logits are wanted; a layer may skip building its state
        and return None in its place (`SequenceLayer.prefill`).
        """
        start = self._start(idx, start)
        if states is not None:
            check_continuation(start, states, idx.shape[0], None)  # each layer checks the batch
            if not isinstance(states, (list, tuple)) or len(states) != len(self.blocks):
                got = f"{len(states)} states" if isinstance(states, (list, tuple)) else type(states).__name__
                raise UserError(f"states must list one state per block ({len(self.blocks)}), got {got}")
        if idx.shape[1] == 0:
            raise UserError("a prefill needs at least one token")
        x = self.embed(idx)
        new_states = []
        for i, block in enumerate(self.blocks):
            if states is None:
                x, state = block.prefill(x, start)
            else:
                x, state = block.prefill(x, state=states[i], keep_state=keep_state)
            new_states.append(state)
        return self.head(self.norm(x if all_logits else x[:, -1])), new_states

    def _start(self, idx: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor | None:
        if idx.dim() != 2:
            raise UserError(f"token ids must be (batch, tokens), got shape {tuple(idx.shape)}")
        check_start(start, idx.shape[0], idx.shape[1])
        return None if start is None else start.to(idx.device)

    def decoding_layers(self) -> list[SequenceLayer]:
        """The sequence layer behind each decoding state, in the order `prefill` / `step` use them."""
        return [block.mixer for block in self.blocks]

    def step(self, token: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        x = self.embed(token)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.step(x, state)
            new_states.append(state)
        return self.head(self.norm(x)), new_states

    # ---- training -----------------------------------------------------------------------
    def _nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._nll(batch).mean()
        if not guard_loss(self, loss, self.hparams.nonfinite_loss):
            return self.skip_step()  # every rank skips this step (a None return is refused under DDP)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        nll = self._nll(batch)
        self.val_nll.update(nll)  # token-weighted mean, reduced across ranks by torchmetrics

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=False)
        self.val_nll.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.test_nll.update(self._nll(batch))

    def on_test_epoch_end(self) -> None:
        loss = self.test_nll.compute()
        self.log_dict({"test/loss": loss, "test/ppl": loss.exp()})
        self.test_nll.reset()
