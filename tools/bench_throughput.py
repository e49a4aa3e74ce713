"""Training throughput benchmark: tokens/s (forward + backward) of single layers and small models (issue 7.2).

    python tools/bench_throughput.py                               # CPU defaults: seq 1k and 4k, dim 64
    python tools/bench_throughput.py --device cuda --dtype bfloat16 --json tp.json --plot tp.png
    python tools/bench_throughput.py --configs stu lds model-stu --seq-lens 8192 --batch 4

Configs: the layers stu, stu_t, attn (full causal), attn-window; LDS layers in the mode of the layer
they replace: lds / lds-t (learnable, exact / tensordot, --lds-states random states, by default as many
as the fitted ones) and lds-fit / lds-fit-t (a fixed system fitted to the filters, --lds-fit-states
states, converted from an STU / STU-T
with its projections; the fit comes from the distillation cache, computed once). Their "vs" column is
tokens/s over the replaced layer's (stu or stu_t, when it ran at that length). LanguageModels model-stu
(all STU), model-hybrid (STU / windowed attention), model-flash (STU-T / windowed attention, the
Flash STU arrangement), model-transformer (full attention), model-lds.
One timed training step = forward, a scalar loss (mean square for a layer, cross-entropy on random
tokens for a model), backward; no optimizer step. ms/step is the median over --repeats rounds after
--warmup untimed steps (CUDA synchronized); a round times every config of one length once, so a load
change on a shared machine slows all of them alike; tokens/s = batch * seq / that median. CPU ms is
the median process CPU time of a step (steadier than wall time on a loaded machine; with --threads 1
the two agree on an idle one); on CPU the "vs" ratio uses CPU time. --compile runs the model-* configs with
LanguageModel(compile=True) (torch.compile of the blocks; its warm-up step compiles).

FLOPs (--flops, on by default on CUDA): the matmul FLOPs torch.utils.flop_counter sees in one step
(FFTs and elementwise ops are not counted), with attention's score and value products counted
analytically instead, over the query-key pairs the causal window really uses (forward 4 * dim per
pair, backward twice that). MFU = FLOPs / time / peak, the peak from --peak-tflops or a small table
of GPUs (dense bf16 / fp32 tensor-core figures). peak MB: CUDA max_memory_allocated; CPU: sampled RSS
growth over the first step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _bench_common import (
    PeakMemory,
    add_common_args,
    format_table,
    plot_panels,
    setup,
    synchronize,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode

from spectralds.layers import build_layer
from spectralds.layers.attention import SlidingWindowAttention
from spectralds.layers.lds import LDS
from spectralds.layers.stu import STU
from spectralds.ops.costs import LDS_PATHS, STU_PATHS, attention_flops

LAYER_CONFIGS = ("stu", "stu_t", "lds", "lds-t", "lds-fit", "lds-fit-t", "attn", "attn-window")
REPLACES = {"lds": "stu", "lds-fit": "stu", "lds-t": "stu_t", "lds-fit-t": "stu_t"}  # for the "vs" column
MODEL_CONFIGS = ("model-stu", "model-hybrid", "model-flash", "model-transformer", "model-lds")
# Dense peak TFLOP/s by GPU name fragment (first match wins) and dtype; fp32 is without TF32.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 66.9},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.2},
    "H100": {"bfloat16": 989.4, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
}


def build(config: str, seq_len: int, args: argparse.Namespace) -> torch.nn.Module:
    """A layer or a LanguageModel for `config`, sized by the command line."""
    attn_full = {"num_heads": args.num_heads, "window_size": None}
    attn_window = {"num_heads": args.num_heads, "window_size": args.window}
    if config in ("lds-fit", "lds-fit-t"):
        from spectralds.distill.cache import get_fit
        from spectralds.distill.convert import lds_from_stu

        stu = build_layer(REPLACES[config], dim=args.dim, seq_len=seq_len, num_filters=args.num_filters)
        return lds_from_stu(stu, get_fit(seq_len, args.num_filters, args.lds_fit_states, progress=False))
    lds = {"num_filters": args.num_filters, "state_dim": args.lds_states}
    if config in LAYER_CONFIGS:
        name, kwargs = {
            "stu": ("stu", {"num_filters": args.num_filters}),
            "stu_t": ("stu_t", {"num_filters": args.num_filters}),
            "lds": ("lds", lds),
            "lds-t": ("lds", {**lds, "mode": "tensordot"}),
            "attn": ("attn", attn_full),
            "attn-window": ("attn", attn_window),
        }[config]
        return build_layer(name, dim=args.dim, seq_len=seq_len, **kwargs)
    from spectralds.models.lm import LanguageModel  # imports Lightning: only when a model is asked for

    pattern, attn = {
        "model-stu": (["stu"], attn_full),
        "model-hybrid": (["stu", "attn"], attn_window),
        "model-flash": (["stu_t", "attn"], attn_window),
        "model-transformer": (["attn"], attn_full),
        "model-lds": (["lds"], attn_full),
    }[config]
    return LanguageModel(
        vocab_size=args.vocab_size, dim=args.dim, num_layers=args.num_layers, layer_pattern=pattern,
        seq_len=seq_len, num_filters=args.num_filters, mlp_ratio=args.mlp_ratio,
        layer_kwargs={"attn": attn, "lds": {"state_dim": args.lds_states}}, compile=args.compile,
    )


def training_step(module: torch.nn.Module, config: str, seq_len: int, args, device) -> Callable[[], None]:
    """A closure running one forward + backward on fixed random inputs."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    if config in LAYER_CONFIGS:
        # requires_grad: inside a network every layer also computes the gradient of its input.
        x = torch.randn(args.batch, seq_len, args.dim, device=device, requires_grad=True)

        def loss() -> torch.Tensor:
            return module(x).float().square().mean()
    else:
        ids = torch.randint(args.vocab_size, (args.batch, seq_len + 1), device=device)

        def loss() -> torch.Tensor:
            logits = module(ids[:, :-1])
            return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with autocast:
            value = loss()
        value.backward()

    return step


