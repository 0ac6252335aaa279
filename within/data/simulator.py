"""Ad-market simulator: the embedded default data of ``within`` (``data=synthetic``).

The world (hierarchy, vocabulary, images, geography, effects) is built once from ``seed``;
``sample(n)`` then draws ``n`` impressions, one row each, ordered in time.

World
-----
* Hierarchy: ``n_accounts`` accounts -> ``campaigns_per_account`` campaigns -> ``ad_groups_per_campaign``
  ad groups -> ``ads_per_ad_group`` ads (default 40 x 5 x 4 x 5 = 4000 ads, too many to memorise
  ``ad_id`` from a few hundred thousand rows). Each campaign has a daily ``budget`` and targets one
  country; each ad group has a ``bid``; each ad has a headline, a description and an image.
* Text: a vocabulary of ``vocab_size`` pseudo-words. Each word has a topic (``n_topics`` topics, plus
  generic words with no topic) and a true effect ``beta_w``: most are near zero, a fraction
  ``word_strong_frac`` are strongly positive or negative. Headlines have 4-8 words, descriptions 8-16.
* Image: a ``(3, S, S)`` uint8 picture: a background of some brightness and warm/cool colour balance,
  plus one filled circle or square of some size and contrast, plus faint pixel noise.
* Geography: countries -> states -> cities, each with a centroid and a population density. Users
  come from cities of the campaign's country, in proportion to city population.
* Time: ``days`` days from midnight of ``start``. Traffic follows a daily and weekly cycle; rows are
  time-ordered (row ``i`` of ``n`` sits at the ``(i + u_i) / n`` quantile of cumulative traffic).

True model
----------
For an impression of ad ``a`` (account ``acc``, campaign ``cmp``) shown on ``placement`` ``p`` and
``device`` ``d`` to a user in city ``c`` (state ``s``), of age band ``g`` and gender ``x``, at
``hour`` ``h`` and ``day_of_week`` ``w``::

    logit(true_ctr) = b0
        + u_account[acc] + u_campaign[cmp]                            # random effects, N(0, sd^2)
        + r_state[s] + r_city[c] + density_coef * z(log population_density)   # regional factors
        + text_scale * (mean_{w in headline} beta_w + mean_{w in description} beta_w)
        + image_scale * (K_WARM * warmth - K_BRIGHT * (brightness - 0.5)^2 + K_SAL * salience)
        + bid_coef * log(bid)
        + main_effect_scale * (placement[p] + device[d] + age[g] + gender[x])
        + seasonality_scale * (hour[h] + day_of_week[w])
        + interaction_scale * (device_x_placement[d, p]
                               + sum_k age_x_topic[g, k] * topic_share_k(text)
                               + warmth_x_placement[p] * warmth / 0.30)
        + drift_account[acc] + drift_state[s]      (only when timestamp >= drift start, default 0)

    clicked ~ Bernoulli(true_ctr)

* Word effects are additive and enter as the MEAN over a field's words (mean pooling recovers them).
* Constants (module level, also in ``world_summary()``): ``K_WARM = 2.8``, ``K_BRIGHT = 11``,
  ``K_SAL = 6``; placement, device, age, gender, hour, day-of-week and interaction tables are
  ``PLACEMENT_EFFECT`` ... ``WARMTH_X_PLACEMENT``; ``age_x_topic ~ N(0, 0.25^2)`` per cell; word
  effects ``~ N(0, 1)`` (strong) or ``N(0, 0.07^2)`` (near zero).
  ``topic_share_k`` is the fraction of the ad's headline + description words whose topic is ``k``.
* Image statistics are measured on the uint8 pixels ``x / 255``: ``warmth = mean(R) - mean(B)``,
  ``brightness`` = mean over all pixels, ``salience`` = spatial std of the per-pixel channel mean
  (grows with the shape's area and contrast). See ``image_stats``.
* ``r_state`` and ``r_city`` are smooth random fields over (latitude, longitude) plus a small
  independent part, so neighbouring regions look alike. ``z`` standardises with world constants.
* ``b0`` is solved when the world is built so that the expected CTR equals ``mean_ctr``.
* There is no ad-group or ad-level noise: every ad-level term is a function of the ad's features.
* Budget sets a campaign's share of traffic, not its CTR.

Drift (for calibration tests): with ``drift={"account_sd": s1, "region_sd": s2, "start_frac": f}``,
rows with ``timestamp >= start + f * days`` get an extra per-account ``N(0, s1^2)`` and per-state
``N(0, s2^2)`` logit shift (drawn once from the seed, from their own stream, so every other draw is
unchanged). A model trained on early rows is then miscalibrated per account and per region on later
rows. Defaults are 0: no drift.

Determinism: the same ``(seed, knobs, n)`` gives identical frames. Rows are drawn in fixed blocks of
``BLOCK_ROWS`` rows, each from its own ``SeedSequence(seed, spawn_key=(1, block))``, so the frame does
not depend on ``chunk_size`` and ``sample(n) == pd.concat(iter_chunks(n))``.

Rows of the same ad share one read-only image array object, so ``main_image`` costs little memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.optimize import brentq
from scipy.special import expit

__all__ = ["BLOCK_ROWS", "COLUMNS", "AdMarketSimulator", "image_stats", "simulate"]

# Fixed internal block size: randomness is keyed by block, so chunking never changes the data.
BLOCK_ROWS = 65_536

COLUMNS = (
    "timestamp", "hour", "day_of_week", "account_id", "campaign_id", "ad_group_id", "ad_id",
    "headline", "description", "main_image", "budget", "bid", "placement", "device",
    "country", "state", "city", "latitude", "longitude", "population_density",
    "age_band", "gender", "true_ctr", "clicked",
)

PLACEMENTS = ("feed", "search", "sidebar", "video", "stories")
PLACEMENT_P = (0.35, 0.25, 0.15, 0.15, 0.10)
PLACEMENT_EFFECT = (0.0, 0.70, -0.95, -0.40, 0.30)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_P = (0.60, 0.30, 0.10)
DEVICE_EFFECT = (0.18, 0.0, -0.18)
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_P = (0.18, 0.27, 0.22, 0.18, 0.15)
AGE_EFFECT = (0.30, 0.18, 0.0, -0.18, -0.35)
GENDERS = ("female", "male", "unknown")
GENDER_P = (0.48, 0.47, 0.05)
GENDER_EFFECT = (0.10, -0.06, -0.18)
# rows: device, columns: placement
DEVICE_X_PLACEMENT = (
    (0.15, -0.20, -0.45, 0.15, 0.45),
    (-0.15, 0.30, 0.25, -0.05, -0.60),
    (0.05, -0.15, 0.0, 0.40, 0.0),
)
# warm images help in stories/feed, hurt next to search results
WARMTH_X_PLACEMENT = (0.30, -0.45, -0.20, 0.15, 0.60)
DOW_EFFECT = (-0.08, -0.05, 0.0, 0.0, 0.05, 0.15, 0.18)  # Monday .. Sunday
K_WARM, K_BRIGHT, K_SAL = 2.8, 11.0, 6.0
WARMTH_UNIT = 0.30  # warmth (mean R - mean B) of a fully warm background, see _make_images
WORD_STRONG_SD, WORD_WEAK_SD = 1.0, 0.07  # sd of strong / near-zero word effects
AGE_X_TOPIC_SD = 0.25  # small: the model must learn it from age x text, 25 cells

_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
_CITY_SUFFIXES = ("", "ton", "burg", "ville", " Falls", "port", "field", " Bay", "ford", "stad")
_STATE_SUFFIXES = ("", "ia", "ana", "land", "shire", "ora")


def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(warmth, brightness, salience) of uint8 images shaped (n, 3, S, S), in [0, 1] pixel units."""
    x = images.astype(np.float64) / 255.0
    channel_mean = x.mean(axis=(2, 3))
    warmth = channel_mean[:, 0] - channel_mean[:, 2]
    brightness = channel_mean.mean(axis=1)
    lum = x.mean(axis=1).reshape(len(x), -1)
    return warmth, brightness, lum.std(axis=1)


