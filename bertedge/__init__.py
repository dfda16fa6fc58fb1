"""bertedge: BERT-family models from a labelled dataset to a fast, packaged, offline predictor."""

__version__ = "0.1.0"
