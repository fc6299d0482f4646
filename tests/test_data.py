"""The CTR data loaders on tiny files written per test (no data file is ever committed)."""

import dataclasses
import json
import os
import warnings

import pytest
import torch

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from utils import line_by_line_encode

from pep_kernels.data import (
    AVAZU_FIELD_NAMES,
    CRITEO_FIELD_NAMES,
    BagField,
    CTRData,
    criteo_integer_token,
    load_avazu,
    load_criteo,
    load_movielens_1m,
    load_movielens_100k,
    make_synthetic_ctr,
    movielens_100k_dir,
    split,
    write_criteo_like_file,
)
from pep_kernels.data import _streaming

# ---------------------------------------------------------------------------------------- Criteo


def criteo_line(label=0, ints=(), cats=()):
    """One train.txt line; the integer columns not given are 1, the categorical ones "a"."""
    ints = list(ints) + ["1"] * (13 - len(ints))
    cats = list(cats) + ["a"] * (26 - len(cats))
    return "\t".join([str(label)] + ints + cats) + "\n"


def write(path, lines):
    path.write_text("".join(lines), encoding="latin-1")
    return path


@pytest.mark.parametrize("raw, token", [("", ""), ("-1", "-3"), ("0", "-2"), ("2", "0"), ("3", "1"),
                                        ("4", "1"), ("100", "21"), ("109", "22")])
def test_criteo_integer_rule(raw, token):
    assert criteo_integer_token(raw) == token


@pytest.mark.parametrize("raw", ["1.5", "abc", " 5", "1_000", "+"])
def test_criteo_integer_rule_rejects_non_integers(raw):
    with pytest.raises(ValueError, match="not an integer"):
        criteo_integer_token(raw)


def test_criteo_integers_share_ids_exactly_when_their_tokens_match(tmp_path):
    raw_values = ["", "-1", "0", "2", "3", "4", "100", "105"]  # 3/4 -> 1 and 100/105 -> 21
    path = write(tmp_path / "train.txt", [criteo_line(ints=[v]) for v in raw_values])
    data = load_criteo(path, min_count=1)
    ids = dict(zip(raw_values, data.x[:, 0].tolist()))
    assert ids["3"] == ids["4"] and ids["100"] == ids["105"]
    assert len({ids[v] for v in ["", "-1", "0", "2", "3", "100"]}) == 6
    assert data.field_dims[0] == 6


def test_criteo_rare_values_share_one_oov_id(tmp_path):
    c1 = ["a"] * 3 + ["b"] * 2 + ["c", "d"]
    labels = [1, 0, 1, 0, 0, 1, 0]
    path = write(tmp_path / "train.txt", [criteo_line(y, cats=[v]) for y, v in zip(labels, c1)])
    data = load_criteo(path, min_count=2)
    assert data.field_names == list(CRITEO_FIELD_NAMES) and len(data.field_dims) == 39
    # Frequent values by decreasing count, then one shared id for "c" and "d".
    assert data.x[:, 13].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.field_dims[13] == 3
    assert data.field_dims[14] == 1  # C2 is always "a": no rare value, so no OOV id
    assert data.y.tolist() == labels and data.y.dtype == torch.float32 and data.x.dtype == torch.int64
    assert load_criteo(path, min_count=1).field_dims[13] == 4
    assert load_criteo(path, min_count=4).field_dims[13] == 1  # everything is rare


def test_criteo_empty_categorical_is_its_own_value(tmp_path):
    path = write(tmp_path / "train.txt", [criteo_line(cats=["a"] * 25 + [v]) for v in ["", "", "x"]])
    data = load_criteo(path, min_count=1)
    assert data.x[:, 38].tolist() == [0, 0, 1] and data.field_dims[38] == 2


def test_criteo_max_rows_reads_the_first_examples(tmp_path):
    path = write(tmp_path / "train.txt", [criteo_line(y) for y in [1, 0, 1, 1]])
    assert load_criteo(path, min_count=1, max_rows=2).y.tolist() == [1, 0]


