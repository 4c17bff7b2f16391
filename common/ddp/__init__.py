"""Distributed DP over SecAgg+: the distributed discrete Gaussian mechanism (numpy only).

Each site sums its clipped records, encodes the sum into Z_2^32 with its share of
discrete Gaussian noise (:func:`encode_share`), and sends it masked; the server
decodes the noisy sum (:func:`decode_sum`). :mod:`.sampler` draws the noise
exactly, :mod:`.encoding` scales, rotates, rounds and wraps, :mod:`.shares`
sizes a site's share for its policy, :mod:`.accounting` gives the record-level
(epsilon, delta). docs/ddp.md says what the guarantee is and where each choice
comes from.
"""

from .accounting import DdgMechanism, DdgSteps, calibrate_noise_multiplier, epsilon_spent
from .encoding import Encoding, decode_sum, encode_share, plan_encoding
from .errors import DdpError, ShareRefusal, SumRangeError
from .sampler import NoiseRandom, sample_discrete_gaussian
from .shares import check_share, honest_shares, required_share_sigma

__all__ = [
    "DdgMechanism",
    "DdgSteps",
    "DdpError",
    "Encoding",
    "NoiseRandom",
    "ShareRefusal",
    "SumRangeError",
    "calibrate_noise_multiplier",
    "check_share",
    "decode_sum",
    "encode_share",
    "epsilon_spent",
    "honest_shares",
    "plan_encoding",
    "required_share_sigma",
    "sample_discrete_gaussian",
]
