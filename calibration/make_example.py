"""Make the bundled example traces, sdbayes/data/example_points.csv.

    python calibration/make_example.py

Provenance: the project's own simulator (sb.simulate), driven by coefficients rounded from
a fit of the paper's form to the 432 steady points of the source study's real vLLM sweeps
(Qwen3-8B with an EAGLE drafter on one 80 GB GPU, ../shared/data/speculators-qwen3-8b;
posterior means: c1p 98 ms, c1v 13.7 ms, c1d 1.31 ms, c2p 32.5 ms, c2v 0.254 ms,
c2d 0.084 ms). No measured file is copied: the rows are simulated. Nine configurations,
k = 0 included so that speedups can be computed, at four loads up to 70% of saturation,
400 requests each after 50 of warm-up; 512-token prompts, 128 output tokens (and 32 for
three configurations: with one output length the prefill cost c1p is hard to tell apart
from the per-cycle costs).
"""

import pandas as pd

import sdbayes as sb
from sdbayes.examples import EXAMPLE_TRACES

COEFFICIENTS = sb.Coefficients(c1p=0.098, c1v=0.0137, c1d=0.00131, c2p=0.0325, c2v=0.000254,
                               c2d=0.000084)
CONFIGS = [(0, 0.0, 128), (0, 0.0, 32), (2, 0.6, 128), (4, 0.7, 128), (4, 0.7, 32),
           (4, 0.9, 128), (6, 0.8, 128), (8, 0.9, 128), (8, 0.9, 32)]
LOADS = (0.1, 0.3, 0.5, 0.7)
LABELS = dict(hardware="GPU-80GB (simulated)", verifier="Qwen3-8B", drafter="eagle3-qwen3-8b",
              method="eagle3")
OUT = EXAMPLE_TRACES


def main() -> None:
    frames = []
    for i, (k, alpha, output_len) in enumerate(CONFIGS):
        saturation = float(sb.saturation_rate(COEFFICIENTS, k=k, alpha=alpha,
                                              output_len=output_len))
        for j, load in enumerate(LOADS):
            trace = sb.simulate(COEFFICIENTS, k=k, alpha=alpha, prompt_len=512,
                                output_len=output_len,
                                rate=load * saturation, n_requests=450, seed=100 * i + j,
                                **LABELS)
            frames.append(sb.aggregate(trace.iloc[50:]))
    points = pd.concat(frames, ignore_index=True)
    points.loc[points["k"] == 0, "method"] = "none"
    sb.write_traces(points, OUT)
    print(f"{len(points)} operating points written to {OUT}")


if __name__ == "__main__":
    main()