def _hour_effect(hours: np.ndarray) -> np.ndarray:
    h = np.asarray(hours, dtype=np.float64)
    return 0.30 * np.cos(2 * np.pi * (h - 20) / 24) + 0.08 * np.cos(4 * np.pi * (h - 13) / 24)


def _pair(value: Any, name: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be [min, max] with 1 <= min <= max, got {list(value)}")
    return lo, hi


def _pick(u: np.ndarray, probs: Sequence[float]) -> np.ndarray:
    cum = np.cumsum(probs)
    return np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(probs) - 1)


def _str_array(values: np.ndarray, idx: np.ndarray) -> pd.Series:
    # Arrow take is ~6x faster than letting pandas infer the str dtype from an object array.
    arr = pa.array(values, type=pa.string()).take(pa.array(idx))
    return pd.array(arr, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


class _Names:
    """Unique pronounceable pseudo-words from syllables."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            k = int(self.rng.integers(syllables[0], syllables[1] + 1))
            w = "".join(self.rng.choice(list(_CONSONANTS)) + self.rng.choice(list(_VOWELS)) for _ in range(k))
            if self.rng.random() < 0.4:
                w += self.rng.choice(list("nrslt"))
            if w not in self.used:
                self.used.add(w)
                return w

    def name(self, suffixes: Sequence[str]) -> str:
        while True:
            w = self.word((2, 2)).capitalize() + str(self.rng.choice(list(suffixes)))
            if w not in self.used:
                self.used.add(w)
                return w


class AdMarketSimulator:
    """Simulated ad impressions with a known click probability (see the module docstring)."""

    def __init__(
        self,
        seed: int = 7,
        sample_seed: int | None = None,
        n_accounts: int = 40,
        campaigns_per_account: int = 5,
        ad_groups_per_campaign: int = 4,
        ads_per_ad_group: int = 5,
        vocab_size: int = 300,
        n_topics: int = 5,
        headline_words: Sequence[int] = (4, 8),
        description_words: Sequence[int] = (8, 16),
        image_size: int = 16,
        n_countries: int = 4,
        states_per_country: Sequence[int] = (5, 9),
        cities_per_state: Sequence[int] = (3, 8),
        days: int = 28,
        start: str = "2024-01-01",
        mean_ctr: float = 0.03,
        account_sd: float = 0.35,
        campaign_sd: float = 0.12,
        state_sd: float = 0.20,
        city_sd: float = 0.10,
        density_coef: float = 0.08,
        text_scale: float = 1.0,
        word_strong_frac: float = 0.25,
        image_scale: float = 1.0,
        bid_coef: float = 0.50,
        main_effect_scale: float = 1.0,
        seasonality_scale: float = 1.0,
        interaction_scale: float = 1.0,
        drift: Mapping[str, float] | None = None,
    ):
        self.seed = int(seed)
        # rows come from sample_seed (default: seed); the world itself only from seed, so a new
        # sample_seed draws fresh impressions of the same accounts, ads and effects
        self.sample_seed = self.seed if sample_seed is None else int(sample_seed)
        self.knobs = {
            "n_accounts": int(n_accounts), "campaigns_per_account": int(campaigns_per_account),
            "ad_groups_per_campaign": int(ad_groups_per_campaign), "ads_per_ad_group": int(ads_per_ad_group),
            "vocab_size": int(vocab_size), "n_topics": int(n_topics),
            "headline_words": _pair(headline_words, "headline_words"),
            "description_words": _pair(description_words, "description_words"),
            "image_size": int(image_size), "n_countries": int(n_countries),
            "states_per_country": _pair(states_per_country, "states_per_country"),
            "cities_per_state": _pair(cities_per_state, "cities_per_state"),
            "days": int(days), "start": str(start), "mean_ctr": float(mean_ctr),
            "account_sd": float(account_sd), "campaign_sd": float(campaign_sd), "state_sd": float(state_sd),
            "city_sd": float(city_sd), "density_coef": float(density_coef), "text_scale": float(text_scale),
            "word_strong_frac": float(word_strong_frac), "image_scale": float(image_scale),
            "bid_coef": float(bid_coef), "main_effect_scale": float(main_effect_scale),
            "seasonality_scale": float(seasonality_scale), "interaction_scale": float(interaction_scale),
        }
        d = {"account_sd": 0.0, "region_sd": 0.0, "start_frac": 0.7}
        unknown = set(dict(drift or {})) - set(d)
        if unknown:
            raise ValueError(f"drift: unknown keys {sorted(unknown)}; expected {sorted(d)}")
        d.update({k: float(v) for k, v in dict(drift or {}).items()})
        self.drift = d
        k = self.knobs
        if not 0.0 < k["mean_ctr"] < 0.5:
            raise ValueError(f"mean_ctr must be in (0, 0.5), got {k['mean_ctr']}")
        need = k["headline_words"][1] + k["description_words"][1]
        if k["vocab_size"] < need:
            raise ValueError(f"vocab_size={k['vocab_size']} is smaller than the longest ad text ({need})")
        if min(k["n_accounts"], k["campaigns_per_account"], k["ad_groups_per_campaign"],
               k["ads_per_ad_group"], k["n_countries"], k["n_topics"], k["days"]) < 1:
            raise ValueError("hierarchy sizes, n_countries, n_topics and days must all be >= 1")
        if k["image_size"] < 4:
            raise ValueError(f"image_size must be >= 4, got {k['image_size']}")
        self._build_world()

    # ------------------------------------------------------------------ world
    def _build_world(self) -> None:
        k = self.knobs
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0,)))
        names = _Names(rng)
        self._build_geo(rng, names)
        self._build_vocab(rng, names)
        self._build_hierarchy(rng)
        self._build_ads(rng)
        self._build_time()
        self.age_x_topic = rng.normal(0.0, AGE_X_TOPIC_SD, size=(len(AGE_BANDS), k["n_topics"]))

        drng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2,)))
        self.drift_account = self.drift["account_sd"] * drng.standard_normal(self.n_accounts)
        self.drift_state = self.drift["region_sd"] * drng.standard_normal(len(self.state_names))

        # Ad-level terms, computed with the same code true_logit() applies to a frame's columns.
        self._ad = self._ad_terms(
            self.ad_headline, self.ad_description, self.ad_image_stack,
            self.group_bid[self.ad_group_of_ad], self.account_of_ad, self.campaign_of_ad,
        )
        self.b0 = 0.0
        self._solve_b0()

    def _build_geo(self, rng: np.random.Generator, names: _Names) -> None:
        k = self.knobs
        n_c = k["n_countries"]
        # Country centres on a loose ring so countries do not overlap.
        ang = rng.permutation(n_c) * 2 * np.pi / n_c + rng.uniform(-0.2, 0.2, n_c)
        c_lat = np.clip(20 + 25 * np.sin(ang) + rng.normal(0, 4, n_c), -55, 65)
        c_lon = 10 + 90 * np.cos(ang) + rng.normal(0, 8, n_c)
        self.country_names = np.array([names.name(("", "ia", "land", "a", "stan")) for _ in range(n_c)],
                                      dtype=object)
        st_country, st_lat, st_lon, st_names = [], [], [], []
        ci_state, ci_lat, ci_lon, ci_dens, ci_names = [], [], [], [], []
        for c in range(n_c):
            for _ in range(int(rng.integers(k["states_per_country"][0], k["states_per_country"][1] + 1))):
                s = len(st_names)
                st_country.append(c)
                st_lat.append(c_lat[c] + rng.normal(0, 3.0))
                st_lon.append(c_lon[c] + rng.normal(0, 4.0))
                st_names.append(names.name(_STATE_SUFFIXES))
                state_density = rng.lognormal(math.log(120), 0.8)
                for _ in range(int(rng.integers(k["cities_per_state"][0], k["cities_per_state"][1] + 1))):
                    ci_state.append(s)
                    ci_lat.append(st_lat[s] + rng.normal(0, 0.8))
                    ci_lon.append(st_lon[s] + rng.normal(0, 1.0))
                    ci_dens.append(round(state_density * rng.lognormal(0, 1.0), 1) + 1.0)
                    ci_names.append(names.name(_CITY_SUFFIXES))
        self.state_country = np.array(st_country)
        self.state_names = np.array(st_names, dtype=object)
        self.city_state = np.array(ci_state)
        self.city_names = np.array(ci_names, dtype=object)
        self.city_lat = np.round(np.clip(ci_lat, -85, 85), 4)
        self.city_lon = np.round((np.array(ci_lon) + 180) % 360 - 180, 4)
        self.city_density = np.array(ci_dens, dtype=np.float64)
        self.city_country = self.state_country[self.city_state]
        st_lat, st_lon = np.array(st_lat), np.array(st_lon)

        # Smooth random fields (random Fourier features ~ a Gaussian process) make neighbours alike.
        def field(lat: np.ndarray, lon: np.ndarray, scale: float, m: int = 64) -> np.ndarray:
            w = rng.normal(0, 1.0 / scale, size=(m, 2))
            phase = rng.uniform(0, 2 * np.pi, m)
            xy = np.stack([lat, lon], axis=1)
            return np.sqrt(2.0 / m) * np.cos(xy @ w.T + phase).sum(axis=1)

        self.state_effect = k["state_sd"] * (0.8 * field(st_lat, st_lon, 6.0)
                                             + 0.6 * rng.standard_normal(len(st_lat)))
        self.city_effect = k["city_sd"] * (0.7 * field(self.city_lat, self.city_lon, 1.5)
                                           + 0.7 * rng.standard_normal(len(ci_lat)))
        log_d = np.log(self.city_density)
        self.log_density_mean, self.log_density_sd = float(log_d.mean()), float(log_d.std() + 1e-9)
        # Users per city ~ population: density times a random area.
        pop = self.city_density * rng.lognormal(0, 0.5, len(ci_lat))
        # Cumulative weights within each country, offset by the country index, so one searchsorted
        # on (country + u) picks a city of the right country.
        cum = np.empty(len(pop))
        for c in range(n_c):
            sel = np.flatnonzero(self.city_country == c)
            cum[sel] = c + np.cumsum(pop[sel]) / pop[sel].sum()
        self.city_cum = cum
        self.country_pop = np.bincount(self.city_country, weights=pop, minlength=n_c)

    def _build_vocab(self, rng: np.random.Generator, names: _Names) -> None:
        k = self.knobs
        v = k["vocab_size"]
        self.vocab = np.array([names.word() for _ in range(v)], dtype=object)
        self.word_index = {w: i for i, w in enumerate(self.vocab)}
        # ~1/6 of the words are generic (topic -1); the rest split evenly across topics.
        topics = np.arange(v) % (k["n_topics"] + 1) - 1
        self.word_topic = rng.permutation(topics)
        strong = rng.random(v) < k["word_strong_frac"]
        self.word_effect = np.where(strong, rng.normal(0, WORD_STRONG_SD, v), rng.normal(0, WORD_WEAK_SD, v))
        self.topic_onehot = np.zeros((v, k["n_topics"]))
        has = self.word_topic >= 0
        self.topic_onehot[np.flatnonzero(has), self.word_topic[has]] = 1.0

    def _build_hierarchy(self, rng: np.random.Generator) -> None:
        k = self.knobs
        na, nc, ng, nd = (k["n_accounts"], k["campaigns_per_account"], k["ad_groups_per_campaign"],
                          k["ads_per_ad_group"])
        wa = max(3, len(str(na - 1)))
        acc = [f"acc_{a:0{wa}d}" for a in range(na)]
        cmp = [f"{acc[a]}/cmp_{c}" for a in range(na) for c in range(nc)]
        grp = [f"{cmp[c]}/grp_{g}" for c in range(na * nc) for g in range(ng)]
        ads = [f"{grp[g]}/ad_{d}" for g in range(na * nc * ng) for d in range(nd)]
        self.n_accounts = na
        self.account_ids = np.array(acc, dtype=object)
        self.campaign_ids = np.array(cmp, dtype=object)
        self.ad_group_ids = np.array(grp, dtype=object)
        self.ad_ids = np.array(ads, dtype=object)
        self.account_of_campaign = np.repeat(np.arange(na), nc)
        self.campaign_of_group = np.repeat(np.arange(na * nc), ng)
        self.ad_group_of_ad = np.repeat(np.arange(na * nc * ng), nd)
        self.campaign_of_ad = self.campaign_of_group[self.ad_group_of_ad]
        self.account_of_ad = self.account_of_campaign[self.campaign_of_ad]

        self.account_effect = k["account_sd"] * rng.standard_normal(na)
        self.campaign_effect = k["campaign_sd"] * rng.standard_normal(na * nc)
        # Daily budgets in steps of 50 and bids in steps of 0.05, as advertisers type them.
        self.campaign_budget = np.maximum(50.0, np.round(rng.lognormal(math.log(1500), 0.9, na * nc) / 50) * 50)
        self.group_bid = np.maximum(0.05, np.round(rng.lognormal(math.log(1.0), 0.5, na * nc * ng) / 0.05) * 0.05)
        self.campaign_country = np.searchsorted(np.cumsum(self.country_pop) / self.country_pop.sum(),
                                                rng.random(na * nc), side="right")
        self.campaign_country = np.minimum(self.campaign_country, k["n_countries"] - 1)

    def _build_ads(self, rng: np.random.Generator) -> None:
        k = self.knobs
        n_ads = len(self.ad_ids)
        ad_topic = rng.integers(0, k["n_topics"], n_ads)
        by_topic = [np.flatnonzero(self.word_topic == t) for t in range(k["n_topics"])]
        v = k["vocab_size"]

        def text(t: int, lo_hi: tuple[int, int]) -> str:
            m = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
            # ~60% of words from the ad's topic, the rest from the whole vocabulary, no repeats.
            n_top = min(int(rng.binomial(m, 0.6)), len(by_topic[t]))
            words = list(rng.choice(by_topic[t], n_top, replace=False)) if n_top else []
            pool = np.setdiff1d(np.arange(v), words)
            words += list(rng.choice(pool, m - n_top, replace=False))
            rng.shuffle(words)
            return " ".join(self.vocab[words])

        self.ad_headline = np.array([text(t, k["headline_words"]) for t in ad_topic], dtype=object)
        self.ad_description = np.array([text(t, k["description_words"]) for t in ad_topic], dtype=object)
        self.ad_image_stack = self._make_images(rng, n_ads, k["image_size"])
        self.ad_image = np.empty(n_ads, dtype=object)
        for i in range(n_ads):
            self.ad_image[i] = self.ad_image_stack[i]  # read-only view: rows share one object
        # Traffic share: campaign budget spread over its ads, tilted by bid, with some ad-level spread.
        nd = k["ads_per_ad_group"] * k["ad_groups_per_campaign"]
        w = (self.campaign_budget[self.campaign_of_ad] / nd
             * np.sqrt(self.group_bid[self.ad_group_of_ad]) * rng.gamma(4.0, 0.25, n_ads))
        self.ad_cum = np.cumsum(w) / w.sum()

    @staticmethod
    def _make_images(rng: np.random.Generator, n: int, s: int) -> np.ndarray:
        warm = rng.uniform(-1, 1, n)
        bright = rng.uniform(0.25, 0.8, n)
        radius = rng.uniform(0.12, 0.45, n) * s
        contrast = rng.uniform(-0.4, 0.4, n)
        square = rng.random(n) < 0.5
        cy, cx = (rng.uniform(0.3, 0.7, (2, n)) * s)
        yy, xx = np.mgrid[0:s, 0:s] + 0.5
        dy = yy[None] - cy[:, None, None]
        dx = xx[None] - cx[:, None, None]
        r = radius[:, None, None]
        circle = dy**2 + dx**2 <= r**2
        box = np.maximum(np.abs(dy), np.abs(dx)) <= r * 0.886  # same area as the circle
        mask = np.where(square[:, None, None], box, circle)
        tint = np.array([0.5, 0.0, -0.5]) * WARMTH_UNIT
        bg = bright[:, None] + warm[:, None] * tint[None, :]  # (n, 3)
        img = bg[:, :, None, None] + (contrast[:, None, None] * mask)[:, None]
        img = img + rng.uniform(-0.03, 0.03, img.shape)
        out = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        out.flags.writeable = False
        return out

    def _build_time(self) -> None:
        k = self.knobs
        self.start = pd.Timestamp(k["start"]).normalize()
        self.start_dow = int(self.start.dayofweek)
        minutes = np.arange(k["days"] * 1440 + 1, dtype=np.float64)
        hour = (minutes / 60.0) % 24
        dow = (self.start_dow + minutes // 1440) % 7
        # Traffic: evening peak, night trough, busier weekends.
        rate = (1 + 0.6 * np.cos(2 * np.pi * (hour - 20) / 24)) * np.where(dow >= 5, 1.15, 1.0)
        cum = np.concatenate([[0.0], np.cumsum((rate[1:] + rate[:-1]) / 2)])
        self.time_cum = cum / cum[-1]
        self.time_grid_s = minutes * 60.0
        self.drift_start_s = self.drift["start_frac"] * k["days"] * 86400.0
        self.hour_table = _hour_effect(np.arange(24))
        self.dow_table = np.array(DOW_EFFECT)

    def _solve_b0(self) -> None:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(3,)))
        m = 200_000
        rows = self._draw(rng, m, rng.random(m), use_drift=False)
        eta = rows["eta"]
        target = self.knobs["mean_ctr"]
        self.b0 = float(brentq(lambda b: expit(b + eta).mean() - target, -20.0, 10.0, xtol=1e-12))
        self._pilot_terms = rows["terms"]

    # ------------------------------------------------------------------ truth
    def _text_terms(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per text: mean word effect, topic counts (n, T), word count. Unknown words are an error."""
        eff = np.empty(len(texts))
        topics = np.zeros((len(texts), self.knobs["n_topics"]))
        count = np.empty(len(texts))
        for i, t in enumerate(texts):
            try:
                idx = [self.word_index[w] for w in str(t).split()]
            except KeyError as e:
                raise ValueError(f"text field: word {e.args[0]!r} is not in this world's vocabulary") from None
            if not idx:
                raise ValueError("text field: empty text")
            eff[i] = self.word_effect[idx].mean()
            topics[i] = self.topic_onehot[idx].sum(axis=0)
            count[i] = len(idx)
        return eff, topics, count

    def _ad_terms(self, headlines, descriptions, images, bids, acc, cmp) -> dict[str, np.ndarray]:
        k = self.knobs
        h_eff, h_top, h_n = self._text_terms(headlines)
        d_eff, d_top, d_n = self._text_terms(descriptions)
        share = (h_top + d_top) / (h_n + d_n)[:, None]
        warmth, bright, sal = image_stats(images)
        text = k["text_scale"] * (h_eff + d_eff)
        image = k["image_scale"] * (K_WARM * warmth - K_BRIGHT * (bright - 0.5) ** 2 + K_SAL * sal)
        bid = k["bid_coef"] * np.log(bids)
        hier = self.account_effect[acc] + self.campaign_effect[cmp]
        return {
            "hierarchy": hier, "text": text, "image": image, "bid": bid,
            "static": hier + text + image + bid,
            # (n_ads, n_age) and (n_ads, n_placement) tables: interactions with row-level fields
            "age_x_topic": k["interaction_scale"] * share @ self.age_x_topic.T,
            "warmth_x_placement": k["interaction_scale"] * np.outer(warmth / WARMTH_UNIT, WARMTH_X_PLACEMENT),
        }

    def _region(self, state: np.ndarray, city: np.ndarray, density: np.ndarray) -> np.ndarray:
        z = (np.log(density) - self.log_density_mean) / self.log_density_sd
        return self.state_effect[state] + self.city_effect[city] + self.knobs["density_coef"] * z

    def _eta(self, ad_tab: dict, a, state, city, density, pl, dev, age, gen, hour, dow) -> dict:
        """Logit minus b0 and drift, and its parts. ``a`` indexes the rows of ``ad_tab``."""
        k = self.knobs
        me, ss, ix = k["main_effect_scale"], k["seasonality_scale"], k["interaction_scale"]
        terms = {
            "ad": ad_tab["static"][a],
            "region": self._region(state, city, density),
            "main": me * (np.take(PLACEMENT_EFFECT, pl) + np.take(DEVICE_EFFECT, dev)
                          + np.take(AGE_EFFECT, age) + np.take(GENDER_EFFECT, gen)),
            "season": ss * (self.hour_table[hour] + self.dow_table[dow]),
            "interaction": (ix * np.asarray(DEVICE_X_PLACEMENT)[dev, pl]
                            + ad_tab["age_x_topic"][a, age] + ad_tab["warmth_x_placement"][a, pl]),
        }
        eta = terms["ad"] + terms["region"] + terms["main"] + terms["season"] + terms["interaction"]
        return {"eta": eta, "terms": terms}

    def _drift(self, acc: np.ndarray, state: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        late = seconds >= self.drift_start_s
        return np.where(late, self.drift_account[acc] + self.drift_state[state], 0.0)

    # ------------------------------------------------------------------ rows
    def _draw(self, rng: np.random.Generator, m: int, frac: np.ndarray, use_drift: bool = True) -> dict:
        """Draw m impressions at timeline quantiles ``frac`` (sorted frac -> sorted times)."""
        u = rng.random((7, m))
        a = np.minimum(np.searchsorted(self.ad_cum, u[0], side="right"), len(self.ad_cum) - 1)
        country = self.campaign_country[self.campaign_of_ad[a]]
        city = np.searchsorted(self.city_cum, country + u[1], side="right")
        city = np.minimum(city, len(self.city_cum) - 1)
        # float rounding at a country's upper edge can step one city too far
        city = np.where(self.city_country[city] != country, city - 1, city)
        state = self.city_state[city]
        pl, dev, age, gen = (_pick(u[2], PLACEMENT_P), _pick(u[3], DEVICE_P), _pick(u[4], AGE_P),
                             _pick(u[5], GENDER_P))
        seconds = np.floor(np.interp(frac, self.time_cum, self.time_grid_s)).astype(np.int64)
        seconds = np.minimum(seconds, self.knobs["days"] * 86400 - 1)
        hour = (seconds // 3600) % 24
        dow = (self.start_dow + seconds // 86400) % 7
        out = self._eta(self._ad, a, state, city, self.city_density[city], pl, dev, age, gen, hour, dow)
        logit = self.b0 + out["eta"]
        if use_drift:
            logit = logit + self._drift(self.account_of_ad[a], state, seconds)
        ctr = expit(logit)
        out.update(a=a, city=city, state=state, pl=pl, dev=dev, age=age, gen=gen, seconds=seconds,
                   hour=hour, dow=dow, ctr=ctr, clicked=(u[6] < ctr).astype(np.int64))
        return out

    def _block(self, b: int, n: int) -> dict:
        lo, hi = b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, n)
        rng = np.random.default_rng(np.random.SeedSequence(self.sample_seed, spawn_key=(1, b)))
        m = hi - lo
        frac = (np.arange(lo, hi, dtype=np.float64) + rng.random(m)) / n
        return self._draw(rng, m, frac)

    def _frame(self, r: dict, sl: slice, row0: int) -> pd.DataFrame:
        a, city, state = r["a"][sl], r["city"][sl], r["state"][sl]
        g, c = self.ad_group_of_ad[a], self.campaign_of_ad[a]
        ns = self.start.value + r["seconds"][sl] * 1_000_000_000
        cols = {
            "timestamp": ns.view("datetime64[ns]"),
            "hour": r["hour"][sl],
            "day_of_week": r["dow"][sl],
            "account_id": _str_array(self.account_ids, self.account_of_campaign[c]),
            "campaign_id": _str_array(self.campaign_ids, c),
            "ad_group_id": _str_array(self.ad_group_ids, g),
            "ad_id": _str_array(self.ad_ids, a),
            "headline": _str_array(self.ad_headline, a),
            "description": _str_array(self.ad_description, a),
            "main_image": self.ad_image[a],
            "budget": self.campaign_budget[c],
            "bid": self.group_bid[g],
            "placement": _str_array(np.array(PLACEMENTS, dtype=object), r["pl"][sl]),
            "device": _str_array(np.array(DEVICES, dtype=object), r["dev"][sl]),
            "country": _str_array(self.country_names, self.city_country[city]),
            "state": _str_array(self.state_names, state),
            "city": _str_array(self.city_names, city),
            "latitude": self.city_lat[city],
            "longitude": self.city_lon[city],
            "population_density": self.city_density[city],
            "age_band": _str_array(np.array(AGE_BANDS, dtype=object), r["age"][sl]),
            "gender": _str_array(np.array(GENDERS, dtype=object), r["gen"][sl]),
            "true_ctr": r["ctr"][sl],
            "clicked": r["clicked"][sl],
        }
        return pd.DataFrame(cols, index=pd.RangeIndex(row0, row0 + len(a)))

    # ------------------------------------------------------------------ public API
    def iter_chunks(self, n: int, chunk_size: int = 100_000) -> Iterator[pd.DataFrame]:
        """Yield the ``n`` rows of ``sample(n)`` as frames of at most ``chunk_size`` rows.

        Only one block of draws and one chunk are alive at a time, so memory stays flat in ``n``.
        Chunks carry their global row positions as index.
        """
        n, chunk_size = int(n), int(chunk_size)
        if n < 0 or chunk_size < 1:
            raise ValueError(f"need n >= 0 and chunk_size >= 1, got n={n}, chunk_size={chunk_size}")
        cached_b, cached = -1, None
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            parts = []
            for b in range(lo // BLOCK_ROWS, (hi - 1) // BLOCK_ROWS + 1):
                if b != cached_b:
                    cached_b, cached = b, self._block(b, n)
                b_lo = b * BLOCK_ROWS
                s = slice(max(lo, b_lo) - b_lo, min(hi, b_lo + BLOCK_ROWS) - b_lo)
                parts.append(self._frame(cached, s, max(lo, b_lo)))
            yield parts[0] if len(parts) == 1 else pd.concat(parts)

    def rows(self, n: int, lo: int, hi: int) -> pd.DataFrame:
        """Rows ``lo:hi`` of ``sample(n)``, drawing only the blocks they fall in (streaming reads)."""
        n, lo, hi = int(n), int(lo), int(hi)
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"need 0 <= lo <= hi <= n, got lo={lo}, hi={hi}, n={n}")
        if lo == hi:
            return self._frame(self._block(0, 0), slice(0, 0), lo)
        parts = []
        for b in range(lo // BLOCK_ROWS, (hi - 1) // BLOCK_ROWS + 1):
            b_lo = b * BLOCK_ROWS
            s = slice(max(lo, b_lo) - b_lo, min(hi, b_lo + BLOCK_ROWS) - b_lo)
            parts.append(self._frame(self._block(b, n), s, max(lo, b_lo)))
        return parts[0] if len(parts) == 1 else pd.concat(parts)

    def sample(self, n: int) -> pd.DataFrame:
        """``n`` impressions, time-ordered, columns ``COLUMNS`` (equals ``pd.concat(iter_chunks(n))``)."""
        n = int(n)
        if n == 0:
            return self._frame(self._block(0, 0), slice(0, 0), 0)
        return pd.concat(list(self.iter_chunks(n, chunk_size=max(n, 1))))

    def true_logit(self, df: pd.DataFrame) -> np.ndarray:
        """Recompute ``logit(true_ctr)`` from a frame's feature columns (not from ``ad_id``).

        Text effects come from the words, image effects from the pixels, the bid effect from ``bid``;
        ids, regions and categorical fields are looked up in this world's tables.
        """
        missing = [c for c in COLUMNS if c not in df.columns and c not in ("true_ctr", "clicked")]
        if missing:
            raise ValueError(f"true_logit: missing columns {missing}")

        def codes(col: str, values: Sequence[str]) -> np.ndarray:
            idx = pd.Index(list(values)).get_indexer(df[col].astype(object))
            if (idx < 0).any():
                bad = df[col].iloc[int(np.flatnonzero(idx < 0)[0])]
                raise ValueError(f"true_logit: {col}={bad!r} is not in this world")
            return idx

        acc, cmp = codes("account_id", self.account_ids), codes("campaign_id", self.campaign_ids)
        state, city = codes("state", self.state_names), codes("city", self.city_names)
        pl, dev = codes("placement", PLACEMENTS), codes("device", DEVICES)
        age, gen = codes("age_band", AGE_BANDS), codes("gender", GENDERS)
        ts = df["timestamp"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        seconds = (ts - self.start.value) // 1_000_000_000
        hour = (seconds // 3600) % 24
        dow = (self.start_dow + seconds // 86400) % 7

        # Ad-level terms once per distinct (headline, description, image object, bid, account, campaign).
        img_obj = df["main_image"].to_numpy(dtype=object)
        keys = np.stack([
            pd.factorize(df["headline"])[0], pd.factorize(df["description"])[0],
            pd.factorize(np.fromiter((id(x) for x in img_obj), dtype=np.int64, count=len(df)))[0],
            pd.factorize(df["bid"])[0], acc, cmp,
        ], axis=1)
        _, first, a = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        a = a.reshape(-1)
        images = np.stack([np.asarray(img_obj[i], dtype=np.uint8) for i in first])
        ad_tab = self._ad_terms(
            df["headline"].to_numpy(dtype=object)[first], df["description"].to_numpy(dtype=object)[first],
            images, df["bid"].to_numpy(dtype=np.float64)[first], acc[first], cmp[first],
        )
        out = self._eta(ad_tab, a, state, city, df["population_density"].to_numpy(np.float64),
                        pl, dev, age, gen, hour, dow)
        return self.b0 + out["eta"] + self._drift(acc, state, seconds)

    def performance_series(self, **knobs: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The world's daily performance series with labelled injected anomalies (series, anomalies);
        see within/data/performance.py for the formula and the knobs."""
        from within.data.performance import generate_performance  # it builds on this module

        return generate_performance(self, **knobs)

    def true_logit_terms(self, df: pd.DataFrame) -> pd.DataFrame:
        """Each term of the true logit per row (columns below); the columns sum to ``true_logit(df)``.

        ``intercept`` (b0), ``account``, ``campaign``, ``state``, ``city``, ``population_density``,
        ``headline``, ``description``, ``main_image``, ``bid``, ``placement``, ``device``, ``age_band``,
        ``gender``, ``hour``, ``day_of_week``, ``device_x_placement``, ``age_x_topic``,
        ``warmth_x_placement``, ``drift_account``, ``drift_state``.

        ``frame.attrs["fields"]`` maps each term to the columns it reads, so a term can be
        recomputed on rows whose columns come from different impressions (e.g. one row's device
        with another's placement). Unlike ``true_logit``, hour and day of week are read from the
        ``hour`` and ``day_of_week`` columns (the timestamp only decides drift); on simulated
        rows the two agree.
        """
        need = [c for c in COLUMNS if c not in ("true_ctr", "clicked")]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"true_logit_terms: missing columns {missing}")

        def codes(col: str, values: Sequence[str]) -> np.ndarray:
            idx = pd.Index(list(values)).get_indexer(df[col].astype(object))
            if (idx < 0).any():
                raise ValueError(f"true_logit_terms: {col}={df[col].iloc[int(np.argmax(idx < 0))]!r} is not in this world")
            return idx

        def per_unique(col: str, key: Any, fn: Any) -> tuple:
            """fn over the distinct values of a column, broadcast back to rows."""
            inverse, _ = pd.factorize(key)
            first = np.unique(inverse, return_index=True)[1]
            return tuple(np.asarray(part)[inverse] for part in fn(df[col].to_numpy(dtype=object)[first]))

        k = self.knobs
        me, ss, ix = k["main_effect_scale"], k["seasonality_scale"], k["interaction_scale"]
        acc, cmp = codes("account_id", self.account_ids), codes("campaign_id", self.campaign_ids)
        state, city = codes("state", self.state_names), codes("city", self.city_names)
        pl, dev = codes("placement", PLACEMENTS), codes("device", DEVICES)
        age, gen = codes("age_band", AGE_BANDS), codes("gender", GENDERS)
        hour = df["hour"].to_numpy(dtype=np.int64)
        dow = df["day_of_week"].to_numpy(dtype=np.int64)
        h_eff, h_top, h_n = per_unique("headline", df["headline"], self._text_terms)
        d_eff, d_top, d_n = per_unique("description", df["description"], self._text_terms)
        images = df["main_image"].to_numpy(dtype=object)
        warmth, bright, sal = per_unique("main_image", np.fromiter(map(id, images), np.int64, len(images)),
                                         lambda imgs: image_stats(np.stack([np.asarray(x, np.uint8) for x in imgs])))
        share = (h_top + d_top) / (h_n + d_n)[:, None]
        z = (np.log(df["population_density"].to_numpy(np.float64)) - self.log_density_mean) / self.log_density_sd
        ts = df["timestamp"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        late = (ts - self.start.value) // 1_000_000_000 >= self.drift_start_s
        n = len(df)
        terms = {
            "intercept": np.full(n, self.b0),
            "account": self.account_effect[acc],
            "campaign": self.campaign_effect[cmp],
            "state": self.state_effect[state],
            "city": self.city_effect[city],
            "population_density": k["density_coef"] * z,
            "headline": k["text_scale"] * h_eff,
            "description": k["text_scale"] * d_eff,
            "main_image": k["image_scale"] * (K_WARM * warmth - K_BRIGHT * (bright - 0.5) ** 2 + K_SAL * sal),
            "bid": k["bid_coef"] * np.log(df["bid"].to_numpy(np.float64)),
            "placement": me * np.take(PLACEMENT_EFFECT, pl),
            "device": me * np.take(DEVICE_EFFECT, dev),
            "age_band": me * np.take(AGE_EFFECT, age),
            "gender": me * np.take(GENDER_EFFECT, gen),
            "hour": ss * self.hour_table[hour],
            "day_of_week": ss * self.dow_table[dow],
            "device_x_placement": ix * np.asarray(DEVICE_X_PLACEMENT)[dev, pl],
            "age_x_topic": ix * np.einsum("nk,nk->n", share, self.age_x_topic[age]),
            "warmth_x_placement": ix * warmth / WARMTH_UNIT * np.take(WARMTH_X_PLACEMENT, pl),
            "drift_account": np.where(late, self.drift_account[acc], 0.0),
            "drift_state": np.where(late, self.drift_state[state], 0.0),
        }
        out = pd.DataFrame(terms, index=df.index)
        singles = ("population_density", "headline", "description", "main_image", "bid", "placement", "device",
                   "age_band", "gender", "hour", "day_of_week")
        out.attrs["fields"] = {
            "intercept": [], "account": ["account_id"], "campaign": ["campaign_id"], "state": ["state"],
            "city": ["city"], **{t: [t] for t in singles},
            "device_x_placement": ["device", "placement"],
            "age_x_topic": ["age_band", "headline", "description"],
            "warmth_x_placement": ["main_image", "placement"],
            "drift_account": ["account_id", "timestamp"], "drift_state": ["state", "timestamp"],
        }
        return out

    def world_summary(self) -> dict[str, Any]:
        """Sizes, effect tables and the spread of each logit term (JSON-serialisable)."""
        t = self._pilot_terms
        ad = self._ad
        w = np.diff(np.concatenate([[0.0], self.ad_cum]))  # traffic share per ad
        return {
            "seed": self.seed,
            "knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.knobs.items()},
            "drift": dict(self.drift),
            "sizes": {
                "accounts": int(self.n_accounts), "campaigns": len(self.campaign_ids),
                "ad_groups": len(self.ad_group_ids), "ads": len(self.ad_ids),
                "countries": len(self.country_names), "states": len(self.state_names),
                "cities": len(self.city_names), "vocab": len(self.vocab),
            },
            "b0": self.b0,
            "countries": list(self.country_names),
            "effects": {
                "placement": dict(zip(PLACEMENTS, PLACEMENT_EFFECT)),
                "device": dict(zip(DEVICES, DEVICE_EFFECT)),
                "age_band": dict(zip(AGE_BANDS, AGE_EFFECT)),
                "gender": dict(zip(GENDERS, GENDER_EFFECT)),
                "hour": [float(x) for x in self.hour_table],
                "day_of_week": list(DOW_EFFECT),
                "device_x_placement": {d: dict(zip(PLACEMENTS, row)) for d, row in zip(DEVICES, DEVICE_X_PLACEMENT)},
                "warmth_x_placement": dict(zip(PLACEMENTS, WARMTH_X_PLACEMENT)),
                "age_x_topic": self.age_x_topic.tolist(),
                "image": {"K_WARM": K_WARM, "K_BRIGHT": K_BRIGHT, "K_SAL": K_SAL},
            },
            # Impression-weighted standard deviation of each part of the logit (from the pilot draw).
            "logit_sd": {
                **{f"ad/{name}": float(np.sqrt(np.cov(ad[name], aweights=w)))
                   for name in ("hierarchy", "text", "image", "bid")},
                **{name: float(v.std()) for name, v in t.items()},
                "total": float(sum(t.values()).std()),
            },
        }


def simulate(n: int = 300_000, seed: int = 7, **knobs: Any) -> pd.DataFrame:
    """``AdMarketSimulator(seed, **knobs).sample(n)``: the callable behind ``conf/data/synthetic.yaml``."""
    return AdMarketSimulator(seed=seed, **knobs).sample(n)
