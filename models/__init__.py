"""Networks: the backbone loader, the shared feature extractor, and each method's trainable networks."""