def step_flops(step: Callable[[], None], module: torch.nn.Module, batch: int, seq_len: int) -> int:
    """FLOPs of one training step: counted matmuls plus analytic attention products (module docstring)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    counts = counter.get_flop_counts().get("Global", {})
    # Counted attention kernels assume a dense T x T score matrix: replace them by the exact pair count.
    counted_attention = sum(v for op, v in counts.items() if "attention" in str(op))
    attention = sum(  # forward and a backward of twice its FLOPs
        3 * attention_flops(batch, seq_len, m.dim, m.window_size)
        for m in module.modules() if isinstance(m, SlidingWindowAttention)
    )
    return counter.get_total_flops() - counted_attention + attention


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peaks.get(args.dtype) for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def interleaved_median_times(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU seconds of each step over `repeats` rounds after `warmup` each
    (CUDA synchronized). A round times every step once, so a load change on a shared machine hits
    every config alike rather than whichever ran during it: the "vs" ratios compare like with like.
    On the CPU each timed step follows an untimed one of the same config (memory freed by the previous
    config is otherwise mapped again, page by page, inside the timed step)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {key: [] for key in steps}
    cpu: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            if len(steps) > 1 and device.type == "cpu":  # CUDA's caching allocator keeps its blocks
                fn()  # untimed: the allocator settles after the previous config's tensors were freed
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {key: (statistics.median(wall[key]), statistics.median(cpu[key])) for key in steps}


def prepare(
    config: str, seq_len: int, args: argparse.Namespace, device: torch.device
) -> tuple[dict, Callable[[], None]]:
    """Build `config` at `seq_len`, run its first step under the memory probe, count its FLOPs: the
    record without timings, and the step to time."""
    module = build(config, seq_len, args).to(device).train()
    for layer in module.modules():
        if isinstance(layer, STU):
            layer.conv_path = args.stu_path
        if isinstance(layer, LDS):
            layer.conv_path = args.lds_path
    step = training_step(module, config, seq_len, args, device)
    with PeakMemory(device) as peak:
        step()  # also the first warm-up step
    flops = step_flops(step, module, args.batch, seq_len) if args.flops else None
    return {
        "config": config,
        "seq_len": seq_len,
        "batch": args.batch,
        "gflop_per_step": flops / 1e9 if flops is not None else None,
        "peak_mem_mb": peak.mb,
        "params": sum(p.numel() for p in module.parameters()),
        "device": str(device),
        "dtype": args.dtype,
        "stu_path": args.stu_path,
        "lds_path": args.lds_path,
        "compile": args.compile and config.startswith("model-"),
    }, step


def bench_length(
    configs: list[str], seq_len: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """Every config at one length, timed in interleaved rounds (`interleaved_median_times`)."""
    prepared = {config: prepare(config, seq_len, args, device) for config in configs}
    times = interleaved_median_times({c: step for c, (_, step) in prepared.items()}, args.repeats,
                                     args.warmup, device)
    peak_tf = peak_tflops(args)
    records = []
    for config, (record, _) in prepared.items():
        seconds, cpu_seconds = times[config]
        flops = record["gflop_per_step"] * 1e9 if record["gflop_per_step"] is not None else None
        achieved = flops / seconds / 1e12 if flops is not None else None
        records.append({
            **record,
            "ms_per_step": 1e3 * seconds,
            "cpu_ms_per_step": 1e3 * cpu_seconds if device.type == "cpu" else None,
            "tokens_per_s": args.batch * seq_len / seconds,
            "tflops": achieved,
            "mfu": achieved / peak_tf if achieved is not None and peak_tf else None,
        })
    return records


def add_ratios(records: list[dict]) -> None:
    """vs_replaced: an LDS config's speed over the layer it replaces at the same length (CPU time on CPU)."""
    def step_time(r: dict) -> float:
        return r["cpu_ms_per_step"] or r["ms_per_step"]

    by_key = {(r["config"], r["seq_len"]): r for r in records}
    for r in records:
        parent = by_key.get((REPLACES.get(r["config"]), r["seq_len"]))
        r["vs_replaced"] = step_time(parent) / step_time(r) if parent else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_args(parser)
    parser.add_argument("--configs", nargs="+", default=[*LAYER_CONFIGS, *MODEL_CONFIGS],
                        choices=[*LAYER_CONFIGS, *MODEL_CONFIGS])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--num-filters", type=int, default=None, help="K, the number of spectral filters")
    parser.add_argument("--num-layers", type=int, default=None, help="layers of the model-* configs")
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=1024, help="window of attn-window, model-hybrid")
    parser.add_argument("--lds-states", type=int, default=None,
                        help="states of the learnable lds* configs (default: --lds-fit-states)")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--mlp-ratio", type=float, default=4.0, help="SwiGLU hidden size / dim of the models")
    parser.add_argument("--stu-path", choices=list(STU_PATHS), default="auto",
                        help="pin the STU's sequence arrangement (spectralds.layers.stu.STU.conv_path)")
    parser.add_argument("--lds-path", choices=list(LDS_PATHS), default="auto",
                        help="pin the LDS's training path (spectralds.layers.lds.LDS.conv_path)")
    parser.add_argument("--lds-fit-states", type=int, default=None,
                        help="states of the lds-fit* systems (default 48; 8 with --quick)")
    parser.add_argument("--compile", action="store_true", help="model-* configs with compile=True")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=None,
                        help="count FLOPs and MFU (default: on with CUDA, off on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (TFLOP/s)")
    args = parser.parse_args(argv)
    cuda, quick = args.device == "cuda", args.quick
    defaults = {  # quick / CPU / CUDA
        "seq_lens": [64, 128] if quick else [1024, 4096, 8192] if cuda else [1024, 4096],
        "batch": 1 if quick else 8 if cuda else 1,
        "dim": 16 if quick else 512 if cuda else 64,
        "num_filters": 4 if quick else 24,
        "num_layers": 1 if quick else 4 if cuda else 2,
        "lds_fit_states": 8 if quick else 48,
        "repeats": 1 if quick else 10 if cuda else 3,
        "warmup": 0 if quick else 3 if cuda else 1,
        "flops": cuda,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lds_states is None:
        args.lds_states = args.lds_fit_states
    if min(args.seq_lens) < 1 or min(args.batch, args.dim, args.repeats) < 1 or args.warmup < 0:
        parser.error("sequence lengths, --batch, --dim and --repeats must be positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = setup(args)
    print(f"dim {args.dim}, K {args.num_filters}, batch {args.batch}, models with {args.num_layers} layers, "
          f"{args.dtype}, median of {args.repeats} after {args.warmup} warm-up steps\n", flush=True)
    records = []
    for seq_len in args.seq_lens:
        for r in bench_length(args.configs, seq_len, args, device):
            records.append(r)
            print(f"  {r['config']:18} seq={seq_len:<6} {r['ms_per_step']:9.1f} ms/step "
                  f"{r['tokens_per_s']:10.0f} tokens/s", flush=True)
    records.sort(key=lambda r: args.configs.index(r["config"]))  # stable: lengths stay in order
    add_ratios(records)
    print()
    print(format_table(records, [
        ("config", "config", "s"), ("seq", "seq_len", "d"), ("batch", "batch", "d"),
        ("ms/step", "ms_per_step", ".1f"), ("CPU ms", "cpu_ms_per_step", ".1f"),
        ("tokens/s", "tokens_per_s", ".0f"), ("vs", "vs_replaced", ".2f"),
        ("GFLOP/step", "gflop_per_step", ".2f"), ("TFLOP/s", "tflops", ".3f"), ("MFU", "mfu", ".1%"),
        ("peak MB", "peak_mem_mb", ".0f"), ("params", "params", ",d"),
    ]))
    if args.json:
        write_json(args.json, records, args)
    if args.plot:
        title = f"training fwd+bwd, dim {args.dim}, batch {args.batch}, {args.dtype} on {device}"
        plot_panels(args.plot, [{"x": "seq_len", "y": "tokens_per_s", "ylabel": "tokens / s"}],
                    records, "config", title)
    return records


if __name__ == "__main__":
    main()
