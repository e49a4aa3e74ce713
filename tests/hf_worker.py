"""A fresh process for tests/test_export_hf.py: load exported directories with transformers alone
(`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, no spectralds import of ours
before it) and record logits, generations and cache sizes. Usage: python hf_worker.py JOB.pt OUT.pt"""

import sys

import torch


def leaf_shapes(state) -> list[tuple[int, ...]]:
    """Shapes of every tensor inside a decoding state (tensors, dataclasses, named tuples, lists)."""
    if isinstance(state, torch.Tensor):
        return [tuple(state.shape)]
    if hasattr(state, "__dataclass_fields__"):
        return [s for name in state.__dataclass_fields__ for s in leaf_shapes(getattr(state, name))]
    if isinstance(state, (list, tuple)):
        return [s for item in state for s in leaf_shapes(item)]
    return []


def run(job: dict) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
    out = {"module": type(model).__module__, "dtype": str(model.dtype)}
    with torch.no_grad():
        out["logits"] = model(job["x"]).logits
    calls = {"prefill": 0, "step": 0}
    for name in calls:  # count what generate runs: one prefill, then one step per new token
        original = getattr(model.lm, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(model.lm, name, counted)
    n = job["new_tokens"]
    out["greedy"] = model.generate(job["prompt"], max_new_tokens=n, do_sample=False)
    out["calls"] = dict(calls)
    torch.manual_seed(job["seed"])  # HF samples from torch's global generator
    out["sampled"] = model.generate(job["prompt"], max_new_tokens=n, do_sample=True,
                                    temperature=job["temperature"], top_k=job["top_k"])
    # The cache after 1 and after many decoded tokens: the same tensors, the same shapes, for an LDS.
    with torch.no_grad():
        first = model(job["prompt"], use_cache=True, logits_to_keep=1)
        shapes = [leaf_shapes(first.cache.states)]
        cache, token = first.cache, job["prompt"][:, -1:]
        for _ in range(n):
            cache = model(token, cache=cache, use_cache=True).cache
        shapes.append(leaf_shapes(cache.states))
    out["cache_shapes"] = shapes
    out["cache_type"] = type(cache).__name__
    if job.get("padded") is not None:
        ids, mask = job["padded"]
        try:
            out["left_padded"] = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
            with torch.no_grad():
                out["left_padded_logits"] = model(ids, attention_mask=mask).logits
        except Exception as err:  # reported to the test, which names it
            out["left_padded_error"] = f"{type(err).__name__}: {err}"
    return out


if __name__ == "__main__":
    jobs = torch.load(sys.argv[1], weights_only=False)
    torch.save({name: run(job) for name, job in jobs.items()}, sys.argv[2])
