"""The ground-truth reward of the sentiment experiment: p(positive) from a TF-IDF + logistic-regression classifier
trained on IMDb reviews (the paper used a RoBERTa classifier; this one needs no download)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class SentimentReward:
    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], seed: int = 0) -> SentimentReward:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
        )
        pipeline.fit(list(texts), list(labels))
        return cls(pipeline)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """p(positive) for each text."""
        return self.pipeline.predict_proba(list(texts))[:, 1]

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(((self(texts) > 0.5).astype(int) == np.asarray(labels)).mean())

    def save(self, path: Path) -> None:
        path.write_bytes(pickle.dumps(self.pipeline))

    @classmethod
    def load(cls, path: Path) -> SentimentReward:
        return cls(pickle.loads(path.read_bytes()))  # our own cache file, so unpickling it is safe
