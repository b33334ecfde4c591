"""Invariant-suite configs for the methods that prepend virtual tokens (prompt tuning, P-tuning)."""

import deltatune as dt

CASES = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning-lstm": lambda: dt.PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    "ptuning-mlp": lambda: dt.PTuningConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=8),
    # IPT's prompt of its first task (the one whole batches use until another is selected)
    "ipt": lambda: dt.IPTConfig(tasks=("first", "second"), num_virtual_tokens=3, dimension=4, hidden_size=8),
}
# a prompt is a random change of the input from the first step (Lester et al.; Liu et al.)
NOT_IDENTITY = {"prompt", "ptuning-lstm", "ptuning-mlp", "ipt"}
