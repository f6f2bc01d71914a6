"""aul_jax: find mislabeled training data from the Area Under the Loss (AUL) curve."""
