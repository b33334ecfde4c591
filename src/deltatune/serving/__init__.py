"""``deltatune serve``: an OpenAI-compatible server for one base model and many deltas
(:mod:`.engine` batches the requests, :mod:`.app` speaks HTTP)."""
