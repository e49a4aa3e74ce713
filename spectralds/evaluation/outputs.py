"""Where `spectralds eval` writes, checked before the evaluation: nothing of the user's is overwritten.

- `--output R.json` gets its markdown table beside it as R.md (the stem of --output: two evaluations
  into one folder keep their own reports). R.md is replaced only when it is missing or was written by
  `spectralds eval` (its first line is REPORT_MARK); any other file there is refused, and so is an
  --output ending in .md (the JSON and the report would be one file).
- No output is an input: a checkpoint, the tokenizer (--tokenizer or the one a checkpoint names), a
  task file of --include-path (`task_files`); compared after resolving symlinks, and by inode (hard links).
- `--log-dir` gets one TensorBoard run folder per label, named by `run_name`: never ".." or a path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from spectralds.errors import UserError
from spectralds.io import check_output_path, same_file

REPORT_MARK = "<!-- written by spectralds eval -->"


def report_path(json_path: str | os.PathLike) -> Path:
    """The markdown report of an --output JSON: same folder and stem, suffix .md."""
    return Path(json_path).with_suffix(".md")


def run_name(label: str) -> str:
    """A label as one folder name: letters, digits, - _ . kept, anything else "_", never "." or ".."."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return name if name.strip(".") else "_" * max(len(name), 1)


def eval_inputs(
    ckpts: Sequence[str], tokenizer: str | None, include_path: str | None
) -> list[tuple[str, Path]]:
    """(what, path) of every local file the evaluation reads that an output could alias."""
    from spectralds.checkpoint_io import read_checkpoint, tokenizer_spec

    inputs = [(f"checkpoint {c}", Path(c)) for c in ckpts if Path(c).is_file()]
    specs = [tokenizer] if tokenizer else []
    for _, path in list(inputs):  # mmap: the tokenizer path only, not the weights
        try:
            specs.append(tokenizer_spec(read_checkpoint(path, mmap=True)))
        except UserError:  # unreadable, or a legacy file mmap cannot open: the evaluation's own load says
            continue
    inputs += [(f"tokenizer {s}", Path(s)) for s in specs if s and Path(s).is_file()]
    if include_path and Path(include_path).is_dir():
        inputs += [(f"task file {p}", p) for p in task_files(Path(include_path))]
    return inputs


def task_files(folder: Path) -> list[Path]:
    """The files of a task folder lm-eval reads: its YAMLs, Python files, and every file a YAML names
    (data files); not an earlier run's results.json that happens to lie there."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    code = [p for p in files if p.suffix in (".yaml", ".yml", ".py")]
    texts = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in code if p.suffix != ".py")
    return code + [p for p in files if p not in code and p.name in texts]


def _not_an_input(option: str, path: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    for what, source in inputs:
        if same_file(path, source):
            raise UserError(f"{option} {path} is the {what} this evaluation reads; write elsewhere")


def check_eval_outputs(
    output: str | None, log_dir: str | None, labels: Sequence[str], inputs: Sequence[tuple[str, Path]]
) -> None:
    """Every rule of this module's docstring, before any work; one UserError naming the first broken."""
    if output is not None:
        json_path, report = Path(output), report_path(output)
        if json_path.suffix.lower() == ".md":
            raise UserError(f"--output {output} ends in .md, the name of its markdown report: give the "
                            "JSON another suffix (results.json: the report goes to results.md)")
        _not_an_input("--output", json_path, inputs)
        _not_an_input(f"the report of --output ({report})", report, inputs)
        if report.is_file() and not _written_by_us(report):
            raise UserError(f"refusing to overwrite {report} (the report of --output {output}): it was not "
                            "written by spectralds eval; move it or choose another --output name")
    if log_dir is not None:
        _check_log_dir(Path(log_dir), output, labels, inputs)
    if output is not None:  # last: it creates the folder of --output, once nothing else is refused
        check_output_path(output, make_parents=True)
        check_output_path(report_path(output))


def _check_log_dir(
    root: Path, output: str | None, labels: Sequence[str], inputs: Sequence[tuple[str, Path]]
) -> None:
    log_dir = str(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--log-dir {log_dir} exists and is not a directory")
    ancestor = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UserError(f"cannot write --log-dir {log_dir}: {ancestor} is not a writable directory")
    names = [run_name(label) for label in labels]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"labels {', '.join(labels)} give the same TensorBoard run folder {clash[0]}; "
                        "pass --label names that differ in letters or digits")
    for folder in [root, *(root / n for n in names)]:
        _not_an_input("--log-dir", folder, inputs)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"cannot log to {folder}: it exists and is not a directory")
        if output is not None and (same_file(folder, Path(output)) or same_file(folder, report_path(output))):
            raise UserError(f"--log-dir {log_dir} and --output {output} name the same place")


def _written_by_us(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(REPORT_MARK.encode())) == REPORT_MARK.encode()
