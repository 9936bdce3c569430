"""The trace schema: every class of bad input is named by file, row and column."""

import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdbayes as sb
from sdbayes.traces import OPERATING_POINT_COLUMNS


def points(n=4):
    """A valid operating-point table of n rows (distinct request rates)."""
    return pd.DataFrame({
        "hardware": ["H100x1"] * n,
        "verifier": ["Qwen3-8B"] * n,
        "drafter": ["eagle3-qwen3-8b"] * n,
        "method": ["eagle3"] * n,
        "k": [4] * n,
        "request_rate": np.arange(1.0, n + 1.0),
        "prompt_len": [512.0] * n,
        "output_len": [128.0] * n,
        "acceptance": [0.7] * n,
        "e2e_mean_s": np.linspace(1.0, 3.0, n),
        "n_requests": [100] * n,
    })


def requests(n=6, seed=0):
    """Valid per-request rows: two configurations of n requests each."""
    rng = np.random.default_rng(seed)
    frames = []
    for rate in (1.0, 2.0):
        ttft = rng.uniform(0.05, 0.1, n)
        frames.append(pd.DataFrame({
            "hardware": "H100x1", "verifier": "Qwen3-8B", "drafter": "eagle", "method": "eagle3",
            "k": 3, "request_rate": rate,
            "arrival_s": np.sort(rng.uniform(0, 10, n)),
            "prompt_len": rng.integers(100, 600, n), "output_len": rng.integers(2, 200, n),
            "ttft_s": ttft, "e2e_s": ttft + rng.uniform(0.5, 2.0, n),
            "draft_tokens": [30] * n, "accepted_tokens": rng.integers(0, 31, n),
        }))
    return pd.concat(frames, ignore_index=True)


def problems_of(df, source="t.csv"):
    with pytest.raises(sb.TraceError) as info:
        sb.validate(df, source=source)
    return info.value.problems


