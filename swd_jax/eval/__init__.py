"""Evaluation metrics of the paper in JAX: FID (pytorch-fid Inception), CLIP score and PickScore."""
