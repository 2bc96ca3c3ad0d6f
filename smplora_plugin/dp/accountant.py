"""Privacy accounting with Opacus's RDP and PRV accountants, carrying the sampling they assume.

Both accountants bound the Poisson-subsampled Gaussian mechanism (add/remove-one adjacency: one
record = one row of the training set). A run that draws fixed-size shuffled batches does not
satisfy that assumption; its epsilon is still what the Poisson accountant computes at
``q = B / N``, and every text and header entry here says so.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from .errors import DPError

MECHANISMS = ("rdp", "prv")
#: accepted spellings of the two samplings (canonical names: "poisson", "fixed_batch")
SAMPLINGS = {"poisson": "poisson", "fixed_batch": "fixed_batch", "fixed": "fixed_batch", "shuffle": "fixed_batch",
             "shuffled": "fixed_batch"}


def default_delta(dataset_size: int) -> float:
    """``1 / (N ln N)`` for ``N > 1`` training samples, else ``1e-5``."""
    n = int(dataset_size)
    return 1.0 / (n * math.log(n)) if n > 1 else 1e-5


def check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise DPError(f"delta={delta!r} is outside (0, 1): pass a probability such as 1e-5, or leave delta=None for "
                      "the default 1/(N ln N) of N training samples.")
    return float(delta)


def check_mechanism(mechanism: Any) -> str:
    if mechanism not in MECHANISMS:
        raise DPError(f"accountant={mechanism!r} is not one of {MECHANISMS}: use 'rdp' (Renyi DP, the default) or "
                      "'prv' (privacy random variables, tighter and slower).")
    return mechanism


def check_sampling(sampling: Any) -> str:
    if sampling not in SAMPLINGS:
        raise DPError(f"sampling={sampling!r} is not one of {sorted(SAMPLINGS)}: say 'poisson' when every step's batch "
                      "is drawn with PoissonBatchSampler, 'fixed_batch' for fixed-size shuffled batches.")
    return SAMPLINGS[sampling]


def sampling_note(sampling: str, sample_rate: float) -> str:
    """The sampling assumption behind an epsilon, in words (printed with every epsilon)."""
    if sampling == "poisson":
        return (f"Poisson sampling at q = {sample_rate:.6g} (each sample joins each step's batch independently with "
                "probability q), as the accountant assumes")
    return (f"epsilon as computed by the Poisson accountant at q = B/N = {sample_rate:.6g}; the run's fixed-size "
            "batches do not satisfy its assumption")


def opacus_accountant(mechanism: str):
    """A fresh Opacus accountant (``opacus.accountants``) of ``mechanism``."""
    try:
        from opacus.accountants import create_accountant
    except ImportError as exc:
        raise DPError("the DP accountant needs Opacus: pip install 'smplora-plugin[dp]' (opacus>=1.4,<2).") from exc
    return create_accountant(mechanism=check_mechanism(mechanism))


def noise_multiplier_for(target_epsilon: float, *, delta: float, sample_rate: float, steps: int,
                         mechanism: str = "rdp") -> float:
    """The noise multiplier that reaches ``(target_epsilon, delta)`` after ``steps`` steps at ``sample_rate``.

    Opacus's ``get_noise_multiplier`` (as ``make_private_with_epsilon`` uses it): a bisection whose
    result spends at most ``target_epsilon`` (within 0.01 below it).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not target_epsilon > 0 \
            or not math.isfinite(target_epsilon):
        raise DPError(f"target_epsilon={target_epsilon!r} must be a finite number > 0.")
    opacus_accountant(mechanism)  # the import check
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=delta,
                                          sample_rate=sample_rate, steps=int(steps), accountant=mechanism))
    except ValueError as exc:
        raise DPError(
            f"target_epsilon={target_epsilon} is not reachable in {steps} steps at sample rate {sample_rate:.6g} "
            f"(delta {delta:.3g}) with any noise multiplier up to 1e6 ({exc}): raise target_epsilon, plan fewer "
            "steps, or sample smaller batches."
        ) from exc


