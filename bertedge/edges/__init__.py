"""Thin edges around the runtime `Predictor`: HTTP serving (`serve`) and Ray Data (`ray`).

They add transport only; tokenization, batching and post-processing stay in `bertedge.runtime`.
"""
