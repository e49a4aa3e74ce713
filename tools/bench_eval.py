"""How long the backend takes for N multiple-choice loglikelihood requests (HellaSwag-like lengths).

    python tools/bench_eval.py [--ckpt X.ckpt] [--requests 1000] [--batch-size 32]
    python tools/bench_eval.py --shared [--contexts 512 2048] [--kinds stu_t lds hybrid] [--items 8]

Without --ckpt it times an untrained model of the quickstart's shape (4 stu_t layers, dim 128): the time
does not depend on the weights. Requests are byte strings of about 300-byte contexts (cut on the left
to seq_len) with four ~40-byte endings each, as HellaSwag's are.

--shared: items of four ~40-byte endings sharing one context of exactly --contexts bytes, scored from one
run of the context (`shared_context`) and by one full forward per ending; prints both times, the
speed-up and the largest relative difference of a score, for each model kind (quickstart shape, a window
of the longest context + 64 unless --window).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch


def requests(count: int, seed: int = 0) -> list:
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = "the a river stone bread wind kettle harbour boat light moved slowly over under".split()
    out = []
    for i in range(count):
        context = " ".join(rng.choice(words) for _ in range(rng.randint(40, 70)))
        ending = " " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 10)))
        out.append(Instance("loglikelihood", {}, (context, ending), i))
    return out


PATTERNS = {"stu_t": ["stu_t"], "lds": ["lds"], "hybrid": ["stu_t", "attn"], "stu": ["stu"], "attn": ["attn"]}


def shared_items(count: int, context_bytes: int, seed: int = 0) -> list:
    """`count` items of four endings (36-44 bytes) after one context of exactly `context_bytes` bytes."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = "the a river stone bread wind kettle harbour boat light moved slowly over under".split()
    out = []
    for i in range(count):
        text = ""
        while len(text) < context_bytes:
            text += rng.choice(words) + " "
        context = text[:context_bytes - 1] + "."
        for _ in range(4):
            ending = " " + " ".join(rng.choice(words) for _ in range(12))
            out.append(Instance("loglikelihood", {}, (context, ending[: rng.randint(36, 44)]), i))
    return out


def shared(a: argparse.Namespace) -> None:
    from spectralds.evaluation.lm_eval_backend import SpectraLDSLM
    from spectralds.models import LanguageModel

    print("| model | context | items x 4 | full forwards s | shared context s | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for kind in a.kinds:
        torch.manual_seed(0)
        model = LanguageModel(vocab_size=256, dim=128, num_layers=4, layer_pattern=PATTERNS[kind],
                              seq_len=a.window or max(a.contexts) + 64, num_filters=24, mlp_ratio=3.0)
        for context in a.contexts:
            items = shared_items(a.items, context)
            lms = {mode: SpectraLDSLM(model=model, batch_size=a.batch_size, device=a.device, decode=a.decode,
                                      shared_context=minimum)
                   for mode, minimum in (("forwards", 0), ("shared", 1))}
            seconds, scores = {mode: math.inf for mode in lms}, {}
            for lm in lms.values():
                lm.loglikelihood(items[:4], disable_tqdm=True)  # warm-up: filters, FFT plans
            for _ in range(a.repeats):  # the two modes take turns, so both see the same load; fastest counts
                for mode, lm in lms.items():
                    start = time.perf_counter()
                    scores[mode] = [logprob for logprob, _ in lm.loglikelihood(items, disable_tqdm=True)]
                    seconds[mode] = min(seconds[mode], time.perf_counter() - start)
            diff = max(abs(x - y) / abs(y) for x, y in zip(scores["shared"], scores["forwards"], strict=True))
            print(f"| {kind} | {context} | {a.items} | {seconds['forwards']:.2f} | {seconds['shared']:.2f} | "
                  f"{seconds['forwards'] / seconds['shared']:.1f}x | {diff:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    from spectralds.evaluation.lm_eval_backend import SpectraLDSLM
    from spectralds.models import LanguageModel

    p = argparse.ArgumentParser(prog="python tools/bench_eval.py")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="without --ckpt: the model's context")
    p.add_argument("--layer", default="stu_t", help="without --ckpt: the mixer layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shared", action="store_true", help="shared-context items vs one forward per ending")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="--shared: context bytes")
    p.add_argument("--kinds", nargs="+", default=["stu_t", "lds", "hybrid"], choices=sorted(PATTERNS))
    p.add_argument("--items", type=int, default=8, help="--shared: items of four endings per context")
    p.add_argument("--repeats", type=int, default=1, help="--shared: timed runs per mode (fastest)")
    p.add_argument("--window", type=int, default=None, help="--shared: seq_len (None: longest context + 64)")
    p.add_argument("--decode", default="futurefill", choices=["futurefill", "naive"], help="STU decoding")
    a = p.parse_args(argv)
    if a.shared:
        return shared(a)
    if a.ckpt:
        lm = SpectraLDSLM(ckpt=a.ckpt, batch_size=a.batch_size, device=a.device)
    else:
        torch.manual_seed(0)
        model = LanguageModel(vocab_size=256, dim=128, num_layers=4, layer_pattern=[a.layer],
                              seq_len=a.seq_len, num_filters=24, mlp_ratio=3.0)
        lm = SpectraLDSLM(model=model, batch_size=a.batch_size, device=a.device)
    batch = requests(a.requests)
    lm.loglikelihood(batch[: a.batch_size], disable_tqdm=True)  # warm-up: filters, FFT plans
    start = time.perf_counter()
    lm.loglikelihood(batch, disable_tqdm=True)
    seconds = time.perf_counter() - start
    print(f"{a.requests} loglikelihood requests, seq_len {lm.max_length}, batch {a.batch_size}, "
          f"{torch.get_num_threads()} threads on {lm.device}: {seconds:.1f} s ({a.requests / seconds:.0f}/s)")


if __name__ == "__main__":
    main()
