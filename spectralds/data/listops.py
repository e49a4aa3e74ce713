"""ListOps as Long Range Arena generated it (Tay et al., 2020; the task of Nangia & Bowman, 2018), offline.

An expression is a tree of operators over single digits, written in prefix form with a closing bracket:
``[MAX 2 9 [MIN 4 7 ] 0 ]`` evaluates to 9. Ten classes (the value, 0-9). LRA's generator:

* operators MAX, MIN, MED (the median of the arguments, rounded down), SM (sum modulo 10);
* a node at depth < max_depth (10) is an operator with probability 0.25, else a digit drawn uniformly;
  a node at max_depth is a digit. An operator takes 2 to max_args (10) arguments, uniformly;
* trees are drawn until enough distinct ones have min_length < length < max_length tokens (500 and 2000
  in LRA; the length counts digits, operators and closing brackets), then split into train / validation /
  test in the order drawn (LRA: 96,000 / 2,000 / 2,000).

Random draws are made in the order LRA's generator makes them, with Python's `random.Random(seed)`; a
tree is abandoned as soon as it reaches max_length tokens (LRA rejects it after drawing it whole), so
the accepted trees have LRA's distribution but the stream of draws is not LRA's.
Tokens are those of the S4 / S5 pipelines LAST used: LRA's string with its parentheses removed and ``]``
kept as a token, then an end-of-sequence token; ids from the fixed vocabulary `VOCAB` (``<pad>`` is 0).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from spectralds.errors import UserError, check_int

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # LRA's order (its random.choice draws index into it)
END = "]"
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
VOCAB = (PAD, UNK, EOS, *(str(d) for d in range(10)), *OPERATORS, END)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10
OPERATOR_PROBABILITY = 0.25  # LRA's VALUE_P: a node is a digit when random() > 0.25
MAX_DEPTH, MAX_ARGS = 10, 10  # LRA's limits


class _TooLong(Exception):
    """A tree grew past the length limit: it would be rejected, so its generation stops early."""


def random_tree(rng: random.Random, max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS,
                limit: int | None = None):
    """A digit (int) or (operator, [arguments]), drawn as LRA draws it (the root at depth 1).

    With `limit`, generation stops (raising `_TooLong`) once the tree has `limit` tokens: a tree that
    long is rejected anyway, so the accepted trees keep LRA's distribution (the supercritical branching
    makes most draws huge: without the cut, lengths 100-300 take 10x longer to generate).
    """
    size = [0]

    def node(depth: int):
        r = rng.random() if depth < max_depth else 1.0
        if r > OPERATOR_PROBABILITY:
            size[0] += 1
            return rng.choice(range(10))
        size[0] += 2  # the operator and its closing bracket
        if limit is not None and size[0] >= limit:
            raise _TooLong
        count = rng.randint(2, max_args)
        args = [node(depth + 1) for _ in range(count)]
        return rng.choice(OPERATORS), args  # LRA draws the operator after its arguments

    return node(1)


def evaluate(tree) -> int:
    """The value of a tree (its class)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = sorted(evaluate(a) for a in args)
    if op == "[MIN":
        return values[0]
    if op == "[MAX":
        return values[-1]
    if op == "[MED":  # LRA: int(np.median(values)); the mean of the two middle values, rounded down
        n = len(values)
        return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) // 2
    return sum(values) % 10


def tree_tokens(tree) -> list[str]:
    """Prefix form, ``]`` closing each operator (LRA's string without its parentheses)."""
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    return [op, *(t for a in args for t in tree_tokens(a)), END]


def to_string(tree) -> str:
    return " ".join(tree_tokens(tree))


