"""What a click and an impression are worth: the one place the pricing formulas live.

Billing is per click for CPC and oCPA alike. An ad's *click value* is what it offers per click:
its CPC bid, or for oCPA `target_cpa × pCVR` (the platform bids on the advertiser's behalf so
that, at the predicted CVR, a conversion costs the target). Its eCPM is `click value × pCTR ×
1000` (micros per thousand impressions), which for oCPA is `target_cpa × pCTR × pCVR × 1000`.

Before ranking there is no pCVR: the *Qscore eCPM* uses the ad's smoothed CTR and `PRIOR_CVR`
(or the bundle's measured base rate). Screening, the auction, the trainer, the simulator, the
retrieval cold start, admin and the funnel all price through these functions (they live in
`models/` because offline code needs them and `models` never imports `services`).

Every function is vectorised: arrays in, arrays out; scalars work too.
"""

from __future__ import annotations

import numpy as np

PRIOR_CVR = 0.05  # conversions per click assumed for oCPA before any model says otherwise
MILLE = 1000.0


def click_value(ocpa: np.ndarray, bid_micros: np.ndarray, target_cpa_micros: np.ndarray,
                pcvr: np.ndarray | float = PRIOR_CVR) -> np.ndarray:
    """Micros offered per click: the CPC bid, or target CPA × pCVR for oCPA ads."""
    return np.where(ocpa, np.asarray(target_cpa_micros, np.float64) * pcvr,
                    np.asarray(bid_micros, np.float64))


def ecpm(pctr: np.ndarray, value_per_click: np.ndarray) -> np.ndarray:
    """Expected micros per thousand impressions."""
    return MILLE * np.asarray(pctr, np.float64) * value_per_click


def qscore_ecpm(qctr: np.ndarray, ocpa: np.ndarray, bid_micros: np.ndarray,
                target_cpa_micros: np.ndarray, prior_cvr: float = PRIOR_CVR) -> np.ndarray:
    """The pre-ranking eCPM estimate: Qscore CTR × click value at the prior CVR."""
    return ecpm(qctr, click_value(ocpa, bid_micros, target_cpa_micros, prior_cvr))
