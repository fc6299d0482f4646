"""MovieLens-1M and MovieLens-100K as CTR tasks: ratings of 3 dropped, label ``rating > 3``;
fields ``user_id``, ``item_id`` (only with ``include_ids``), then the 7 side fields of the PEP
reference loader. The fields' encodings: docs/design/data_loaders.md.
"""

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import torch

from .criteo import log_squared_bucket
from .ctr import BagField, CTRData

ID_FIELD_NAMES = ("user_id", "item_id")
SIDE_FIELD_NAMES = ("timestamp_bucket", "gender", "age", "occupation", "zip_code", "year", "genres")
ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"
_YEAR = re.compile(r"\d{4}")
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)")
_TRAILING_YEAR = re.compile(r"\((\d{4})\)\s*$")
_AGE_GROUPS = ((17, 1), (24, 18), (34, 25), (44, 35), (49, 45), (55, 50))  # (oldest age in group, ML-1M code)


def age_group(age: int) -> int:
    """ML-1M's age code for a raw age: 1 (under 18), 18, 25, 35, 45, 50, or 56 (56 and over)."""
    return next((code for oldest, code in _AGE_GROUPS if age <= oldest), 56)


def movielens_100k_dir() -> Path:
    """The directory holding RecBole's copy of ML-100K, found without importing recbole.

    Raises FileNotFoundError with the install command when recbole or its ML-100K files are absent.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MovieLens-100K ships with the recbole package, which is not installed; "
                                f"install it with `{_RECBOLE_INSTALL}`")
    directory = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    missing = [name for name in ML100K_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"MovieLens-100K files {missing} not found in {directory}; "
                                f"install them with `{_RECBOLE_INSTALL}`")
    return directory


def load_movielens_100k(include_ids=True, genres_as_bag=False, dense=False) -> CTRData:
    """ML-100K from RecBole's tab-separated copy: 72,855 labelled ratings, about 76% positive.

    9 fields with ``include_ids`` (the default), else the 7 side fields. RecBole's ``release_year``
    is not always a year (``V`` for a title ending in "(1995) (V)", ``unkonwn`` for the unknown
    movie), so a non-year falls back to the last "(YYYY)" in the title, then to the empty token.

    For models with multi-hot and numeric inputs (a DLRM): ``genres_as_bag`` replaces the
    ``genres`` field by a bag of the movie's single genres (19 values, in sorted order of their
    names); ``dense`` replaces the ``age`` and ``year`` fields by the user's raw age and the
    release year as numeric features, each standardised over the labelled rows (a movie without a
    year takes the mean year).
    """
    directory = movielens_100k_dir()
    ratings_path, users_path, items_path = (directory / name for name in ML100K_FILES)
    ratings = _parse_ratings(ratings_path, _read_recbole(ratings_path, ("user_id", "item_id", "rating", "timestamp")))
    users = _unique_keys(users_path, (
        (line, user, (gender, age_group(int(_number(age, "age", users_path, line))), occupation, zip_code))
        for line, (user, age, gender, occupation, zip_code)
        in _read_recbole(users_path, ("user_id", "age", "gender", "occupation", "zip_code"))
    ))
    items = _unique_keys(items_path, (
        (line, item, (_ml100k_year(year, title), _genre_token(genres.split(" "))))
        for line, (item, title, year, genres)
        in _read_recbole(items_path, ("item_id", "movie_title", "release_year", "class"))
    ))
    data = _movielens_ctr_data(ratings, users, items, include_ids, ratings_path, users_path, items_path)
    if not (genres_as_bag or dense):
        return data
    labelled = [(user, item) for _, user, item, rating, _ in ratings if rating != 3]  # the rows of `data`
    if genres_as_bag:
        data = _genres_as_bag(data, [items[item][1] for _, item in labelled])
    if dense:
        ages = {user: _number(age, "age", users_path, line)
                for line, (user, age) in _read_recbole(users_path, ("user_id", "age"))}
        years = [items[item][0] for _, item in labelled]
        data = _numeric_as_dense(data, {"age": [ages[user] for user, _ in labelled],
                                        "year": [float(year) if year else math.nan for year in years]})
    return data


def _without_fields(data, names):
    keep = [f for f, name in enumerate(data.field_names) if name not in names]
    return dict(x=data.x[:, keep], field_dims=[data.field_dims[f] for f in keep],
                field_names=[data.field_names[f] for f in keep])


def _genres_as_bag(data, genre_tokens):
    """`data` with its `genres` field replaced by a bag of single genres (`_genre_token` split)."""
    genre_sets = [token.split("|") if token else [] for token in genre_tokens]
    vocabulary = sorted({genre for genres in genre_sets for genre in genres})
    ids = {genre: i for i, genre in enumerate(vocabulary)}
    lengths = torch.tensor([len(genres) for genres in genre_sets], dtype=torch.int64)
    values = torch.tensor([ids[genre] for genres in genre_sets for genre in genres], dtype=torch.int64)
    bag = BagField("genres", len(vocabulary), values, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
    return dataclasses.replace(data, **_without_fields(data, {"genres"}), bags=[*data.bags, bag])


def _numeric_as_dense(data, columns):
    """`data` with the fields named in `columns` replaced by those numeric values ({name: one
    value per row, NaN where unknown}), standardised; NaN becomes the mean (0)."""
    dense = torch.tensor(list(columns.values()), dtype=torch.float64).T
    known = ~torch.isnan(dense)
    mean = torch.where(known, dense, 0).sum(0) / known.sum(0)
    centred = torch.where(known, dense - mean, 0)
    std = (centred.square().sum(0) / known.sum(0)).sqrt().clamp_min(1e-12)
    return dataclasses.replace(data, **_without_fields(data, set(columns)), dense=(centred / std).float(),
                               dense_names=[*data.dense_names, *columns])


def load_movielens_1m(directory, include_ids=False) -> CTRData:
    """ML-1M from GroupLens' ``ratings.dat``, ``users.dat``, ``movies.dat`` ('::'-separated, latin-1).

    Defaults to the reference setup: the 7 side fields without the ids (``include_ids=True`` adds
    them in front). The year comes from the title's trailing "(YYYY)".
    """
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"MovieLens-1M needs the folder of the unzipped ml-1m archive; {directory} is a file")
    ratings_path, users_path, items_path = (directory / name for name in ML1M_FILES)
    missing = [path.name for path in (ratings_path, users_path, items_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"MovieLens-1M files {missing} not found in {directory}; expected the unzipped "
                                f"ml-1m archive with {', '.join(ML1M_FILES)}")
    ratings = _parse_ratings(ratings_path, _read_ml1m(ratings_path, 4))
    users = _unique_keys(users_path, (
        (line, user, (gender, int(_number(age, "age", users_path, line)), occupation, zip_code))
        for line, (user, gender, age, occupation, zip_code) in _read_ml1m(users_path, 5)
    ))
    items = _unique_keys(items_path, (
        (line, item, (_ml1m_year(title, items_path, line), _genre_token(genres.split("|"))))
        for line, (item, title, genres) in _read_ml1m(items_path, 3)
    ))
    return _movielens_ctr_data(ratings, users, items, include_ids, ratings_path, users_path, items_path)


def _movielens_ctr_data(ratings, users, items, include_ids, ratings_path, users_path, items_path):
    """Join ratings (line, user, item, rating, timestamp) with user and item side features."""
    if not ratings:
        raise ValueError(f"{ratings_path} has no ratings")
    first_time = min(timestamp for *_, timestamp in ratings)
    rows, labels = [], []
    for line, user, item, rating, timestamp in ratings:
        if rating == 3:
            continue
        if user not in users:
            raise ValueError(f"{ratings_path}, line {line}: user {user!r} is not in {users_path}")
        if item not in items:
            raise ValueError(f"{ratings_path}, line {line}: item {item!r} is not in {items_path}")
        ids = (user, item) if include_ids else ()
        rows.append(ids + (log_squared_bucket(int(timestamp - first_time)),) + users[user] + items[item])
        labels.append(rating > 3)
    if not rows:
        raise ValueError(f"{ratings_path} has only ratings of 3, which are dropped")
    columns = [np.unique(np.array(column), return_inverse=True) for column in zip(*rows)]
    x = np.stack([local_ids for _, local_ids in columns], axis=1).astype(np.int64)
    field_names = (ID_FIELD_NAMES if include_ids else ()) + SIDE_FIELD_NAMES
    return CTRData(torch.from_numpy(x), torch.tensor(labels, dtype=torch.float32),
                   [len(values) for values, _ in columns], list(field_names))


def _read_lines(path, encoding):
    # Lines end at "\n" only: str.splitlines would also split at characters like "\x85", which is
    # a valid latin-1 character in a title.
    with open(path, encoding=encoding, newline="\n") as file:
        return file.readlines()


def _split_rows(path, lines, separator, num_columns, first_line=1):
    """(line number, values) of each line of a small delimited file; a wrong column count raises."""
    rows = []
    for line_number, line in enumerate(lines, start=first_line):
        values = line.rstrip("\r\n").split(separator)
        if len(values) != num_columns:
            raise ValueError(f"{path}, line {line_number}: expected {num_columns} {separator!r}-separated columns, "
                             f"found {len(values)}")
        rows.append((line_number, values))
    return rows


def _read_ml1m(path, num_columns):
    return _split_rows(path, _read_lines(path, "latin-1"), "::", num_columns)


def _read_recbole(path, columns):
    """(line number, values of ``columns``) of a RecBole atomic file, whose header names its
    tab-separated columns as ``name:type``."""
    lines = _read_lines(path, "utf-8")
    header = [column.split(":")[0] for column in lines[0].rstrip("\r\n").split("\t")] if lines else []
    missing = [column for column in columns if column not in header]
    if missing:
        raise ValueError(f"{path}, line 1: header {header} lacks the columns {missing}")
    positions = [header.index(column) for column in columns]
    return [(line, [values[i] for i in positions])
            for line, values in _split_rows(path, lines[1:], "\t", len(header), first_line=2)]


def _parse_ratings(path, rows):
    """(line, user, item, rating, timestamp) from (line, [user, item, rating, timestamp])."""
    return [(line, user, item, _number(rating, "rating", path, line), _number(time, "timestamp", path, line))
            for line, (user, item, rating, time) in rows]


def _unique_keys(path, keyed_rows):
    """{key: features} from (line, key, features), refusing a key that appears twice."""
    table = {}
    for line, key, features in keyed_rows:
        if key in table:
            raise ValueError(f"{path}, line {line}: id {key!r} appears a second time")
        table[key] = features
    return table


def _number(raw, what, path, line):
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{path}, line {line}: {what} is {raw!r}, expected a number")
    return value


def _genre_token(genres):
    """The genre set as one token, independent of the order the file lists the genres in."""
    return "|".join(sorted(set(genres)))


def _ml1m_year(title, path, line):
    match = _TRAILING_YEAR.search(title)
    if match is None:
        raise ValueError(f"{path}, line {line}: title {title!r} does not end with a (YYYY) release year")
    return match.group(1)


def _ml100k_year(release_year, title):
    if _YEAR.fullmatch(release_year):
        return release_year
    years_in_title = _YEAR_IN_TITLE.findall(title)
    return years_in_title[-1] if years_in_title else ""
