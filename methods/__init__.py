"""Method logic (training, scoring), imported by the thin top-level scripts."""
