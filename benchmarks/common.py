"""Kept for the studies that still import it (perf's step_time.py, orthogonality.py): the helpers live in
`benchmarks.harness`; import them from there."""

from benchmarks.harness import (  # noqa: F401
    SMOLLM2_135M,
    encode_chat_pair,
    interleaved_medians,
    library_versions,
    llama_hidden_shapes,
    llama_ratio_shapes,
    machine_dict,
    machine_info,
    median_time,
    ns_flops,
)