def test_criteo_second_load_comes_from_cache_until_the_file_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "train.txt", [criteo_line(y, cats=[v]) for y, v in zip([1, 0, 1], "aab")])
    cache = tmp_path / "cache"
    first = load_criteo(path, min_count=2, cache_dir=cache)
    (entry,) = cache.iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["field_dims"] == first.field_dims and meta["params"]["min_count"] == 2
    assert {p.name for p in entry.iterdir()} == {"x.npy", "y.npy", "meta.json"}

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded the file again instead of using the cache")

    monkeypatch.setattr(_streaming, "_encode", no_encoding)
    cached = load_criteo(path, min_count=2, cache_dir=cache)
    assert torch.equal(cached.x, first.x) and torch.equal(cached.y, first.y)
    assert cached.field_dims == first.field_dims and cached.field_names == first.field_names
    with pytest.raises(AssertionError, match="again"):  # other parameters: another entry
        load_criteo(path, min_count=1, cache_dir=cache)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="again"):  # same size, newer modification time
        load_criteo(path, min_count=2, cache_dir=cache)

    monkeypatch.undo()
    write(path, [criteo_line(y) for y in [1, 0, 1, 0, 0]])
    assert len(load_criteo(path, min_count=2, cache_dir=cache)) == 5
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("bad_line, problem", [
    ("\t".join(["1"] * 39) + "\n", "expected 40 tab-separated columns"),
    (criteo_line(ints=["1", "1.5"]), r"column 'I2' \(numeric\) is '1.5', expected an integer or empty"),
    (criteo_line(label=2), r"column 'label' \(label\) is '2', expected 0 or 1"),
    ("\n", "expected 40 tab-separated columns .*, found 1"),
])  # fmt: skip
def test_criteo_malformed_line_names_file_and_line(tmp_path, bad_line, problem):
    path = write(tmp_path / "train.txt", [criteo_line(), criteo_line(), bad_line, criteo_line()])
    with pytest.raises(ValueError, match=rf"train\.txt, line 3: {problem}") as error:
        load_criteo(path, min_count=1)
    assert str(path) in str(error.value)


def test_criteo_skip_mode_counts_and_warns_also_from_cache(tmp_path):
    lines = [criteo_line(1), criteo_line(label="x"), criteo_line(0), "1\t2\n", criteo_line(ints=["?"]), criteo_line(1)]
    path = write(tmp_path / "train.txt", lines)
    for _ in range(2):  # builds the cache, then loads it
        with pytest.warns(UserWarning, match=r"skipped 3 malformed lines; the first: .*line 2: column 'label' "
                                             r"\(label\) is 'x'"):
            data = load_criteo(path, min_count=1, cache_dir=tmp_path / "cache", on_error="skip")
        assert data.skipped_lines == 3 and data.y.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="line 2"):  # a raise-mode load does not reuse the skipping cache
        load_criteo(path, min_count=1, cache_dir=tmp_path / "cache")


