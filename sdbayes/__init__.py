"""sdbayes: a Bayesian latency model of speculative decoding in LLM serving.

``import sdbayes as sb``; the names below are the stable public surface (README,
"Using the library"). Seconds and tokens throughout.
"""

import importlib
import importlib.util
import warnings

# ArviZ 0.2x announces its 1.x refactor on import; pyproject.toml pins the 0.2x API. Only that
# message is silenced, wherever arviz is first imported from.
warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)

# Where each public name lives. Imported on first use (PEP 562), so that `import sdbayes`,
# and with it the `sdbayes` command's --help, does not pay for JAX, NumPyro and ArviZ.
_HOMES = {
    "sdbayes.fluid": ("FiniteRun", "finite_run"),
    "sdbayes.importers": ("read_guidellm",),
    "sdbayes.inference": ("AUTO", "choose_variant", "fit", "use_cpu_cores"),
    "sdbayes.model": ("Coefficients", "Demands", "PhaseDemands", "PositionRates", "Variant",
                      "demands", "expert_coverage", "goodput", "latency", "saturation_rate",
                      "speedup", "tokens_per_step", "tpot", "ttft"),
    "sdbayes.planning": ("Capacity", "InfeasibleSLO", "max_rate"),
    "sdbayes.posterior": ("Posterior", "compare", "load_posterior"),
    "sdbayes.simulator": ("Empirical", "Uniform", "simulate"),
    "sdbayes.sweep": ("SweepConfig", "SweepError", "read_sweep_config", "run_sweep"),
    "sdbayes.traces": ("TraceError", "aggregate", "read_points", "read_traces", "validate",
                       "write_traces"),
    "sdbayes.tuning": ("KChoice", "tune_k"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


# Modules renamed, still reachable under their old names for a while.
_RENAMED = {"calibrate": "likelihood"}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f"sdbayes.{name} is now sdbayes.{_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(f"sdbayes.{_RENAMED[name]}")
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif importlib.util.find_spec(f"sdbayes.{name}") is not None:  # sb.model, sb.importers
        value = importlib.import_module(f"sdbayes.{name}")
    else:
        raise AttributeError(f"module 'sdbayes' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))


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
    "read_points",
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
