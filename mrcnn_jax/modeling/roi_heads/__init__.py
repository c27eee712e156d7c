"""modeling/roi_heads."""
