"""Time and peak memory of `spectralds import-model` on a full-size source.

Builds a random source state dict of the released SpectraLDS language model's config (the paper code's
format: dim 896, 12 STU-T layers, MLP x12, vocab 200064, seq_len 8192, K 24: 536.0M parameters, 356.7M
without the embedding; the paper calls its models "340M") as one safetensors file in a scratch
directory, with its filter bank as an .npy (in eigh order, some signs flipped, as the paper's own file
is), then runs the import command in a fresh process and prints its wall time and peak RSS (the
process's ru_maxrss) next to the size of the weights and the RSS of a process that only imports
spectralds. Nothing is timed inside the test suite.

    python tools/bench_import.py [--dir /tmp/bench_import] [--dtype float32|bfloat16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = {"dim": 896, "num_heads": 8, "num_layers": 12, "seq_len": 8192, "weight_tying": True,
          "window_size": 1024, "vocab_size": 200064, "mlp_scale": 12, "bias": False, "dropout": 0.1,
          "num_eigh": 24, "use_hankel_L": False, "use_approx": True, "use_attn": False, "softcap": 50.0,
          "theta": 10000.0, "use_alibi": False}


def build_source(directory: Path, dtype: torch.dtype) -> tuple[Path, Path, int]:
    """(weights file, filter file, bytes of weights): random weights under the paper code's keys."""
    from safetensors.torch import save_file

    from spectralds.filters import spectral_filters

    g = torch.Generator().manual_seed(0)
    d, v, h, k = CONFIG["dim"], CONFIG["vocab_size"], CONFIG["dim"] * CONFIG["mlp_scale"], CONFIG["num_eigh"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dtype)

    sd = {"tok_emb.weight": rnd(v, d), "norm.weight": torch.ones(d, dtype=dtype)}
    for i in range(CONFIG["num_layers"]):
        p = f"layers.{i}"
        ones = torch.ones(d, dtype=dtype)
        sd |= {f"{p}.stu_norm.weight": ones, f"{p}.mlp_norm.weight": ones.clone(),
               f"{p}.mlp.gate_proj.weight": rnd(h, d), f"{p}.mlp.up_proj.weight": rnd(h, d),
               f"{p}.mlp.down_proj.weight": rnd(d, h), f"{p}.stu.M_inputs": rnd(d, d),
               f"{p}.stu.M_filters": rnd(k, d)}
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    save_file(sd, str(weights))
    nbytes = sum(t.nbytes for t in sd.values())
    del sd
    config = {**CONFIG, "torch_dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config))
    bank = spectral_filters(CONFIG["seq_len"], k).flip(1).clone()  # eigh's ascending order
    bank[:, ::4] *= -1  # and other signs than ours
    np.save(directory / "spectral_filters.npy", bank.numpy())
    return weights, directory / "spectral_filters.npy", nbytes


# The child reports its own VmHWM (peak RSS, reset by exec): a child's ru_maxrss would include the
# pages it shared with this process at fork time.
_CHILD = """import atexit, runpy, sys
hwm = lambda: open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
atexit.register(lambda: sys.stderr.write("VmHWM " + hwm()))
sys.argv = sys.argv[1:]
{body}
"""


def run(args: list[str], module: bool = True) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of a fresh Python process running `spectralds args`
    (module) or only importing spectralds."""
    body = "runpy.run_module('spectralds', run_name='__main__')" if module else "import spectralds.cli"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(body=body), "spectralds", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"spectralds {' '.join(args)} failed:\n{proc.stderr}")
    peak_kib = int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0])
    return wall, peak_kib / 2**20, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/bench_import", help="scratch directory (source and output)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = p.parse_args()
    directory = Path(a.dir)
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    t0 = time.perf_counter()
    weights, bank, nbytes = build_source(directory / "src", getattr(torch, a.dtype))
    print(f"source: {weights} ({nbytes / 2**30:.2f} GiB of {a.dtype} weights), built in "
          f"{time.perf_counter() - t0:.0f} s")
    _, base_rss, _ = run([], module=False)
    out = directory / "imported.ckpt"
    wall, peak, stdout = run(["import-model", str(weights), "--out", str(out), "--filters", str(bank),
                              "--tokenizer", "byte"])
    print(stdout.strip())
    ratio = peak * 2**30 / nbytes
    print(f"\nimport-model: {wall:.1f} s wall, peak RSS {peak:.2f} GiB = {ratio:.2f}x the weights "
          f"({nbytes / 2**30:.2f} GiB; a process that only imports spectralds: {base_rss:.2f} GiB); "
          f"checkpoint {out.stat().st_size / 2**30:.2f} GiB; {env_note}")
    if not a.keep:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
