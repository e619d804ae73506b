"""Supervised fine-tuning: the SFT trainer (TRM training, policy warm start) and the TRM data."""
