"""How good is the mean-value approximation? Analytic vs simulated mean latency and TTFT.

    python bench/analytic_vs_simulated.py [n_requests]

For several draft lengths, acceptance rates and loads (10% to 90% of the analytic
saturation rate), simulate a long Poisson run with the example coefficients, drop the first
10% of requests as warm-up, and print the simulated means beside both model variants'
("paper" and "stepped", see sdbayes.model.VARIANTS) with the relative error
(analytic / simulated - 1). The analytic model is not tuned to the simulator: the table
measures the approximation.
"""

import sys

import numpy as np

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS as COEF

OUTPUT_LEN = 128
LOADS = (0.1, 0.3, 0.5, 0.7, 0.9)


def main(n_requests: int = 40_000) -> None:
    print(f"{n_requests} requests per cell, output {OUTPUT_LEN} tokens; "
          "error = analytic / simulated - 1")
    print(f"{'k':>3} {'alpha':>5} {'load':>5} {'E2E sim [s]':>11} {'paper':>7} {'stepped':>8}"
          f" {'TTFT sim [ms]':>13} {'model':>7}")
    errors = {"paper": [], "stepped": []}
    for k in (0, 2, 4, 8):
        for alpha in ((0.0,) if k == 0 else (0.6, 0.8, 0.95)):
            point = dict(k=k, alpha=alpha, output_len=OUTPUT_LEN)
            saturation = float(sb.saturation_rate(COEF, **point))
            for load in LOADS:
                rate = load * saturation
                trace = sb.simulate(COEF, rate=rate, n_requests=n_requests, seed=k,
                                    prompt_len=512, **point)
                steady = trace.iloc[n_requests // 10:]
                e2e_sim, ttft_sim = steady["e2e_s"].mean(), steady["ttft_s"].mean()
                err = {v: float(sb.latency(COEF, rate=rate, variant=v, **point)) / e2e_sim - 1
                       for v in errors}
                for v, e in err.items():
                    errors[v].append((load, e))
                first = float(sb.ttft(COEF, rate=rate, **point))
                print(f"{k:>3} {alpha:>5.2f} {load:>5.0%} {e2e_sim:>11.3f} "
                      f"{err['paper']:>+7.1%} {err['stepped']:>+8.1%} {1e3 * ttft_sim:>13.1f} "
                      f"{first / ttft_sim - 1:>+7.1%}")
    for variant, pairs in errors.items():
        pairs = np.array(pairs)
        for load in LOADS:
            at = pairs[pairs[:, 0] == load, 1]
            worst = at[np.argmax(abs(at))]
            print(f"{variant:>8} at {load:.0%} of saturation: mean E2E error {at.mean():+.1%}, "
                  f"worst {worst:+.1%}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40_000)