def test_criteo_rejects_bad_arguments(tmp_path):
    path = write(tmp_path / "train.txt", [criteo_line()])
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_criteo(path, on_error="ignore")
    with pytest.raises(ValueError, match="min_count must be an integer >= 1, got 0"):
        load_criteo(path, min_count=0)
    with pytest.raises(FileNotFoundError, match="criteo data file not found"):
        load_criteo(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no well-formed data rows"):
        load_criteo(write(tmp_path / "bad.txt", ["oops\n"]), on_error="skip")


# The column-wise encoder against the line-by-line one it replaced (tests/utils.py): the same ids,
# labels, field sizes and skipped lines on the same files, read in one chunk or in many.


@pytest.fixture(scope="module")
def criteo_like(tmp_path_factory):
    """(path, planted click probabilities) of 3000 generated Criteo lines."""
    path = tmp_path_factory.mktemp("criteo") / "train.txt"
    return path, write_criteo_like_file(path, 3000, seed=3, chunk_lines=1000)


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Many chunks: a few dozen lines per chunk, several parse blocks per chunk and vocabularies
    merged every few chunks, so that values, counts and line numbers cross chunk boundaries."""
    if request.param == "many chunks":
        monkeypatch.setattr(_streaming, "CHUNK_BYTES", 6000)
        monkeypatch.setattr(_streaming, "_PARSE_BLOCK_BYTES", 1500)
        monkeypatch.setattr(_streaming, "_PENDING_ROWS", 70)
    return request.param


def assert_same_encoding(data, path, kind, **options):
    x, y, field_dims, skipped = line_by_line_encode(path, kind, **options)
    assert data.x.dtype == torch.int64 and data.y.dtype == torch.float32
    assert np.array_equal(data.x.numpy(), x) and np.array_equal(data.y.numpy(), y)
    assert data.field_dims == field_dims and data.skipped_lines == skipped


@pytest.mark.parametrize("min_count, max_rows", [(1, None), (3, 1999), (10, None)])
def test_criteo_encoder_equals_the_line_by_line_encoder(criteo_like, chunking, min_count, max_rows):
    path, _ = criteo_like
    data = load_criteo(path, min_count=min_count, max_rows=max_rows)
    assert len(data) == (max_rows or 3000) and data.field_names == list(CRITEO_FIELD_NAMES)
    assert_same_encoding(data, path, "criteo", min_count=min_count, max_rows=max_rows)


def test_criteo_encoder_equals_the_line_by_line_encoder_on_odd_tokens(tmp_path, chunking):
    # latin-1 bytes, UTF-8 sequences, quotes (not quoting: Criteo is split on tabs only), spaces,
    # empty tokens, CRLF endings, a last line without its newline, ties between rare values.
    odd = ["\xe9t\xe9", "caf\u00e9".encode().decode("latin-1"), '"quoted"', 'a"b', " lead", "trail ", "", "x y"]
    lines = []
    for i in range(400):
        cats = [odd[(i * (f + 1)) % len(odd)] + ("" if f % 3 else str(i % 7)) for f in range(26)]
        ints = [["", "0", "-1", "2", "3", "99", "123456789012345678901234567890"][(i + j) % 7] for j in range(13)]
        lines.append(criteo_line(i % 2, ints, cats).replace("\n", "\r\n" if i % 5 == 0 else "\n"))
    path = write(tmp_path / "train.txt", lines)
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    for min_count in (1, 4):
        assert_same_encoding(load_criteo(path, min_count=min_count), path, "criteo", min_count=min_count)


def test_criteo_encoder_skips_the_lines_the_line_by_line_encoder_skipped(criteo_like, tmp_path, chunking):
    lines = criteo_like[0].read_text(encoding="latin-1").splitlines(keepends=True)[:1500]
    bad = ["\n", "\r\n", "\t".join(["1"] * 39) + "\n", "\t".join(["1"] * 41) + "\n", criteo_line(label=2),
           criteo_line(label=""), criteo_line(ints=["1.5"]), criteo_line(ints=["", "abc"]), criteo_line(ints=[" 5"]),
           "garbage\n"]
    for i, line in enumerate(bad):
        lines.insert(37 + 131 * i, line)
    path = write(tmp_path / "train.txt", lines)
    with pytest.raises(ValueError, match=r"train\.txt, line 38: expected 40 tab-separated columns .*, found 1"):
        load_criteo(path, min_count=2)
    for max_rows in (None, 1000):  # 1000 rows end before the last bad lines: those are not read, nor counted
        with pytest.warns(UserWarning, match=r"skipped \d+ malformed lines; the first: .*line 38: expected 40"):
            data = load_criteo(path, min_count=2, max_rows=max_rows, on_error="skip")
        assert data.skipped_lines == (len(bad) if max_rows is None else 8)
        assert_same_encoding(data, path, "criteo", min_count=2, max_rows=max_rows, on_error="skip")


def test_criteo_errors_name_the_line_in_any_chunk(criteo_like, tmp_path, chunking):
    lines = criteo_like[0].read_text(encoding="latin-1").splitlines(keepends=True)
    lines[2345] = criteo_line(ints=["7", "7", "seven"])
    path = write(tmp_path / "train.txt", lines)
    with pytest.raises(ValueError, match=r"train\.txt, line 2346: column 'I3' \(numeric\) is 'seven', expected an "
                                         r"integer or empty \(pass on_error='skip'"):
        load_criteo(path)


# Lines of a Criteo file, mostly well-formed, with damage: tokens of odd bytes, missing or extra
# columns, bad labels and integers, empty lines.
_TOKEN = st.one_of(st.sampled_from(["", "a", "b", "0", "1", "-1", "3", "99", "x y", '"', "\xe9"]),
                   st.text(st.characters(codec="latin-1", exclude_characters="\t\n\r"), max_size=4))
_CRITEO_LINE = st.tuples(st.sampled_from(["0", "1", "2", ""]), st.lists(_TOKEN, min_size=13, max_size=13),
                         st.lists(_TOKEN, min_size=24, max_size=28)).map(lambda t: "\t".join([t[0], *t[1], *t[2]]))


@settings(max_examples=settings.default.max_examples * 2)
@given(lines=st.lists(st.one_of(_CRITEO_LINE, st.just("")), min_size=1, max_size=60), min_count=st.integers(1, 3),
       crlf=st.booleans(), newline_at_end=st.booleans())
def test_criteo_encoder_equals_the_line_by_line_encoder_on_damaged_files(tmp_path_factory, lines, min_count, crlf,
                                                                         newline_at_end):
    # Criteo lines have 40 columns; the strategy makes 38 to 42, with bad labels and integers often.
    # (No "\r" inside a line: the line-by-line encoder kept it in a token, this one refuses the line.)
    path = tmp_path_factory.mktemp("fuzz") / "train.txt"
    text = ("\r\n" if crlf else "\n").join(lines) + ("\n" if newline_at_end else "")
    path.write_bytes(text.encode("latin-1"))
    try:
        x, y, field_dims, skipped = line_by_line_encode(path, "criteo", min_count=min_count, on_error="skip")
    except ValueError:  # no well-formed line: the oracle has no columns to count
        x = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about skipped lines
        if x is None or len(x) == 0:
            with pytest.raises(ValueError, match="no well-formed data rows"):
                load_criteo(path, min_count=min_count, on_error="skip")
            return
        data = load_criteo(path, min_count=min_count, on_error="skip")
    assert np.array_equal(data.x.numpy(), x) and np.array_equal(data.y.numpy(), y)
    assert data.field_dims == field_dims and data.skipped_lines == skipped


def test_criteo_carriage_return_inside_a_line_is_malformed(tmp_path):
    # pyarrow would end a line there; the line-by-line encoder kept it inside the token
    path = write(tmp_path / "train.txt", [criteo_line(1), criteo_line(0, cats=["a\rb"]), criteo_line(1)])
    with pytest.raises(ValueError, match=r"line 2: a carriage return \(\\r\) inside the line"):
        load_criteo(path, min_count=1)
    with pytest.warns(UserWarning, match="skipped 1 malformed lines"):
        assert load_criteo(path, min_count=1, on_error="skip").y.tolist() == [1, 1]


def test_criteo_like_file_has_its_planted_signal(criteo_like):
    path, planted = criteo_like
    data = load_criteo(path, min_count=1)
    assert planted.dtype == np.float32 and planted.shape == (3000,) and len(data) == 3000
    assert 0.2 < data.y.mean().item() < 0.3  # positive_rate 0.25; the std of the mean is 0.008
    assert 0.75 < roc_auc_score(data.y.numpy(), planted) < 0.85  # target_auc 0.8; its std is about 0.01
    assert min(data.field_dims[13:]) >= 2 and max(data.field_dims) > 1000  # C9 has 3 values, C3 a long tail
    again = tmp = path.with_name("again.txt")
    assert np.array_equal(write_criteo_like_file(tmp, 3000, seed=3, chunk_lines=1000), planted)
    assert again.read_bytes() == path.read_bytes()


# ----------------------------------------------------------------------------------------- Avazu

AVAZU_HEADER = ["id", "click"] + list(AVAZU_FIELD_NAMES)


def avazu_line(columns, row_id, click, hour="14102100", site_id="s1"):
    values = {name: f"{name}_v" for name in AVAZU_FIELD_NAMES}
    values.update(id=str(row_id), click=str(click), hour=hour, site_id=site_id)
    return ",".join(values[name] for name in columns) + "\n"


@pytest.mark.parametrize("columns", [AVAZU_HEADER, AVAZU_HEADER[::-1]], ids=["canonical", "reordered"])
def test_avazu_reads_fields_by_header_and_drops_id(tmp_path, columns):
    rows = [(0, "14102100", "s1"), (1, "14102100", "s2"), (1, "14102101", "s1")]
    lines = [",".join(columns) + "\n"] + [avazu_line(columns, 10**6 + i, *row) for i, row in enumerate(rows)]
    data = load_avazu(write(tmp_path / "train", lines), min_count=1)
    assert data.field_names == list(AVAZU_FIELD_NAMES) and len(data.field_dims) == 22
    assert data.y.tolist() == [0, 1, 1]
    assert data.x[:, 0].tolist() == [0, 0, 1] and data.field_dims[0] == 2  # hour, raw
    assert data.x[:, 3].tolist() == [0, 1, 0]  # site_id
    assert data.field_dims[4:] == [1] * 18
    assert load_avazu(tmp_path / "train", min_count=2).field_dims[:4] == [2, 1, 1, 2]  # rare values merged


def test_avazu_rejects_a_foreign_header(tmp_path):
    path = write(tmp_path / "train", [",".join(AVAZU_HEADER[:-1] + ["extra"]) + "\n"])
    with pytest.raises(ValueError, match=r"line 1: expected the Avazu header.*missing \['C21'\], unexpected \['extra'\]"):
        load_avazu(path, on_error="skip")


def test_avazu_malformed_lines_count_the_header(tmp_path):
    good = avazu_line(AVAZU_HEADER, 1, 1)
    lines = [",".join(AVAZU_HEADER) + "\n", good, good.replace(",1,", ",yes,", 1), good.rstrip("\n") + ",x\n", good]
    path = write(tmp_path / "train", lines)
    with pytest.raises(ValueError, match=r"train, line 3: column 'click' \(label\) is 'yes', expected 0 or 1"):
        load_avazu(path, min_count=1)
    with pytest.warns(UserWarning, match="skipped 2 malformed lines"):
        data = load_avazu(path, min_count=1, on_error="skip")
    assert data.skipped_lines == 2 and len(data) == 2


def avazu_like(path, num_lines, header, seed=0):
    """Random Avazu lines: Zipf-like tokens per field, so that counts tie and values are rare."""
    rng = np.random.default_rng(seed)
    lines = [",".join(header) + "\n"]
    for i in range(num_lines):
        values = {name: f"{name[:2]}{int(rng.zipf(1.5)) % (5 + 40 * f)}" for f, name in enumerate(AVAZU_FIELD_NAMES)}
        values.update(id=str(10**18 + i), click=str(int(rng.random() < 0.2)))
        lines.append(",".join(values[name] for name in header) + "\n")
    return write(path, lines)


@pytest.mark.parametrize("columns", [AVAZU_HEADER, AVAZU_HEADER[::-1]], ids=["canonical", "reordered"])
def test_avazu_encoder_equals_the_line_by_line_encoder(tmp_path, chunking, columns):
    path = avazu_like(tmp_path / "train", 1500, columns)
    lines = path.read_text().splitlines(keepends=True)
    lines[700:700] = ["1,2,3\n", "\n", lines[5].replace(",0,", ",yes,", 1).replace(",1,", ",yes,", 1)]
    write(path, lines)
    for min_count, max_rows in ((1, None), (2, 1000), (10, None)):
        with pytest.warns(UserWarning, match=r"skipped 3 malformed lines; the first: .*train, line 701: expected 24 "
                                             r"comma-separated columns, found 3"):
            data = load_avazu(path, min_count=min_count, max_rows=max_rows, on_error="skip")
        assert data.field_names == list(AVAZU_FIELD_NAMES)
        assert_same_encoding(data, path, "avazu", min_count=min_count, max_rows=max_rows, on_error="skip")


# ------------------------------------------------------------------------------------- MovieLens


def write_ml1m(directory, ratings):
    directory.mkdir()
    write(directory / "users.dat", ["1::F::1::10::48067\n", "2::M::56::16::70072\n", "3::M::25::15::55117-1234\n"])
    write(directory / "movies.dat", ["1::Toy Story (1995)::Animation|Children's|Comedy\n",
                                      "2::Amélie (2001)::Romance|Comedy\n",
                                      "3::Comedy Drama (1999) ::Drama|Comedy\n"])  # fmt: skip
    write(directory / "ratings.dat", [f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings])
    return directory


def test_movielens_1m_label_rule_and_side_fields(tmp_path):
    ratings = [(1, 1, 5, 1000), (1, 2, 3, 900), (2, 2, 1, 1001), (2, 3, 4, 1100), (3, 1, 2, 1000)]
    directory = write_ml1m(tmp_path / "ml-1m", ratings)
    data = load_movielens_1m(directory)
    assert data.field_names == ["timestamp_bucket", "gender", "age", "occupation", "zip_code", "year", "genres"]
    assert data.y.tolist() == [1, 0, 1, 0]  # the rating of 3 is dropped, label = rating > 3
    # Seconds since the first rating (900, the dropped one counts): 100 -> 21, 101 -> 21, 200 -> 28.
    assert data.x[:, 0].tolist() == [0, 0, 1, 0]
    assert data.x[:, 1].tolist() == [0, 1, 1, 1]  # F, M
    assert data.x[:, 2].tolist() == [0, 2, 2, 1]  # age codes 1 < 25 < 56
    assert data.x[:, 5].tolist() == [0, 2, 1, 0]  # years 1995 < 1999 < 2001, trailing space tolerated
    # "Romance|Comedy" and "Drama|Comedy" are different sets; the latin-1 title parsed.
    assert data.field_dims == [2, 2, 3, 3, 3, 3, 3]

    with_ids = load_movielens_1m(directory, include_ids=True)
    assert with_ids.field_names[:2] == ["user_id", "item_id"] and with_ids.field_dims[:2] == [3, 3]
    assert torch.equal(with_ids.x[:, 2:], data.x)


def test_movielens_1m_genre_set_ignores_listing_order(tmp_path):
    directory = write_ml1m(tmp_path / "ml-1m", [(1, 2, 5, 1), (1, 3, 5, 2)])
    write(directory / "movies.dat", ["2::A (2001)::Drama|Comedy\n", "3::B (2001)::Comedy|Drama\n"])
    assert load_movielens_1m(directory).field_dims[-1] == 1


def test_movielens_1m_errors_name_file_and_line(tmp_path):
    directory = write_ml1m(tmp_path / "ml-1m", [(1, 1, 5, 1), (9, 1, 5, 2)])
    with pytest.raises(ValueError, match=r"ratings\.dat, line 2: user '9' is not in .*users\.dat"):
        load_movielens_1m(directory)
    write(directory / "ratings.dat", ["1::1::5::1\n", "1::1::five::2\n"])
    with pytest.raises(ValueError, match=r"ratings\.dat, line 2: rating is 'five', expected a number"):
        load_movielens_1m(directory)
    write(directory / "ratings.dat", ["1::1::5\n"])
    with pytest.raises(ValueError, match=r"line 1: expected 4 '::'-separated columns, found 3"):
        load_movielens_1m(directory)
    (directory / "movies.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['movies\.dat'\] not found"):
        load_movielens_1m(directory)


def test_folder_given_for_a_file_and_file_for_a_folder(tmp_path):
    with pytest.raises(ValueError, match="criteo data file .* is a folder; expected the data file itself"):
        load_criteo(tmp_path)
    with pytest.raises(ValueError, match="avazu data file .* is a folder; expected the data file itself"):
        load_avazu(tmp_path)
    with pytest.raises(FileNotFoundError, match="avazu data file not found"):
        load_avazu(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs the folder of the unzipped ml-1m archive; .* is a file"):
        load_movielens_1m(write(tmp_path / "ratings.dat", ["1::1::5::1\n"]))


def test_movielens_100k_from_recbole():
    try:
        movielens_100k_dir()  # finds recbole with importlib.util.find_spec, without importing it
    except FileNotFoundError as missing:
        pytest.skip(f"MovieLens-100K is not installed: {missing}")
    data = load_movielens_100k()
    assert len(data) == 72_855
    assert 0.75 < data.y.mean().item() < 0.77
    assert len(data.field_dims) == 9 and data.field_dims[:2] == [943, 1642]
    side_only = load_movielens_100k(include_ids=False)
    assert len(side_only.field_dims) == 7 and side_only.field_names[0] == "timestamp_bucket"
    assert torch.equal(side_only.x, data.x[:, 2:]) and torch.equal(side_only.y, data.y)


# ---------------------------------------------------------------------------------- CTRData, split


def synthetic_data(n):
    return CTRData.from_synthetic(make_synthetic_ctr(n, [5, 7], seed=1))


def examples(*parts):
    return sorted(row + [label] for part in parts for row, label in zip(part.x.tolist(), part.y.tolist()))


def test_split_sizes_partition_and_determinism():
    data = synthetic_data(1000)
    train, val, test = split(data, seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert examples(train, val, test) == examples(data)  # every example exactly once
    assert train.field_dims == data.field_dims and train.field_names == data.field_names
    assert torch.equal(split(data, seed=3)[0].x, train.x)
    assert not torch.equal(split(data, seed=4)[0].x, train.x)
    assert [len(part) for part in split(synthetic_data(100), fractions=(0.29, 0.71, 0.0))] == [29, 71, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        split(data, fractions=(0.8, 0.1, 0.2))


def test_ctr_data_rejects_ids_outside_field_dims():
    data = synthetic_data(10)
    with pytest.raises(ValueError, match=r"field 'field_1' has ids in \[\d+, \d+\], expected 0 \.\. 2"):
        CTRData(data.x, data.y, [5, 3], data.field_names)
    with pytest.raises(ValueError, match="x must be a 2-D int64 tensor"):
        CTRData(data.x.int(), data.y, data.field_dims, data.field_names)


def bag_of(i):
    """Example i's bag in the tests below: its length and ids follow from i (empty when i % 4 == 0)."""
    return [(i * 7 + k) % 5 for k in range(i % 4)]


def data_with_bags_and_dense(n):
    """Example i has id i in its one field, bag_of(i) and dense features (i, -i / 2)."""
    bags = [bag_of(i) for i in range(n)]
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    genres = BagField("genres", 5, torch.tensor([v for b in bags for v in b], dtype=torch.int64), offsets)
    dense = torch.tensor([[i, -i / 2] for i in range(n)], dtype=torch.float32)
    return CTRData(torch.arange(n).unsqueeze(1), (torch.arange(n) % 3 == 0).float(), [n], ["example"],
                   bags=[genres], dense=dense, dense_names=["count", "half"])


def test_loaders_default_to_no_bags_and_no_dense():
    data = synthetic_data(10)
    assert data.bags == [] and data.dense is None and data.dense_names == []
    assert all(part.bags == [] and part.dense is None for part in split(data))


def test_split_keeps_each_examples_bag_and_dense_row():
    data = data_with_bags_and_dense(101)
    parts = split(data, seed=5)
    assert sum(len(part) for part in parts) == 101
    for part in parts:
        (bag,) = part.bags
        assert bag.name == "genres" and bag.num_values == 5 and len(bag) == len(part)
        assert part.dense_names == ["count", "half"]
        for row, i in enumerate(part.x[:, 0].tolist()):
            assert bag.values[bag.offsets[row]:bag.offsets[row + 1]].tolist() == bag_of(i)
            assert part.dense[row].tolist() == [i, -i / 2]
        assert int(bag.offsets[-1]) == len(bag.values) == sum(len(bag_of(i)) for i in part.x[:, 0].tolist())


def test_bag_take_repeats_empty_bags_and_no_rows():
    bag = data_with_bags_and_dense(9).bags[0]
    picked = bag.take(torch.tensor([3, 4, 3, 8, 0]))  # 4, 8 and 0 have empty bags; 3 twice
    assert picked.offsets.tolist() == [0, 3, 3, 6, 6, 6]
    assert picked.values.tolist() == bag_of(3) * 2
    none = bag.take(torch.tensor([], dtype=torch.int64))
    assert none.offsets.tolist() == [0] and none.values.tolist() == [] and len(none) == 0


def test_bag_field_rejects_bad_offsets_and_ids():
    values, offsets = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match=r"bag 'b': offsets must start at 0 and end at len\(values\) = 3"):
        BagField("b", 3, values, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"end at len\(values\) = 3, got \[0\] \.\.\. \[2\]"):
        BagField("b", 3, values, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"offsets must start at 0"):
        BagField("b", 3, values, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"non-decreasing, got offsets\[1\] = 2 > offsets\[2\] = 1"):
        BagField("b", 3, values, torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match=r"bag 'b' has ids in \[0, 2\], expected 0 \.\. 1"):
        BagField("b", 2, values, offsets)
    with pytest.raises(ValueError, match=r"bag 'b' has ids in \[-1, 1\]"):
        BagField("b", 3, torch.tensor([0, -1, 1]), offsets)
    with pytest.raises(ValueError, match="values must be a 1-D int64 tensor, got torch.int32"):
        BagField("b", 3, values.int(), offsets)
    with pytest.raises(ValueError, match="offsets must be a 1-D int64 tensor"):
        BagField("b", 3, values, offsets.unsqueeze(0))
    with pytest.raises(ValueError, match="num_values must be an int >= 1, got 0"):
        BagField("b", 0, values[:0], torch.tensor([0]))


