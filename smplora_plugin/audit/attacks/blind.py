"""The blind baseline: no model access; it must sit at chance, or the split is biased."""

from __future__ import annotations

import numpy as np

from .stacked import _CrossFitted


class BlindBaseline(_CrossFitted):
    """No model access: logistic regression on downsampled pixels (and caption words).

    It must sit at chance; anything else means members and non-members differ in distribution
    (split bias), and every attack's numbers are inflated by it.
    """

    name = "blind"
    title = "Blind baseline (pixels/captions, no model)"
    uses_model = False

    def features(self, ctx):
        X = ctx.pixels()
        if ctx.captions is not None:
            from sklearn.feature_extraction.text import HashingVectorizer

            words = HashingVectorizer(n_features=256, alternate_sign=False).transform(ctx.captions).toarray()
            X = np.concatenate([X, words], 1)
        return X

    def make_model(self, seed):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