class TestValidTables:
    def test_canonical_types_and_defaults(self):
        df = points()
        df.loc[0, ["k", "method", "drafter", "acceptance"]] = [0, "", "", np.nan]
        df["mine"] = ["a", "b", "c", "d"]  # unknown columns are kept
        out = sb.validate(df)
        assert out.loc[0, "method"] == "none" and out.loc[0, "acceptance"] == 0.0
        assert out["k"].dtype == "Int64" and out["e2e_mean_s"].dtype == "float64"
        assert out["steady"].all() and list(out["mine"]) == ["a", "b", "c", "d"]
        assert out["concurrency"].isna().all()
        assert df.loc[0, "method"] == ""  # the input is not modified

    @pytest.mark.parametrize("suffix", [".csv", ".parquet"])
    def test_round_trip(self, tmp_path, suffix):
        df = sb.validate(points())
        df.loc[1, "steady"] = False
        path = tmp_path / f"points{suffix}"
        sb.write_traces(df, path)
        back = sb.read_traces(path)
        pd.testing.assert_frame_equal(back[df.columns], df, check_dtype=False)

    def test_parquet_without_pyarrow_is_one_line(self, tmp_path):
        """pyarrow is an extra: without it (hidden before pandas loads, as on a core
        install), Parquet is refused naming the file and the fix, and an existing file is
        left as it was."""
        import subprocess

        path = tmp_path / "points.parquet"
        sb.write_traces(points(), path)
        before = path.read_bytes()
        script = ("import sys; sys.modules['pyarrow'] = None\n"
                  "import pandas as pd, sdbayes as sb\n"
                  "for act in (lambda: sb.read_traces(sys.argv[1]),\n"
                  "            lambda: sb.write_traces(pd.read_csv(sys.argv[2]), sys.argv[1])):\n"
                  "    try:\n        act()\n"
                  "    except sb.TraceError as error:\n        print(error)\n")
        csv = tmp_path / "points.csv"
        points().to_csv(csv, index=False)
        out = subprocess.run([sys.executable, "-c", script, str(path), str(csv)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines == [f"{path}: Parquet needs pyarrow: pip install 'sdbayes[parquet]', or "
                         "use .csv"] * 2, out.stdout
        assert path.read_bytes() == before

    def test_closed_loop_rows(self):
        df = points()
        df["concurrency"] = [1, 8, pd.NA, pd.NA]
        df.loc[[0, 1], "request_rate"] = np.nan
        out = sb.validate(df)
        assert list(out["concurrency"][:2]) == [1, 8]

    def test_identical_repeated_rows_are_kept(self):
        df = pd.concat([points(2), points(2)], ignore_index=True)
        assert len(sb.validate(df)) == 4


class TestBadTables:
    def test_missing_column(self):
        problems = problems_of(points().drop(columns=["verifier", "prompt_len"]))
        assert "t.csv: missing required column 'verifier'" in problems
        assert "t.csv: missing required column 'prompt_len'" in problems

    def test_wrong_type_names_row_column_and_value(self):
        df = points().astype({"k": object, "e2e_mean_s": object})
        df.loc[2, "k"] = "four"
        df.loc[3, "e2e_mean_s"] = "1.2s"
        problems = problems_of(df)
        assert "t.csv: row 3, column 'k': not a number: 'four'" in problems
        assert "t.csv: row 4, column 'e2e_mean_s': not a number: '1.2s'" in problems

    @pytest.mark.parametrize(
        "column, value, message",
        [
            ("e2e_mean_s", np.nan, "missing value"),
            ("e2e_mean_s", -1.0, "must be positive"),
            ("e2e_mean_s", 0.0, "must be positive"),
            ("e2e_mean_s", np.inf, "infinite"),
            ("e2e_mean_s", "NaN", "missing value"),
            ("e2e_mean_s", "fast", "not a number: 'fast'"),
            ("prompt_len", 0.0, "must be positive"),
            ("output_len", -128.0, "must be positive"),
            ("acceptance", 1.2, "above 1"),
            ("acceptance", -0.1, "must not be negative"),
            ("acceptance", np.nan, "missing where k > 0"),
            ("k", -1, "must not be negative"),
            ("k", 2.5, "not a whole number"),
            ("request_rate", -3.0, "must be positive"),
            ("request_rate", np.nan, "missing: give request_rate (req/s) or concurrency"),
            ("n_requests", 0, "below 1"),
            ("hardware", "", "missing value"),
            ("method", "", "missing: name the SD method where k > 0"),
            ("ttft_mean_s", -0.1, "must be positive"),
            # Finite but no measurement: each was once fitted (e2e 1e308 s gave c1v = 90 s).
            ("e2e_mean_s", 1e308, "above 1e+06"),
            ("ttft_mean_s", 2e6, "above 1e+06"),
            ("output_len", 1e300, "above 1e+08"),
            ("request_rate", 1e308, "above 1e+06"),
            ("k", 1000, "above 256"),
        ],
    )
    def test_bad_value(self, column, value, message):
        df = points().assign(ttft_mean_s=0.05).astype({column: object})
        df.loc[1, column] = value
        assert f"t.csv: row 2, column '{column}': {message}" in problems_of(df)

    def test_both_loads_given(self):
        df = points()
        df["concurrency"] = 4
        problems = problems_of(df)
        assert problems == [
            "t.csv: rows 1-4, column 'concurrency': give request_rate or concurrency, not both"]

    def test_conflicting_duplicates(self):
        df = points(3)
        df.loc[2, "request_rate"] = df.loc[0, "request_rate"]
        assert problems_of(df) == [
            "t.csv: rows 1, 3: the same operating point with different measurements"
        ]

    def test_percentiles_out_of_order(self):
        df = points().assign(e2e_p50_s=2.0, e2e_p90_s=3.0, e2e_p99_s=2.5)
        assert problems_of(df) == ["t.csv: rows 1-4, column 'e2e_p99_s': smaller than e2e_p90_s"]

    def test_per_request_checks(self):
        df = requests()
        df.loc[0, "ttft_s"] = df.loc[0, "e2e_s"] + 1
        df.loc[1, "accepted_tokens"] = 31
        df.loc[2, "output_len"] = 0
        problems = problems_of(df)
        assert "t.csv: row 1, column 'ttft_s': larger than e2e_s" in problems
        assert "t.csv: row 2, column 'accepted_tokens': more than draft_tokens" in problems
        assert "t.csv: row 3, column 'output_len': must be positive" in problems

    def test_every_problem_reported_at_once(self):
        df = points().astype({"k": object})
        df["k"] = "x"
        df["acceptance"] = 2.0
        assert problems_of(df) == [  # one line per cause; unreadable values quoted up to 3
            "t.csv: row 1, column 'k': not a number: 'x'",
            "t.csv: row 2, column 'k': not a number: 'x'",
            "t.csv: row 3, column 'k': not a number: 'x'",
            "t.csv: row 4, column 'k': not a number",
            "t.csv: rows 1-4, column 'acceptance': above 1",
        ]

    def test_a_csv_cut_short_or_with_a_repeated_column(self, tmp_path):
        text = points().to_csv(index=False)
        cut = tmp_path / "cut.csv"
        cut.write_text(text[: text.rstrip().rfind(",")])  # inside the last row
        with pytest.raises(sb.TraceError) as info:
            sb.read_traces(cut)
        assert info.value.problems == [
            f"{cut}: row 4: fewer fields than the header and no end of line: the file was "
            "cut short"]
        repeated = tmp_path / "repeated.csv"
        header, rest = text.split("\n", 1)
        repeated.write_text(header + ",k\n" + "".join(f"{line},4\n" for line in
                                                      rest.splitlines()))
        with pytest.raises(sb.TraceError, match="column 'k' appears more than once"):
            sb.read_traces(repeated)

    def test_not_a_trace_table(self):
        assert "not a trace table" in problems_of(pd.DataFrame({"a": [1]}))[0]
        assert problems_of(points().iloc[:0]) == ["t.csv: no rows"]


class TestFiles:
    def test_no_such_file(self, tmp_path):
        with pytest.raises(sb.TraceError, match="no such file"):
            sb.read_traces(tmp_path / "missing.csv")

    def test_empty_and_header_only(self, tmp_path):
        empty = tmp_path / "empty.csv"
        empty.write_text("")
        with pytest.raises(sb.TraceError, match=re.escape(f"{empty}: empty file")):
            sb.read_traces(empty)
        header = tmp_path / "header.csv"
        points().iloc[:0].to_csv(header, index=False)
        with pytest.raises(sb.TraceError, match=re.escape(f"{header}: no rows")):
            sb.read_traces(header)

    def test_csv_rows_and_text_cells(self, tmp_path):
        path = tmp_path / "t.csv"
        text = points(2).to_csv(index=False).replace("0.7", "NaN", 1).replace("Qwen3-8B", "", 1)
        path.write_text(text)
        with pytest.raises(sb.TraceError) as info:
            sb.read_traces(path)
        assert info.value.problems == [
            f"{path}: row 1, column 'verifier': missing value",
            f"{path}: row 1, column 'acceptance': missing where k > 0",
        ]

    def test_unreadable_files(self, tmp_path):
        for name, content in [("bad.parquet", b"not parquet"), ("bad.csv", b"\xff\xfe\x00\x81"),
                              ("t.xlsx", b"PK")]:
            path = tmp_path / name
            path.write_bytes(content)
            with pytest.raises(sb.TraceError, match=re.escape(str(path))):
                sb.read_traces(path)

    def test_ragged_csv(self, tmp_path):
        path = tmp_path / "ragged.csv"
        path.write_text(points(2).to_csv(index=False) + "a,b,c,d,e,f,g,h,i,j,k,l,m,n\n")
        with pytest.raises(sb.TraceError, match="cannot read"):
            sb.read_traces(path)


class TestAggregate:
    def test_means_errors_and_acceptance(self):
        df = requests()
        out = sb.aggregate(df)
        assert len(out) == 2
        for rate, row in zip((1.0, 2.0), out.itertuples(), strict=True):
            group = df[df["request_rate"] == rate]
            assert row.request_rate == rate and row.n_requests == len(group)
            np.testing.assert_allclose(row.e2e_mean_s, group["e2e_s"].mean())
            np.testing.assert_allclose(
                row.e2e_se_s, group["e2e_s"].std(ddof=1) / math.sqrt(len(group))
            )
            per_token = (group["e2e_s"] - group["ttft_s"]) / (group["output_len"] - 1)
            np.testing.assert_allclose(row.tpot_mean_s, per_token.mean())
            # alpha reproduces the measured mean acceptance length 1 + k * accepted / drafted
            length = 1 + 3 * group["accepted_tokens"].sum() / group["draft_tokens"].sum()
            np.testing.assert_allclose(sb.tokens_per_step(3.0, row.acceptance), length,
                                       rtol=1e-10)

    def test_given_acceptance_is_kept(self):
        out = sb.aggregate(requests().assign(acceptance=0.6))
        assert (out["acceptance"] == 0.6).all()

    def test_rejects_operating_points(self):
        with pytest.raises(sb.TraceError, match="per-request"):
            sb.aggregate(points())


# Property-based fuzzing: no malformed table passes silently, and nothing but TraceError escapes.

CELL = st.one_of(
    st.none(), st.text(max_size=5), st.integers(-5, 5), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", " ", "nan", "1e400"]),
)


def holds_schema(df):
    """The invariants every validated operating-point table satisfies."""
    for col in OPERATING_POINT_COLUMNS:
        if col.name not in df.columns:
            continue
        values = df[col.name]
        if col.kind in ("float", "int"):
            x = values.astype("Float64").to_numpy(float, na_value=np.nan)
            present = x[~np.isnan(x)]
            assert np.all(np.isfinite(present))
            assert np.all(present > col.low if col.low_open else present >= col.low)
            assert np.all(present <= col.high)
            if col.required:
                assert not np.isnan(x).any()
    assert (df["request_rate"].notna() ^ df["concurrency"].notna()).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_cells(data):
    df = points(3).astype(object)
    for _ in range(data.draw(st.integers(1, 4))):
        row = data.draw(st.integers(0, 2))
        column = data.draw(st.sampled_from(list(df.columns)))
        df.loc[row, column] = data.draw(CELL)
    try:
        out = sb.validate(df)
    except sb.TraceError as err:
        assert err.problems and all(p.startswith("<table>") for p in err.problems)
    else:
        holds_schema(out)


CORRUPTIONS = {
    "drop a required column": lambda df, r, c: df.drop(columns=c),
    "blank a required cell": lambda df, r, c: df.assign(**{c: df[c].where(df.index != r, None)}),
    "text in a number column": lambda df, r, c: df.astype({c: object}).assign(
        **{c: df[c].astype(object).where(df.index != r, "abc")}),
}
REQUIRED_NUMBERS = [c.name for c in OPERATING_POINT_COLUMNS
                    if c.required and c.kind != "str"]


@settings(max_examples=100, deadline=None)
@given(
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
    row=st.integers(0, 3),
    column=st.sampled_from(REQUIRED_NUMBERS),
    suffix=st.sampled_from([".csv", ".parquet"]),
)
def test_fuzz_corruptions_are_named(tmp_path_factory, corruption, row, column, suffix):
    df = CORRUPTIONS[corruption](points(), row, column)
    path = tmp_path_factory.mktemp("fuzz") / f"t{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(path)
    with pytest.raises(sb.TraceError) as info:
        sb.read_traces(path)
    assert any(f"'{column}'" in p and str(path) in p for p in info.value.problems)
    if corruption != "drop a required column":
        assert any(f"row {row + 1}," in p for p in info.value.problems)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300))
