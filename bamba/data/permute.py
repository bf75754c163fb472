"""O(1)-memory random-access permutations and a counter-based RNG.

The loader never materialises a shuffled index list. A dataset of n documents is shuffled by a
bijection of [0, 2^k) (k the bit length of n - 1) made of rounds of a full-period LCG step
x -> (a*x + c) mod 2^k (a = 1 mod 4, c odd: a bijection) followed by an xor-shift (also a
bijection), restricted to [0, n) by cycle walking: apply it again until the value falls below
n. The result is a bijection of [0, n) computable for any index in O(1) expected time, keyed by
(seed, epoch, dataset). Random access is what lets a consumer start anywhere in the order.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_ROUNDS = 3


def splitmix64(x: int) -> int:
    """One step of SplitMix64: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_key(*parts: int) -> int:
    """Hash a tuple of non-negative integers into one 64-bit key."""
    key = 0x6A09E667F3BCC908
    for part in parts:
        key = splitmix64(key ^ (part & _MASK64))
    return key


def uniform(key: int, counter: int) -> float:
    """Counter-based RNG: a uniform float in [0, 1) for draw number ``counter`` of stream ``key``."""
    return (splitmix64(key ^ splitmix64(counter)) >> 11) / float(1 << 53)


def randbelow(key: int, counter: int, n: int) -> int:
    """Counter-based RNG: an integer in [0, n) for draw ``counter`` of stream ``key``."""
    return min(int(uniform(key, counter) * n), n - 1)


class Permutation:
    """A keyed bijection of [0, n), evaluated lazily: ``perm(i)`` is the i-th element of the order."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        self.bits = max(1, (n - 1).bit_length())
        self.mask = (1 << self.bits) - 1
        self.shift = max(1, (self.bits + 1) // 2)
        rounds = []
        for r in range(_ROUNDS):
            h = mix_key(key, r)
            a = ((h & self.mask) | 1) if self.bits < 2 else ((h & self.mask) & ~3 | 1)  # a = 1 mod 4
            c = ((h >> 32) & self.mask) | 1  # odd increment: full-period LCG step
            rounds.append((a, c))
        self.rounds = tuple(rounds)

    def _step(self, x: int) -> int:
        for a, c in self.rounds:
            x = (a * x + c) & self.mask
            x ^= x >> self.shift
        return x

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside permutation of {self.n}")
        x = self._step(i)
        while x >= self.n:  # cycle walking: stays a bijection of [0, n)
            x = self._step(x)
        return x
