"""How long the backend takes for N multiple-choice loglikelihood requests (HellaSwag-like lengths).

    python tools/bench_eval.py [--ckpt X.ckpt] [--requests 1000] [--batch-size 32]

Without --ckpt it times an untrained model of the quickstart's shape (4 stu_t layers, dim 128): the time
does not depend on the weights. Requests are byte strings of about 300-byte contexts (cut on the left
to seq_len) with four ~40-byte endings each, as HellaSwag's are.
"""

from __future__ import annotations

import argparse
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
    a = p.parse_args(argv)
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