def test_ctr_data_rejects_bags_and_dense_that_do_not_fit():
    data = data_with_bags_and_dense(6)
    bag, dense = data.bags[0], data.dense
    short_bag = bag.take(torch.arange(5))
    with pytest.raises(ValueError, match=r"bag 'genres' has 5 bags .*, expected one per example: 6"):
        dataclasses.replace(data, bags=[short_bag])
    with pytest.raises(ValueError, match="bags must hold BagField objects, got tuple"):
        dataclasses.replace(data, bags=[(bag.values, bag.offsets)])
    with pytest.raises(ValueError, match=r"dense has shape \(5, 2\), expected \(6, 2\)"):
        dataclasses.replace(data, dense=dense[:5])
    with pytest.raises(ValueError, match=r"dense has shape \(6, 2\), expected \(6, 1\)"):
        dataclasses.replace(data, dense_names=["count"])
    with pytest.raises(ValueError, match="dense must be a 2-D float32 tensor, got torch.float64"):
        dataclasses.replace(data, dense=dense.double())
    with pytest.raises(ValueError, match=r"dense_names \['count', 'half'\] given without dense features"):
        dataclasses.replace(data, dense=None)
    with pytest.raises(ValueError, match="dense feature 'half' is nan in example 4, expected a finite number"):
        dataclasses.replace(data, dense=dense.index_put((torch.tensor(4), torch.tensor(1)), torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match=r"distinct across fields, bags and dense features; repeated: \['genres'\]"):
        dataclasses.replace(data, dense_names=["count", "genres"])
