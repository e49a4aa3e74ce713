"""The arguments lm-eval hands the spectralds backend, checked where they arrive: model_args merged with
lm-eval's own batch_size/device, and a task's generation kwargs (from its YAML or `--gen_kwargs`).

A bad value is one UserError naming it, before any work: lm-eval would pass it on to a TypeError
("got multiple values"), a torch error deep in sampling, or silently ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from spectralds.errors import UserError, check_float, check_int, first_line

# lm-eval's CLI always passes these beside --model_args (batch_size 1 and device cuda:0 by default).
LM_EVAL_OWN = ("batch_size", "device", "max_batch_size")
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")
# Settings the backend does not implement, accepted only at the value that changes nothing.
NEUTRAL = {"top_p": 1.0, "num_beams": 1, "repetition_penalty": 1.0}


def merge_model_args(args: Mapping[str, Any], additional: Mapping[str, Any] | None) -> dict[str, Any]:
    """model_args plus lm-eval's additional config (its None values dropped, as lm-eval does); a key in
    both is refused (lm-eval would stop on a TypeError, and one of the two values would be a default)."""
    extra = {k: v for k, v in (additional or {}).items() if v is not None}
    twice = sorted(k for k in args if k in extra)
    if twice:
        options = ", ".join(f"--{k}" for k in twice)
        raise UserError(f"{', '.join(twice)} given inside --model_args; lm-eval passes its own {options} "
                        f"(a default when not given): give {'them' if len(twice) > 1 else 'it'} there")
    return {**args, **extra}


@dataclass(frozen=True)
class GenerationSettings:
    until: list[str]
    max_gen_toks: int
    temperature: float  # 0: greedy
    top_k: int | None


def _number(name: str, value: Any) -> Any:
    if isinstance(value, str):  # `--gen_kwargs temperature=nan` arrives as the text "nan"
        try:
            return float(value)
        except ValueError:
            raise UserError(f"generation argument {name} must be a number, got {value!r}") from None
    return value


def generation_settings(kwargs: Mapping[str, Any], where: str = "generation arguments") -> GenerationSettings:
    """A task's generation kwargs as the backend uses them, or a UserError naming the bad one.

    As in lm-eval's HF backend: do_sample decides; unset, a temperature above 0 means sampling (at
    temperature 1 when do_sample is set and the temperature is 0). top_k 0 or unset: no top-k cut.
    """
    unknown = sorted(k for k in kwargs if k not in GENERATION_KEYS and k not in NEUTRAL)
    if unknown:
        raise UserError(f"{where}: {', '.join(unknown)} not supported by the spectralds backend "
                        f"(it supports {', '.join(GENERATION_KEYS)})")
    given = check_float(f"{where}: temperature", _number("temperature", kwargs.get("temperature") or 0.0),
                        minimum=0)
    do_sample = kwargs.get("do_sample")
    do_sample = given > 0 if do_sample is None else do_sample
    if not isinstance(do_sample, bool):
        raise UserError(f"{where}: do_sample must be true or false, got {do_sample!r}")
    for key, neutral in NEUTRAL.items():
        value = kwargs.get(key)
        matters = do_sample or key != "top_p"  # beams and a repetition penalty change greedy decoding too
        if value is not None and matters and _number(key, value) != neutral:
            raise UserError(f"{where}: {key}={value!r} is not supported by the spectralds backend "
                            f"(only {key}={neutral})")
    top_k = kwargs.get("top_k")
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    if top_k is not None:
        check_int(f"{where}: top_k", top_k, minimum=0)
    max_gen_toks = kwargs.get("max_gen_toks", 256)
    if isinstance(max_gen_toks, str) and max_gen_toks.strip().isdigit():
        max_gen_toks = int(max_gen_toks)
    if isinstance(max_gen_toks, float) and math.isfinite(max_gen_toks) and max_gen_toks.is_integer():
        max_gen_toks = int(max_gen_toks)
    check_int(f"{where}: max_gen_toks", max_gen_toks, minimum=1)
    until = kwargs.get("until")
    until = [] if until is None else [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) and s for s in until):
        # an empty stop string is "found" in every text: generation would stop after its first chunk
        raise UserError(f"{where}: until must be a non-empty string or a list of them, "
                        f"got {kwargs.get('until')!r}")
    return GenerationSettings(list(until), max_gen_toks, (given or 1.0) if do_sample else 0.0, top_k or None)


def resolve_device(name: str | None) -> torch.device:
    """None: cuda when available, else cpu. A device this machine lacks is refused, never replaced (our
    lm_eval_cli passes lm-eval's CLI a --device only when the user gave one)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({first_line(e)})") from e
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(f"device {name!r} asked for, but this machine has {count} CUDA device(s); "
                        "use --device cpu")
    usable = device.type in ("cpu", "cuda") or (device.type == "mps" and torch.backends.mps.is_available())
    if not usable:
        raise UserError(f"device {name!r} cannot run the evaluation here; use cpu or cuda")
    return device
