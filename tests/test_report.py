"""The report folder: one set of plots per group, and nothing written for traces of a group
the posterior was not fitted to."""

import pandas as pd
import pytest

import sdbayes as sb
from sdbayes.report import write_report

from .test_inference import TRUE, model_traces

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion
OTHER = ("A100", "Qwen3-8B", "eagle", "eagle3")


@pytest.fixture(scope="module")
def two_groups():
    """Traces of two GPUs and an SVI fit of both (fast; the report does not care how)."""
    scaled = sb.Coefficients(*(1.2 * c for c in TRUE))
    points = pd.concat([model_traces(0), model_traces(1, OTHER, scaled)], ignore_index=True)
    posterior = sb.fit(points, method="svi", svi_steps=1500, num_samples=200, seed=0,
                       progress=False)
    return posterior, points


def test_each_group_gets_its_own_plots(two_groups, tmp_path):
    posterior, points = two_groups
    text = write_report(posterior, points, tmp_path).read_text()
    for g, label in enumerate(posterior.groups):
        assert f"# Group {g}: {label}" in text
        for name in ("latency_vs_rate", "collapse", "speedup_vs_rate", "k_schedule", "pair"):
            assert (tmp_path / f"{name}_group{g}.png").stat().st_size > 10_000
            assert f"({name}_group{g}.png)" in text
    assert "approximate (SVI)" in text  # the fit's verdict


def test_one_group_of_several_gets_plain_names(two_groups, tmp_path):
    posterior, points = two_groups
    only = points[points["hardware"] == "A100"]
    text = write_report(posterior, only, tmp_path).read_text()
    assert (tmp_path / "latency_vs_rate.png").is_file() and "# Group" not in text


def test_traces_of_another_group_write_nothing(two_groups, tmp_path):
    posterior, _ = two_groups
    stranger = model_traces(2, ("L40S", "Qwen3-8B", "eagle", "eagle3"))
    with pytest.raises(ValueError, match=r"L40S \| Qwen3-8B \| eagle \(eagle3\) not in the p"):
        write_report(posterior, stranger, tmp_path / "report")
    assert not (tmp_path / "report").exists()
