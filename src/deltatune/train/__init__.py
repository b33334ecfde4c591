"""Training: data formats and batching, the loop, evaluation."""
