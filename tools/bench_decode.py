"""Decode benchmark: per-token generation time and memory after a prompt of length P (issue 7.1).

    python tools/bench_decode.py                                  # CPU defaults: one layer, dim 32, K 24
    python tools/bench_decode.py --model --num-layers 4           # a whole small LanguageModel instead
    python tools/bench_decode.py --model --batch 1 8 64           # tokens/s of batched decoding
    python tools/bench_decode.py --device cuda --dtype bfloat16 --json decode.json --plot decode.png

Methods: STU with the naive cached convolution (O(t) per token) and with FutureFill, the distilled LDS
(O(1) per token), attention with a full KV cache and with a sliding window; on CUDA also lds-graph, the
LDS step replayed from a CUDA graph (`spectralds.generate.GraphedStep`, what `generate` uses for LDS
models on a GPU; fixed-size states make that possible, the growing STU and attention caches do not).
With --model also lds-attn, the distilled Flash STU (LDS blocks alternating with sliding-window
attention), and on CUDA lds-attn-graph, the same model decoding from one CUDA graph (the window's KV
cache a fixed-size ring buffer, the position a device tensor). For each (method, batch, P):

  1. prefill the prompt once: its wall time is "prefill s";
  2. run --warmup decode steps (untimed);
  3. --repeats times: copy that state, time --new-tokens steps as one block (CUDA synchronized);
     "ms/token" = median block time / new tokens; "tokens/s" = batch / that time (every sequence of
     the batch gets a token per step). Everything runs under torch.inference_mode().

"state MB" is exact: the bytes of every tensor in the decoding state after step 2. "peak MB" is the
memory growth over steps 1-2 (CUDA: max_memory_allocated; CPU: sampled resident set size).
Full attention cannot prefill 64k tokens on a CPU (its O(P^2) prompt pass): above --attn-prefill-max
its KV cache is filled with random keys/values of the right shape instead (prefill "synthetic"); the
decode step costs the same, since it only sees the cache's shape. So is lds-attn's whole state (its LDS
states random too): SDPA's windowed prompt pass on a CPU is the O(P^2) one.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from _bench_common import (
    DTYPES,
    PeakMemory,
    add_common_args,
    format_table,
    plot_panels,
    setup,
    synchronize,
    tensor_bytes,
    write_json,
)

from spectralds.generate import GraphedStep, decode_loop, merge_prefills, set_decode_method
from spectralds.layers import DECODE_METHODS, SequenceLayer, build_layer
from spectralds.layers.attention import KVCache, SlidingWindowAttention

METHODS = ("stu-naive", "stu-futurefill", "lds", "attn-full", "attn-window")
CUDA_METHODS = ("lds-graph",)
HYBRID = ("lds-attn", "lds-attn-graph")  # --model only: LDS and window-attention blocks alternating
LDS_FLATNESS_LIMIT = 1.3  # the LDS step does not depend on t: ms/token at the longest P vs the shortest


def mixer_spec(method: str, args: argparse.Namespace) -> tuple[str, dict, str | None]:
    """A method name -> (registry layer name, its kwargs, STU decode method or None)."""
    if method in ("attn-full", "attn-window"):
        window = None if method == "attn-full" else args.window
        return "attn", {"window_size": window, "num_heads": args.num_heads}, None
    if method in ("lds", "lds-graph"):
        kwargs = {"num_filters": args.num_filters, "state_dim": args.lds_states, "learnable": False}
        return "lds", kwargs, None
    layer, _, decode = method.partition("-")  # "stu-naive", "stu_t-futurefill", ...
    if layer in ("stu", "stu_t") and decode in DECODE_METHODS:
        return layer, {"num_filters": args.num_filters}, decode
    known = ", ".join(METHODS + CUDA_METHODS + HYBRID)
    raise SystemExit(f"error: unknown method {method!r}; known: {known} (also stu_t-*)")


def lds_system(seq_len: int, args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], str]:
    """The fitted SpectraLDS system (`spectralds.distill.get_fit`, cached on disk) or a random stable one.

    --lds-system auto falls back to the random one when no fit can be had for these sizes.
    """
    if args.lds_system != "random-stable":
        try:
            from spectralds.distill import get_fit

            start = time.perf_counter()
            fit = get_fit(seq_len, args.num_filters, args.lds_states)
            print(f"LDS fit for seq_len {seq_len}: {time.perf_counter() - start:.1f} s (cached afterwards)")
            return (fit.A, fit.B, fit.C), "fitted"
        except (ImportError, ValueError) as err:
            if args.lds_system == "fitted":
                raise
            print(f"note: no fitted LDS ({err}); the LDS uses a random stable system instead")
    # Decode time depends only on the system's size, not its values: a stand-in times the same.
    g = torch.Generator().manual_seed(args.seed)
    h = args.lds_states
    A = (1 - torch.logspace(-0.3, -4, h, dtype=torch.float64)) * (1 - 2 * (torch.arange(h) % 2))
    C = torch.randn(h, 2 * args.num_filters, generator=g, dtype=torch.float64) / math.sqrt(h)
    return (A, (1 - A**2).sqrt(), C), "random-stable"


def build(method: str, args: argparse.Namespace, seq_len: int, system) -> torch.nn.Module:
    """One layer, or with --model a LanguageModel whose mixers are all this method's layer (lds-attn:
    LDS and window attention alternating)."""
    parts = ["lds", "attn-window"] if method in HYBRID else [method]
    specs = [mixer_spec(part, args) for part in parts]
    name, kwargs, decode = specs[0]
    if args.model:
        from spectralds.models.lm import LanguageModel  # imports Lightning: only when asked for

        module = LanguageModel(
            vocab_size=args.vocab_size, dim=args.dim, num_layers=args.num_layers,
            layer_pattern=[spec[0] for spec in specs], seq_len=seq_len, num_filters=args.num_filters,
            layer_kwargs={spec[0]: spec[1] for spec in specs},
        )
    else:
        module = build_layer(name, dim=args.dim, seq_len=seq_len, **kwargs)
    for sub in module.modules():
        if hasattr(sub, "set_system"):
            sub.set_system(*system)
    if decode is not None:
        set_decode_method(module, decode)
    return module.to(args.device, DTYPES[args.dtype]).eval()


def synthetic_state(module: torch.nn.Module, batch: int, prompt_len: int):
    """The KV cache(s) (and LDS states) a prefill of `prompt_len` tokens would leave, random values."""

    def cache(attn: SlidingWindowAttention) -> KVCache | torch.Tensor:
        if not isinstance(attn, SlidingWindowAttention):  # an LDS: its state has one shape at any P
            return torch.randn(batch, attn.channels, attn.state_dim, dtype=attn.run_dtype,
                               device=next(attn.buffers()).device)
        p = next(attn.parameters())
        kept = prompt_len if attn.window_size is None else min(prompt_len, attn.window_size)
        shape = (batch, attn.num_heads, kept, attn.head_dim)
        return KVCache(torch.randn(shape, device=p.device, dtype=p.dtype),
                       torch.randn(shape, device=p.device, dtype=p.dtype), prompt_len)

    if isinstance(module, SequenceLayer):
        return cache(module)
    return [cache(layer) for layer in module.decoding_layers()]  # a LanguageModel: one cache per block


def prefill(module, prompt: torch.Tensor, args: argparse.Namespace):
    """The decoding state after `prompt`, prefilled --prefill-batch sequences at a time and merged (an
    LDS prefill's features take batch x P x 2K x dim floats: 51 GB at batch 64, P 16k, dim 256)."""
    chunks = prompt.split(args.prefill_batch)
    if len(chunks) == 1:
        return module.prefill(prompt)[1]
    states = [module.prefill(chunk)[1] for chunk in chunks]
    return merge_prefills(module, states)


@torch.inference_mode()
def bench_one(module, method: str, batch: int, prompt_len: int, args: argparse.Namespace, device) -> dict:
    """Prefill, warm up, then time decode steps; returns one record (see the module docstring)."""
    n, dtype = args.new_tokens, DTYPES[args.dtype]
    if args.model:  # token ids in, logits out
        prompt = torch.randint(args.vocab_size, (batch, prompt_len), device=device)
        tokens = torch.randint(args.vocab_size, (args.warmup + n, batch), device=device)
    else:  # activations in, activations out
        prompt = torch.randn(batch, prompt_len, args.dim, device=device, dtype=dtype)
        tokens = torch.randn(args.warmup + n, batch, args.dim, device=device, dtype=dtype)

    synthetic = ("attn" in method) and prompt_len > args.attn_prefill_max
    with PeakMemory(device) as peak:
        synchronize(device)
        start = time.perf_counter()
        state = synthetic_state(module, batch, prompt_len) if synthetic else prefill(module, prompt, args)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        step = GraphedStep(module, tokens[0], state) if method.endswith("-graph") else module.step
        state = decode_loop(step, None, state, args.warmup, lambda i, _: tokens[i])[1]
        synchronize(device)
        state = copy.deepcopy(state)  # a graph updates its own state in place: keep a snapshot

    times = []
    for _ in range(args.repeats):
        s = copy.deepcopy(state)  # every repeat decodes the same positions from the same state
        synchronize(device)
        start = time.perf_counter()
        decode_loop(step, None, s, n, lambda i, _: tokens[args.warmup + i])
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "batch": batch,
        "prompt_len": prompt_len,
        "ms_per_token": 1e3 * statistics.median(times) / n,
        "tokens_per_s": batch * n / statistics.median(times),
        "prefill_s": None if synthetic else prefill_s,
        "prefill": "synthetic" if synthetic else "real",
        "state_mb": tensor_bytes(state) / 2**20,
        "peak_mem_mb": peak.mb,
        "device": str(device),
        "dtype": args.dtype,
    }


