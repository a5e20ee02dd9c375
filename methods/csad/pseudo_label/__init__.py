"""CSAD stage 1: unsupervised semantic pseudo-labels (`Tokichan/CSAD pseudo_label.py`).

config      per-category settings (configs/csad_pseudo_label.json)
masks       mask post-processing: connected components, grounding filter, background removal, de-overlap, merge
segment     Grounded-SAM boxes/masks, SAM background, SAM automatic masks (models from models.grounding/sam_loader)
descriptors rotation-averaged CNN descriptors of aligned component crops (cached in info/all_component_feats.npz)
clustering  projection, MeanShift, small-cluster removal, area histograms, HDBSCAN image selection, class filtering
pipeline    run_category: everything above, writing the methods.csad.label_layout files
"""
