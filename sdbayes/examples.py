"""The bundled example: coefficients, an operating point and simulated traces.

The example coefficients are rounded from a hand solve of a few points of the source
study's vLLM sweeps of Qwen3-8B with an EAGLE drafter (512-token prompts, 128 output
tokens): synchronous latencies at (alpha, k) = (0.5, 1), (0.5, 10), (0.9, 10) for the c1
terms, saturated throughputs at the same points for the c2 terms. At k = 4, alpha = 0.7
they give 0.98 s alone (measured 1.02 s) and saturate at 13.2 req/s (13.0). They
illustrate the model (``python -m sdbayes``), seed the simulator (``sdbayes simulate``) and
the benches; they are not a calibrated posterior.
"""

from pathlib import Path

from sdbayes.model import Coefficients

EXAMPLE_COEFFICIENTS = Coefficients(
    c1p=0.070, c1v=0.014, c1d=0.0014,  # s: prefill per request; per verifier / drafter pass
    c2p=0.035, c2v=0.0004, c2d=0.00012,  # s: the same, per other request in flight
)
EXAMPLE_POINT = dict(k=4, alpha=0.7, prompt_len=512, output_len=128)

EXAMPLE_TRACES = Path(__file__).parent / "data" / "example_points.csv"
"""Operating points simulated from the example coefficients (calibration/make_example.py),
what ``sdbayes demo`` fits."""