def test_fuzz_arbitrary_csv_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        out = sb.read_traces(path)
    except sb.TraceError:
        return
    assert len(out) > 0


def test_long_tables_read_by_value_as_row_by_row(monkeypatch):
    """A long column of text is read once per distinct value: the same table, the same
    problems at the same rows, as reading each row (a per-request table of 12,000 rows,
    text where numbers belong, bad values among good ones); a bad value quoted once with
    all the rows that hold it."""
    df = requests(n=6_000).astype({"e2e_s": object, "k": str, "hardware": object})
    df.loc[[5, 7_000], "e2e_s"] = "slow"
    df.loc[11, "e2e_s"] = " n/a "
    df.loc[[40, 8_000], "k"] = "-1"
    df.loc[9_000, "hardware"] = "  "
    assert len(df) >= sb.traces._BY_VALUE_ROWS
    by_value = problems_of(df)
    quoted = "t.csv: rows 6, 7001, column 'e2e_s': not a number: 'slow'"
    assert quoted in by_value
    monkeypatch.setattr(sb.traces, "_BY_VALUE_ROWS", len(df) + 1)
    row_by_row = problems_of(df)
    assert [p for p in row_by_row if "'slow'" not in p] == [p for p in by_value if p != quoted]
    assert [p for p in row_by_row if "'slow'" in p] == [
        "t.csv: row 6, column 'e2e_s': not a number: 'slow'",
        "t.csv: row 7001, column 'e2e_s': not a number: 'slow'"]
    good = requests(n=6_000).astype({"e2e_s": str, "k": str})
    row_by_row = sb.validate(good)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(sb.validate(good), row_by_row)