def report(records: list[dict], system_label: str) -> None:
    """The table; per batch, each STU method's slowdown against the LDS per P, the LDS flatness check,
    the LDS model's tokens/s against full attention's, and the graphed hybrid against the eager one."""
    print(format_table(records, [
        ("method", "method", "s"), ("batch", "batch", "d"), ("prompt_len", "prompt_len", "d"),
        ("ms/token", "ms_per_token", ".3f"), ("tokens/s", "tokens_per_s", ".4g"),
        ("prefill s", "prefill_s", ".3f"), ("state MB", "state_mb", ".4g"), ("peak MB", "peak_mem_mb", ".1f"),
        ("LDS system", "system", "s"),
    ]))
    ms = {(r["method"], r["batch"], r["prompt_len"]): r["ms_per_token"] for r in records}
    batches = sorted({r["batch"] for r in records})
    for name in ("lds", "lds-graph", "lds-attn-graph"):
        for batch in batches:
            lds = {p: t for (m, b, p), t in ms.items() if m == name and b == batch}
            if lds and name != "lds-attn-graph" and any(r["method"].startswith("stu") for r in records):
                print(f"\nms/token of each STU method relative to {name} ({system_label} system), "
                      f"batch {batch}:")
                for p, base in lds.items():
                    ratios = [f"{m} {t / base:.2f}x" for (m, b, q), t in ms.items()
                              if q == p and b == batch and m.startswith("stu")]
                    print(f"  P={p}: " + ", ".join(ratios))
            if len(lds) > 1:
                short, long = min(lds), max(lds)
                ratio = lds[long] / lds[short]
                verdict = "flat" if ratio <= LDS_FLATNESS_LIMIT else f"NOT flat (limit {LDS_FLATNESS_LIMIT}x)"
                print(f"{name} flatness, batch {batch}: ms/token at P={long} / P={short} = {ratio:.2f} "
                      f"-> {verdict}")
    goals = (("lds", "attn-full", 10), ("lds-graph", "attn-full", 10), ("lds-attn-graph", "lds-attn", 5))
    for fast, slow, goal in goals:
        pairs = sorted((b, p, ms[slow, b, p] / t) for (m, b, p), t in ms.items()
                       if m == fast and (slow, b, p) in ms)
        if pairs:
            print(f"\ntokens/s of {fast} / {slow} (goal >= {goal}x at the largest batch and P):")
            print("  " + ", ".join(f"batch {b} P={p}: {x:.1f}x" for b, p, x in pairs))
    synthetic = sorted({r["prompt_len"] for r in records if r["prefill"] == "synthetic"})
    if synthetic:
        print(f"attention at P in {synthetic}: KV cache synthesized (random values, real shape), no prefill")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_args(parser)
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help="timed decode steps per repeat")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"default: {' '.join(METHODS)} (+ {' '.join(CUDA_METHODS)} on CUDA)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--num-filters", type=int, default=None, help="K, the number of spectral filters")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="batch sizes (sequences decoded at once)")
    parser.add_argument("--prefill-batch", type=int, default=8,
                        help="prefill at most this many sequences at once (memory), then merge the states")
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=1024, help="sliding window of attn-window")
    parser.add_argument("--lds-states", type=int, default=80)
    parser.add_argument("--lds-system", choices=["auto", "fitted", "random-stable"], default="auto",
                        help="auto: the fit from spectralds.distill.get_fit when it can be had, else random")
    parser.add_argument("--attn-prefill-max", type=int, default=4096,
                        help="longer attention prompts get a synthetic KV cache instead of a prefill")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--layer", dest="model", action="store_false", help="time one layer (default)")
    mode.add_argument("--model", dest="model", action="store_true", help="time a full small LanguageModel")
    parser.set_defaults(model=False)
    parser.add_argument("--num-layers", type=int, default=2, help="layers of the --model")
    parser.add_argument("--vocab-size", type=int, default=256)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"prompt_lens": [32, 64] if quick else [1024, 4096, 16384, 65536],
                "new_tokens": 4 if quick else 64, "dim": 16 if quick else 32,
                "num_filters": 4 if quick else 24, "repeats": 1 if quick else 5, "warmup": 1 if quick else 8}
    defaults["methods"] = list(METHODS + CUDA_METHODS) if args.device == "cuda" else list(METHODS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device != "cuda" and any(m.endswith("-graph") for m in args.methods):
        parser.error(f"{', '.join(CUDA_METHODS)} and lds-attn-graph need --device cuda")
    if any(m in HYBRID for m in args.methods) and not args.model:
        parser.error(f"{', '.join(HYBRID)} are models (LDS and attention blocks): add --model")
    if min(args.prompt_lens) < 1 or args.new_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("prompt lengths, --new-tokens and --repeats must be positive, --warmup >= 0")
    if min(args.batch) < 1 or args.prefill_batch < 1:
        parser.error("--batch sizes and --prefill-batch must be positive")
    for method in args.methods:
        if method not in HYBRID:
            mixer_spec(method, args)  # fail on a bad name before any work
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = setup(args)
    seq_len = max(args.prompt_lens) + args.warmup + args.new_tokens  # every decoded position fits
    wants_lds = any(m.startswith("lds") for m in args.methods)
    system, system_label = lds_system(seq_len, args) if wants_lds else (None, "none")
    what = f"LanguageModel with {args.num_layers} layers" if args.model else "single layer"
    batches = " ".join(map(str, args.batch))
    print(f"{what}, dim {args.dim}, K {args.num_filters}, batch {batches}, seq_len {seq_len}, "
          f"{args.dtype}, {args.new_tokens} timed tokens x {args.repeats} repeats, LDS: {system_label} "
          f"system with {args.lds_states} states\n", flush=True)

    records = []
    for method in args.methods:
        module = build(method, args, seq_len, system)
        for batch in args.batch:
            for prompt_len in sorted(args.prompt_lens):
                record = bench_one(module, method, batch, prompt_len, args, device)
                record["system"] = system_label if method.startswith("lds") else None
                records.append(record)
                print(f"  {method:15} batch {batch:<4} P={prompt_len:<6} {record['ms_per_token']:8.3f} "
                      f"ms/token {record['tokens_per_s']:10.1f} tokens/s", flush=True)
        del module
    print()
    report(records, system_label)
    if args.json:
        write_json(args.json, records, args)
    if args.plot:
        title = f"decode, {what}, dim {args.dim}, K {args.num_filters}, {args.dtype} on {device}"
        for r in records:  # one line per method and batch size
            r["series"] = r["method"] if len(args.batch) == 1 else f"{r['method']} b{r['batch']}"
        plot_panels(args.plot, [{"x": "prompt_len", "y": "ms_per_token", "ylabel": "ms / token"},
                                {"x": "prompt_len", "y": "tokens_per_s", "ylabel": "tokens / s"},
                                {"x": "prompt_len", "y": "state_mb", "ylabel": "decode state (MB)"}],
                    records, "series", title)
        for r in records:
            del r["series"]
    return records


if __name__ == "__main__":
    main()
