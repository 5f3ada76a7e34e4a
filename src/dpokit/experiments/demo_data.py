"""Where `dpokit demo` finds its data, so that it runs after a plain `pip install`, away from this repository.

IMDb reviews, in this order: `--imdb` (a local file, or a Hub data set id); the Hub data set `stanfordnlp/imdb` when
it is reachable (or in the Hub cache, with `HF_HUB_OFFLINE=1`); the shared data folder (`DPOKIT_DATA_DIR`, then
`../shared/data` from the working directory) as a fallback. The VADER movie snippets (only used to check the reward
against human ratings) come from `--vader` or that folder; without them the demo runs and says that check was
skipped. When no IMDb source is found, one error lists every place tried.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import UserError
from dpokit.hub import HubDataset, HubError, hub_cache, is_hub_id, iter_hub_rows, offline

IMDB_HUB_ID = "stanfordnlp/imdb"
IMDB_FILE = Path("imdb-text2vec") / "movie_review.jsonl.gz"
VADER_FILE = Path("vader-movie-snippets") / "movieReviewSnippets_GroundTruth.txt"
REVIEWS = 5000
"""Reviews the demo uses (the shared file holds exactly this many; from the Hub, a seeded sample of the train split)."""


@dataclass(frozen=True)
class DemoData:
    reviews: list[dict[str, Any]]
    """{text, label} with label 1 for a positive review."""
    source: str
    vader: Path | None


def shared_folders() -> list[Path]:
    """Candidate shared data folders, most specific first."""
    folders = [Path(os.environ["DPOKIT_DATA_DIR"])] if os.environ.get("DPOKIT_DATA_DIR") else []
    folders.append(Path.cwd().parent / "shared" / "data")
    return list(dict.fromkeys(folders))


def clean(review: str) -> str:
    return review.replace('\\"', '"').replace("<br />", " ").replace("  ", " ").strip()


def read_imdb_file(path: Path) -> list[dict[str, Any]]:
    """The shared file's rows ({review, sentiment}) as {text, label}."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{"text": clean(r["review"]), "label": int(r["sentiment"])} for r in rows]


def read_imdb_hub(repo_id: str, n: int = REVIEWS, seed: int = 0) -> list[dict[str, Any]]:
    """`n` reviews of the train split of a Hub IMDb data set ({text, label}), in a seeded random order (the split is
    sorted by label)."""
    rows = [
        {"text": clean(r["text"]), "label": int(r["label"])} for _, r in iter_hub_rows(HubDataset(repo_id, "train"))
    ]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def find_demo_data(imdb: str | None = None, vader: str | None = None) -> DemoData:
    tried: list[str] = []
    reviews, source = None, ""
    if imdb and Path(imdb).exists():
        reviews, source = read_imdb_file(Path(imdb)), imdb
    elif imdb and not is_hub_id(imdb):
        raise UserError(f"demo --imdb {imdb}: no such file; give movie_review.jsonl.gz or a Hub data set id")
    else:
        repo_id = imdb or IMDB_HUB_ID
        try:
            reviews, source = read_imdb_hub(repo_id), f"{repo_id}[train]"
        except HubError:
            if imdb:
                raise
            mode = "on, only the cache was read" if offline(datasets=True) else "off, and the Hub was not reachable"
            tried.append(f"the Hub data set {repo_id} (cache {hub_cache()}; offline mode {mode})")
    folders = shared_folders()
    if reviews is None:
        for folder in folders:
            if (folder / IMDB_FILE).exists():
                reviews, source = read_imdb_file(folder / IMDB_FILE), str(folder / IMDB_FILE)
                break
            tried.append(str(folder / IMDB_FILE))
    if reviews is None:
        raise UserError(
            "no IMDb reviews found; tried " + "; ".join(tried) + ". Pass --imdb movie_review.jsonl.gz (the "
            "IMDb sample of text2vec) or a Hub id, set DPOKIT_DATA_DIR to a folder holding imdb-text2vec/, or run "
            "once with network access so that stanfordnlp/imdb reaches the Hub cache"
        )
    if vader and not Path(vader).exists():
        raise UserError(f"demo --vader {vader}: no such file (movieReviewSnippets_GroundTruth.txt)")
    vader_path = Path(vader) if vader else next((f / VADER_FILE for f in folders if (f / VADER_FILE).exists()), None)
    return DemoData(reviews, source, vader_path)
