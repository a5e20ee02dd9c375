"""CSAD (Hsieh & Lai, BMVC 2024): stage 1 pseudo-labels, stage 2 segmentor + Patch Histogram, stage 3 LGST.

`label_layout` is the file contract between stage 1 and stage 2 (datasets/masks/<category>/...).
"""
