"""Helpers shared by the benchmark tools: machine description, timing, memory, tables, JSON and plots."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark shares."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the records to this path")
    parser.add_argument("--plot", default=None, help="write a PNG plot to this path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply threads/seed, check the device, print the machine; returns the device."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info(args.device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return torch.device(args.device)


def machine_info(device: str) -> dict[str, Any]:
    """CPU model or GPU name, torch version and threads: enough to tell two benchmark runs apart."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info.update(torch=torch.__version__, python=platform.python_version())
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs, after `warmup` untimed runs (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensor_bytes(obj: Any) -> int:
    """Bytes held by every tensor reachable from obj (tensors, dataclasses, tuples, lists, dicts).

    Tensors sharing a storage are counted once, with the whole storage.
    """
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(obj)
    return sum(seen.values())


class PeakMemory:
    """Peak memory growth (MB) inside a `with` block.

    CUDA: torch.cuda.max_memory_allocated minus the allocation at entry. CPU: the highest resident set
    size seen by a thread sampling /proc/self/statm every `interval` seconds (and at entry/exit), minus
    the RSS at entry; where /proc is missing, the growth of the process's max RSS (getrusage). Freed heap
    pages are handed back to the OS at entry (glibc malloc_trim), else the block would reuse them unseen.
    """

    def __init__(self, device: torch.device, interval: float = 1e-3) -> None:
        self.device, self.interval = device, interval
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif _rss_bytes() is not None:
            _release_free_memory()
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._base = _max_rss_bytes()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        else:
            peak = _max_rss_bytes()
        self.mb = max(0, peak - self._base) / 2**20


def _release_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then miss memory the block reuses
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def format_table(rows: Iterable[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; columns are (header, key, format spec); None/missing prints '-'."""
    rows = list(rows)
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], spec) for _, k, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:  # first column left-aligned, the numbers right-aligned
        pairs = enumerate(zip(r, widths, strict=True))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(padded))
    return "\n".join(lines)


def write_json(path: str, records: list[dict], args: argparse.Namespace) -> None:
    """{"machine": ..., "args": ..., "records": [...]}: the records plus what produced them."""
    payload = {"machine": machine_info(args.device), "args": vars(args), "records": records}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"records written to {path}")


def plot_panels(path: str, panels: list[dict], records: list[dict], group: str, title: str) -> None:
    """One log-log line per `group` value in each panel; a panel is {"x": key, "y": key, "ylabel": str}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name in dict.fromkeys(r[group] for r in records):  # first-seen order
            pts = [(r[panel["x"]], r[panel["y"]]) for r in records if r[group] == name and r.get(panel["y"])]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel=panel["x"], ylabel=panel["ylabel"])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def save_figure(fig, path: str) -> None:  # noqa: ANN001 - a matplotlib Figure
    """Lay out and write a tool's figure (its folder created)."""
    from pathlib import Path

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def emit(result: dict, text: str, json_path: str | None, plot_path: str | None,
         plot: Callable[[dict, str], None]) -> None:
    """What a tool ends with: print its table, write its JSON record and its plot when asked."""
    from pathlib import Path

    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plot_path:
        plot(result, plot_path)