def generate(num: int, min_length: int, max_length: int, seed: int, max_depth: int = MAX_DEPTH,
             max_args: int = MAX_ARGS) -> list[tuple[list[str], int]]:
    """`num` distinct expressions (tokens, value) with min_length < len(tokens) < max_length, in the order
    drawn from `random.Random(seed)` (LRA keeps them in a set, so its duplicates are dropped too)."""
    rng, seen, out = random.Random(seed), set(), []
    draws = 0
    while len(out) < num:
        draws += 1
        if draws > 1000 * num + 100000:
            raise UserError(f"ListOps: found only {len(out)} of {num} expressions with {min_length} < "
                            f"length < {max_length} in {draws} draws; widen the length range")
        try:
            tree = random_tree(rng, max_depth, max_args, limit=max_length)
        except _TooLong:
            continue
        tokens = tree_tokens(tree)
        key = " ".join(tokens)
        if min_length < len(tokens) < max_length and key not in seen:
            seen.add(key)
            out.append((tokens, evaluate(tree)))
    return out


def encode(tokens: Sequence[str]) -> torch.Tensor:
    """Token ids with the end-of-sequence token appended (unknown tokens map to ``<unk>``)."""
    return torch.tensor([TOKEN_ID.get(t, TOKEN_ID[UNK]) for t in tokens] + [TOKEN_ID[EOS]], dtype=torch.long)


class ListOpsDataset(Dataset):
    def __init__(self, examples: list[tuple[list[str], int]]) -> None:
        self.ids = [encode(tokens) for tokens, _ in examples]
        self.labels = [label for _, label in examples]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.ids[index], self.labels[index]


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with <pad> to the longest in the batch, lengths (B,), labels (B,))."""
    lengths = torch.tensor([ids.numel() for ids, _ in items])
    ids = torch.full((len(items), int(lengths.max())), TOKEN_ID[PAD], dtype=torch.long)
    for row, (seq, _) in enumerate(items):
        ids[row, : seq.numel()] = seq
    return ids, lengths, torch.tensor([label for _, label in items])


class ListOpsDataModule(L.LightningDataModule):
    """ListOps batches ``(ids, lengths, labels)`` (see `collate`); fixed splits drawn from `seed`.

    Args:
        seq_len: LRA's max_length: every expression has fewer tokens, so with the end token a sequence
            has at most seq_len (LRA: 2000; the model's seq_len too, set by the CLI).
        min_length: expressions have more tokens than this (LRA: 500).
        num_train, num_val, num_test: split sizes (LRA: 96,000 / 2,000 / 2,000).
        max_depth, max_args: LRA's 10 and 10.
    """

    def __init__(self, seq_len: int = 2000, min_length: int = 500, num_train: int = 96000,
                 num_val: int = 2000, num_test: int = 2000, batch_size: int = 32, seed: int = 0,
                 max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("num_train", num_train), ("num_val", num_val),
                            ("num_test", num_test), ("batch_size", batch_size), ("max_depth", max_depth)):
            check_int(name, value)
        check_int("min_length", min_length, minimum=0)
        check_int("max_args", max_args, minimum=2)
        if min_length + 2 >= seq_len:
            raise UserError(f"min_length ({min_length}) must be below seq_len - 2 ({seq_len - 2}): "
                            "no length lies strictly between them")
        self.save_hyperparameters(logger=False)
        self.seq_len, self.min_length, self.batch_size, self.seed = seq_len, min_length, batch_size, seed
        self.vocab_size, self.num_classes = len(VOCAB), NUM_CLASSES
        self.splits: dict[str, ListOpsDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        examples = generate(hp.num_train + hp.num_val + hp.num_test, self.min_length, self.seq_len,
                            self.seed, hp.max_depth, hp.max_args)
        bounds = {"train": (0, hp.num_train), "val": (hp.num_train, hp.num_train + hp.num_val),
                  "test": (hp.num_train + hp.num_val, len(examples))}
        self.splits = {name: ListOpsDataset(examples[a:b]) for name, (a, b) in bounds.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            raise RuntimeError("call setup() before asking ListOpsDataModule for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          generator=generator, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