class DPAccountant:
    """The privacy spent so far: Opacus's ``history`` of ``(noise_multiplier, sample_rate, steps)``.

    Args:
        mechanism: ``"rdp"`` or ``"prv"`` (``opacus.accountants.RDPAccountant`` / ``PRVAccountant``).
        sample_rate: the ``q`` of every step.
        sampling: ``"poisson"`` or ``"fixed_batch"``: the sampling the run uses; the epsilon is the
            Poisson accountant's either way, and :meth:`note` says which assumption it rests on.
        delta: the delta of :meth:`epsilon`.
    """

    def __init__(self, mechanism: str = "rdp", *, sample_rate: float, sampling: str = "poisson", delta: float):
        self.mechanism = check_mechanism(mechanism)
        self.sampling = check_sampling(sampling)
        self.sample_rate = float(sample_rate)
        self.delta = check_delta(delta)
        self.history: List[Tuple[float, float, int]] = []
        self._cache: Dict[Tuple[Tuple[Tuple[float, float, int], ...], float], float] = {}
        self._rdp_memo: Dict[Tuple[float, float], Any] = {}

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float) -> None:
        """Record one step of the Gaussian mechanism at :attr:`sample_rate`."""
        sigma = float(noise_multiplier)
        if self.history and self.history[-1][:2] == (sigma, self.sample_rate):
            self.history[-1] = (sigma, self.sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((sigma, self.sample_rate, 1))

    def epsilon(self, delta: Optional[float] = None) -> float:
        """The Opacus accountant's epsilon at ``delta`` (default :attr:`delta`); 0 before the first step.

        It assumes Poisson sampling: read it with :meth:`note`. The figure is computed once per history
        (a progress bar asks for it every step); the RDP conversion's slightly negative values for tiny
        budgets are read as 0.
        """
        delta = self.delta if delta is None else check_delta(delta)
        if not self.history:
            return 0.0
        key = (tuple(self.history), delta)
        if key not in self._cache:
            self._cache = {key: max(0.0, self._rdp_epsilon(delta) if self.mechanism == "rdp" else
                                    float(self._opacus().get_epsilon(delta=delta)))}
        return self._cache[key]

    def _opacus(self):
        acc = opacus_accountant(self.mechanism)
        acc.history = list(self.history)
        return acc

    def _rdp_epsilon(self, delta: float) -> float:
        """``RDPAccountant.get_epsilon``'s figure, bit for bit, with each ``(sigma, q)``'s one-step RDP computed once:
        Opacus's RDP of ``n`` steps is the one-step RDP times ``n``, so a progress bar's per-step epsilon costs a
        multiplication and the RDP-to-DP conversion, not the whole RDP again."""
        acc = opacus_accountant("rdp")
        from opacus.accountants.analysis import rdp as analysis

        orders = acc.DEFAULT_ALPHAS
        rdp = sum([self._one_step_rdp(sigma, q, orders) * n for sigma, q, n in self.history])
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)

    def _one_step_rdp(self, sigma: float, q: float, orders: Any) -> Any:
        from opacus.accountants.analysis import rdp as analysis

        if (sigma, q) not in self._rdp_memo:
            self._rdp_memo[(sigma, q)] = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        return self._rdp_memo[(sigma, q)]

    def note(self) -> str:
        """The sampling assumption of :meth:`epsilon`, in words."""
        return sampling_note(self.sampling, self.sample_rate)

    def summary(self, delta: Optional[float] = None) -> str:
        delta = self.delta if delta is None else check_delta(delta)
        return (f"epsilon {self.epsilon(delta):.4g} at delta {delta:.3g} after {self.steps} steps "
                f"({self.mechanism} accountant; {self.note()})")

    __repr__ = summary

    def to_dict(self) -> Dict[str, Any]:
        return {"mechanism": self.mechanism, "sampling": self.sampling, "sample_rate": self.sample_rate,
                "delta": self.delta, "history": [list(h) for h in self.history]}

    @staticmethod
    def history_from(raw: Any) -> List[Tuple[float, float, int]]:
        """A validated history list (``[[sigma, q, steps], ...]``, all positive)."""
        try:
            out = [(float(s), float(q), int(n)) for s, q, n in raw]
        except (TypeError, ValueError) as exc:
            raise DPError(f"the accountant history {raw!r} is corrupt ({exc}); "
                          "re-save it with dp.state_dict().") from exc
        if any(not (s > 0 and 0 < q <= 1 and n > 0) for s, q, n in out):
            raise DPError(f"the accountant history {raw!r} holds a non-positive sigma, q or step count; "
                          "the state is corrupt.")
        return out
