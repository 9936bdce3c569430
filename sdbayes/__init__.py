"""sdbayes: a Bayesian latency model of speculative decoding in LLM serving.

``import sdbayes as sb``; the names below are the stable public surface (DESIGN.md
section 6). Seconds and tokens throughout.
"""

from sdbayes.model import (
    Coefficients,
    Demands,
    PhaseDemands,
    PositionRates,
    demands,
    goodput,
    latency,
    saturation_rate,
    speedup,
    tokens_per_step,
    tpot,
    ttft,
)
from sdbayes.simulate import Empirical, Uniform, simulate
from sdbayes.traces import TraceError, aggregate, read_traces, validate, write_traces

__all__ = [
    "Coefficients",
    "Demands",
    "Empirical",
    "PhaseDemands",
    "PositionRates",
    "TraceError",
    "Uniform",
    "aggregate",
    "demands",
    "goodput",
    "latency",
    "read_traces",
    "saturation_rate",
    "simulate",
    "speedup",
    "tokens_per_step",
    "tpot",
    "ttft",
    "validate",
    "write_traces",
]
