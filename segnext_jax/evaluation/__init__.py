"""Evaluation: MMSegmentation's IoU metrics."""
