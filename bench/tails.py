"""How good is the tail model? Analytic vs simulated p50/p90/p99 of e2e, TTFT and TPOT.

    python bench/tails.py [n_requests]

For several draft lengths, acceptance rates and loads (10% to 85% of the analytic
saturation rate), simulate a long Poisson run with the example coefficients (5x as many
requests at 70% and 85%: there the queue relaxes slowly, and the p99 of 30,000 requests at
85% moved by 19% between two seeds, +9% and -10% about the model's), drop the first 10% of
requests as warm-up, and compare the simulated percentiles with
``sdbayes.tails.percentile`` (the "stepped" form, whose mean follows the simulator's whole
steps; ``arrival_cv2=1``, Poisson). Prints the error (analytic / simulated - 1) of each
cell, then the mean and worst error per metric, percentile and load. The one constant the
tail model took from the simulator is the ``rho`` term of the load's variance
(``sdbayes.tails`` docstring); everything else is derived.
"""

import sys
import time

import numpy as np

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS as COEF
from sdbayes.tails import QUANTILES, percentile

OUTPUT_LEN = 128
LOADS = (0.1, 0.3, 0.5, 0.7, 0.85)
HEAVY, LONGER = 0.7, 5  # from this load on, this many times the requests
METRICS = ("e2e", "ttft", "tpot")


def simulated(trace) -> dict[str, np.ndarray]:
    steady = trace.iloc[len(trace) // 10:]
    decode = (steady["e2e_s"] - steady["ttft_s"]) / (OUTPUT_LEN - 1)
    return {"e2e": steady["e2e_s"].to_numpy(), "ttft": steady["ttft_s"].to_numpy(),
            "tpot": decode.to_numpy()}


def main(n_requests: int = 30_000) -> None:
    print(f"{n_requests} Poisson requests per cell ({LONGER}x from {HEAVY:.0%} of saturation), "
          f"output {OUTPUT_LEN} tokens; "
          "error = analytic / simulated - 1, per metric p50 p90 p99")
    errors: dict[tuple, list[float]] = {}
    started = time.perf_counter()
    for k in (0, 2, 4, 8):
        for alpha in ((0.0,) if k == 0 else (0.6, 0.8)):
            point = dict(k=k, alpha=alpha, output_len=OUTPUT_LEN)
            saturation = float(sb.saturation_rate(COEF, **point))
            for load in LOADS:
                rate = load * saturation
                n = n_requests * (LONGER if load >= HEAVY else 1)
                trace = sb.simulate(COEF, rate=rate, n_requests=n, seed=1, prompt_len=512,
                                    **point)
                sim = simulated(trace)
                cells = []
                for metric in METRICS:
                    model = np.asarray(percentile(COEF, q=np.array(QUANTILES), rate=rate,
                                                  metric=metric, variant="stepped", **point))
                    for q, m in zip(QUANTILES, model, strict=True):
                        error = m / np.percentile(sim[metric], 100 * q) - 1
                        errors.setdefault((metric, q, load), []).append(error)
                        cells.append(f"{error:+6.1%}")
                print(f"k={k} alpha={alpha:.1f} load={load:4.0%}: e2e {' '.join(cells[:3])} | "
                      f"ttft {' '.join(cells[3:6])} | tpot {' '.join(cells[6:])}", flush=True)
    print(f"\n{'metric':>6} {'pct':>4} " + " ".join(f"{f'{load:.0%} mean/worst':>18}"
                                                   for load in LOADS))
    for metric in METRICS:
        for q in QUANTILES:
            row = []
            for load in LOADS:
                e = np.array(errors[(metric, q, load)])
                row.append(f"{e.mean():+7.1%}/{e[np.argmax(abs(e))]:+7.1%}".rjust(18))
            print(f"{metric:>6} p{round(100 * q):<3} " + " ".join(row))
    print(f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30_000)
