"""Peak memory and time of prefilling one long prompt at once versus chunk by chunk (issue 28, 2a).

    python tools/bench_prefill_chunk.py                              # CPU: P = 8192, chunks 512 and 2048
    python tools/bench_prefill_chunk.py --prompt 16384 --chunks 256 1024 --patterns stu_t,attn lds
    python tools/bench_prefill_chunk.py --device cuda --dim 1024 --json prefill_chunk.json

For each model (a LanguageModel of --num-layers blocks cycling through a pattern's mixers, seq_len = the
prompt, attention windowed by --window) and each chunk (0: the whole prompt at once), the prompt is
prefilled under torch.inference_mode() by `spectralds.generate.chunked_prefill`, what `generate` and
`spectralds generate --prefill-chunk` run. "peak MB": the memory growth during that prefill
(`_bench_common.PeakMemory`: CUDA max_memory_allocated; CPU the sampled resident set size), the states
it returns included; "state MB": the bytes of those states alone (an STU's span seq_len, an LDS's are
fixed, a window's KV cache holds the window); "max |dlogit|": the largest difference of the last
position's logits from the unchunked prefill (float32: rounding only).
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench_common import DTYPES, PeakMemory, add_common_args, format_table, setup, tensor_bytes, write_json

from spectralds.generate import chunked_prefill
from spectralds.models import LanguageModel


def build(pattern: list[str], args: argparse.Namespace, device: torch.device) -> LanguageModel:
    torch.manual_seed(args.seed)
    kwargs = {"attn": {"num_heads": max(1, args.dim // 64), "window_size": args.window},
              "lds": {"state_dim": 48}, "lds_ar": {"state_dim": 48, "ar_order": 2}}
    model = LanguageModel(vocab_size=256, dim=args.dim, num_layers=args.num_layers, layer_pattern=pattern,
                          seq_len=args.prompt, num_filters=24, layer_kwargs=kwargs)
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval()


@torch.inference_mode()
def measure(model: LanguageModel, prompt: torch.Tensor, chunk: int, device: torch.device) -> dict:
    with PeakMemory(device) as peak:
        begin = time.perf_counter()
        logits, states = chunked_prefill(model, prompt, chunk or None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - begin
    return {"chunk": chunk or "all", "peak MB": peak.mb, "state MB": tensor_bytes(states) / 2**20,
            "prefill s": seconds, "logits": logits.float().cpu()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--prompt", type=int, default=8192, help="prompt tokens (and the models' seq_len)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--patterns", nargs="+", default=["stu_t,attn", "stu", "lds", "attn"],
                        help="comma-separated mixers of each model")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=512, help="attention window")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.chunks, args.dim, args.window = 64, [16], 32, 16
    device = setup(args)
    prompt = torch.randint(256, (args.batch, args.prompt), device=device)
    records = []
    for pattern in args.patterns:
        model = build(pattern.split(","), args, device)
        whole = None
        for chunk in [0, *args.chunks]:  # the unchunked prefill first: the reference logits
            record = measure(model, prompt, chunk, device)
            logits = record.pop("logits")
            whole = logits if whole is None else whole
            record.update(model=pattern, prompt=args.prompt, dlogit=float((logits - whole).abs().max()))
            records.append(record)
        del model
    columns = [("model", "model", ""), ("chunk", "chunk", ""), ("peak MB", "peak MB", ".1f"),
               ("state MB", "state MB", ".1f"), ("prefill s", "prefill s", ".2f"),
               ("max |dlogit|", "dlogit", ".1e")]
    print(f"prompt {args.prompt} tokens, batch {args.batch}, dim {args.dim}, {args.num_layers} layers, "
          f"{args.dtype}, {args.device}")
    print(format_table(records, columns))
    if args.json:
        write_json(args.json, records, args)
    return records


if __name__ == "__main__":
    main()
