"""``python -m sdbayes``: the latency model on the documented example configuration
(:mod:`sdbayes.examples`)."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from sdbayes.examples import EXAMPLE_COEFFICIENTS, EXAMPLE_POINT
from sdbayes.model import demands, latency, saturation_rate, speedup, ttft


def main(console: Console | None = None) -> None:
    console = console or Console()
    coef, point = EXAMPLE_COEFFICIENTS, EXAMPLE_POINT
    console.print("[bold]sdbayes[/bold]: latency model, example configuration "
                  f"(k={point['k']}, alpha={point['alpha']}, prompt {point['prompt_len']} "
                  f"and output {point['output_len']} tokens)")

    d = demands(coef, **point)
    phases = Table(title="Per-request demand by phase [ms]")
    phases.add_column("phase")
    phases.add_column("load-independent (C1)", justify="right")
    phases.add_column("per other request in flight (C2)", justify="right")
    for name in ("prefill", "drafting", "verification", "total"):
        phases.add_row(name, f"{1e3 * float(getattr(d.independent, name)):.2f}",
                       f"{1e3 * float(getattr(d.dependent, name)):.3f}")
    console.print(phases)

    saturation = float(saturation_rate(coef, **point))
    console.print(f"Saturation rate 1/C2: {saturation:.2f} req/s")
    rates = saturation * np.array([0.0, 0.25, 0.5, 0.75, 0.9])
    load = Table(title="Mean latency against load")
    for header in ("rate [req/s]", "of saturation", "E2E [ms]", "TTFT [ms]", "speedup vs k=0"):
        load.add_column(header, justify="right")
    e2e = latency(coef, rate=rates, **point)
    first = ttft(coef, rate=rates, **point)
    gain = speedup(coef, rate=rates, **point)
    for i, rate in enumerate(rates):
        shown = f"{float(gain[i]):.2f}x" if np.isfinite(gain[i]) else "k=0 saturated"
        load.add_row(f"{rate:.2f}", f"{rate / saturation:.0%}", f"{1e3 * float(e2e[i]):.0f}",
                     f"{1e3 * float(first[i]):.0f}", shown)
    console.print(load)


if __name__ == "__main__":
    main()
