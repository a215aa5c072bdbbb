"""Per-layer rules: what one module type records in the forward pass and how its
per-example gradient terms are formed from that and the output gradient."""
