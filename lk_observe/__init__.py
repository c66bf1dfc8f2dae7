"""lk_observe."""
