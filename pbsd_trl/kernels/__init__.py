from .logprob_kernel import FusedLogProbGapFunction, fused_logprob_gap, fused_logprobs
from .reference import reference_logprob_gap, reference_logprobs


__all__ = [
    "FusedLogProbGapFunction",
    "fused_logprob_gap",
    "fused_logprobs",
    "reference_logprob_gap",
    "reference_logprobs",
]
