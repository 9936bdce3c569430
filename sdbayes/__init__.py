"""sdbayes: a Bayesian latency model of speculative decoding in LLM serving.

``import sdbayes as sb``; the names below are the stable public surface (DESIGN.md
section 6). Seconds and tokens throughout.
"""

import warnings

with warnings.catch_warnings():
    # ArviZ 0.2x announces its 1.x refactor on import; DESIGN.md pins the 0.2x API.
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
    import arviz  # noqa: F401

from sdbayes.finite_run import FiniteRun, finite_run  # noqa: E402
from sdbayes.importers import read_guidellm  # noqa: E402
from sdbayes.inference import AUTO, choose_variant, fit, use_cpu_cores  # noqa: E402
from sdbayes.model import (
    Coefficients,
    Demands,
    PhaseDemands,
    PositionRates,
    Variant,
    demands,
    expert_coverage,
    goodput,
    latency,
    saturation_rate,
    speedup,
    tokens_per_step,
    tpot,
    ttft,
)
from sdbayes.planning import Capacity, InfeasibleSLO, max_rate  # noqa: E402
from sdbayes.posterior import Posterior, compare, load_posterior
from sdbayes.simulate import Empirical, Uniform, simulate
from sdbayes.sweep import SweepConfig, SweepError, read_sweep_config, run_sweep
from sdbayes.traces import TraceError, aggregate, read_traces, validate, write_traces
from sdbayes.tuning import KChoice, tune_k  # noqa: E402

__all__ = [
    "AUTO",
    "Capacity",
    "Coefficients",
    "Demands",
    "Empirical",
    "FiniteRun",
    "InfeasibleSLO",
    "KChoice",
    "PhaseDemands",
    "PositionRates",
    "Posterior",
    "SweepConfig",
    "SweepError",
    "TraceError",
    "Uniform",
    "Variant",
    "aggregate",
    "choose_variant",
    "compare",
    "demands",
    "expert_coverage",
    "finite_run",
    "fit",
    "goodput",
    "latency",
    "load_posterior",
    "max_rate",
    "read_guidellm",
    "read_sweep_config",
    "read_traces",
    "run_sweep",
    "saturation_rate",
    "simulate",
    "speedup",
    "tokens_per_step",
    "tpot",
    "tune_k",
    "ttft",
    "use_cpu_cores",
    "validate",
    "write_traces",
]
