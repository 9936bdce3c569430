"""Property-based fuzzing of the importers: any one field of a real GuideLLM sweep or of a
`vllm bench serve` result replaced by junk either still imports to a table that holds the
schema or fails with problems that each name the file, never with another exception."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdbayes as sb
from sdbayes.importers import read_benchmark
from sdbayes.traces import OPERATING_POINT_COLUMNS

from .test_vllm_importers import result

SWEEP = next(iter(sorted((Path(__file__).resolve().parents[2] / "shared" / "data"
                          / "speculators-qwen3-8b").glob("*alpha-0.70_draft-4_*.json"))), None)
CONFIG = dict(hardware="H100", verifier="Qwen3-8B", drafter="eagle3-qwen3-8b",
              method="eagle3")
JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
    st.integers(-10**20, 10**20), st.sampled_from([0, -1, 1e308, -1e308, 1e-308]),
    st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e999", "fast", ""]),
)


def leaves(node, path=()):
    """Paths to every scalar in a parsed JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))
    else:
        yield path


def replaced(document, path, value):
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def imports_or_names_the_file(tmp_path, document, **options):
    path = tmp_path / "result.json"
    # JSON as Python writes it: NaN and Infinity as bare words, as vLLM's own writer does.
    path.write_text(json.dumps(document))
    try:
        table = read_benchmark(path, **CONFIG, **options)
    except sb.TraceError as error:
        assert error.problems and all(p.startswith(str(path)) for p in error.problems)
        assert all("\n" not in p for p in error.problems)
        return
    for column in OPERATING_POINT_COLUMNS:
        if column.kind in ("float", "int") and column.name in table:
            values = table[column.name].to_numpy(float)
            present = values[~np.isnan(values)]
            assert np.isfinite(present).all() and (present <= column.high).all(), column.name


@pytest.mark.skipif(SWEEP is None, reason="no study files in ../shared/data")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_guidellm_field_replaced_by_junk(tmp_path, data):
    sweep = json.loads(SWEEP.read_text())
    paths = list(leaves(sweep))
    path = data.draw(st.sampled_from(paths))
    imports_or_names_the_file(tmp_path, replaced(sweep, path, data.draw(JUNK)), k=4,
                              acceptance=0.7)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_vllm_field_replaced_by_junk(tmp_path, data):
    document = result(n=5)
    path = data.draw(st.sampled_from([p for p in leaves(document)
                                      if not isinstance(p[-1], int) or p[-1] < 2]))
    imports_or_names_the_file(tmp_path, replaced(document, path, data.draw(JUNK)), k=4,
                              acceptance=0.7)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.recursive(JUNK, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                             max_leaves=12))
def test_any_json_document(tmp_path, document):
    if isinstance(document, float) and math.isnan(document):
        document = None
    imports_or_names_the_file(tmp_path, document, k=4, acceptance=0.7)
