"""Geospatial calibration: region logit offsets, spatial smoothing of sparse regions, and a shrunken
per-region hour-of-day adjustment.

    logit p_i = g(s_i) + o[region(i)] + h[t(i)] + r[region(i), t(i)]

1. `g`: a global calibrator (temperature with bias by default).
2. Region offsets along the geo chain country -> state -> city (up to `geo_level`, using the
   levels present in `regions`): empirical-Bayes random intercepts, each shrunk toward its parent,
   tau^2 by the DerSimonian-Laird (1986) method of moments, fitted by backfitting.
3. Spatial smoothing (Tobler's first law; an adaptive-bandwidth kernel as in geographically
   weighted regression, Fotheringham et al. 2002): a region with n < `min_samples_per_region`
   impressions keeps a share n / min_samples of its own offset and takes the rest from its k =
   `smoothing_neighbors` nearest regions by great-circle (haversine) distance between centroids,
   with weights
       w_ij = exp(-d_ij / h_i) * exp(-|log(1 + rho_i) - log(1 + rho_j)|) * n_j / (n_j + min_samples)
   h_i = median distance to its k neighbours (adaptive bandwidth, so dense clusters of small
   regions use a short range); the second factor prefers neighbours of similar population density
   (urban with urban); the third trusts well-measured neighbours. Without latitude/longitude the
   step is skipped and the parent shrinkage of step 2 is all the smoothing.
4. Seasonal: a global effect h[t] per hour (or day_of_week) and a region x hour increment r
   shrunk toward it, both empirical Bayes (so a sparse region's hours stay near the global curve).

Fallback for an unseen region (`fallback_strategy`): 'parent' takes its deepest seen ancestor's
offset (state, then country, then 0); 'neighbors' takes the kernel mean of the k nearest fitted
regions to the row's latitude/longitude (rows without coordinates use 'parent'); 'global' uses
offset 0. An unseen region gets the global hour curve; an unseen hour gets no seasonal term.
Every term is constant given (region, hour), so order is preserved within a region-hour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from within.calibration._methods import make_base
from within.calibration._offsets import backfit
from within.calibration.base import (
    Calibrator,
    as_keys,
    calibrator_from_dict,
    check_labels,
    check_scores,
    figure_or_file,
    register,
    sigmoid,
)

GEO_CHAIN = ("country", "state", "city")
SEASON_KEYS = ("hour", "day_of_week")
_EARTH_KM = 6371.0


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in km (broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi, dlmb = p2 - p1, np.radians(lon2) - np.radians(lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * _EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])


def _knn(lat: np.ndarray, lon: np.ndarray, clat: np.ndarray, clon: np.ndarray, k: int,
         self_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices [M, k], great-circle km [M, k]) of the k nearest centroids. A KD-tree on unit
    vectors: chord length is monotone in great-circle distance, so the neighbours are the same.
    `self_index[i]` (the query's own centroid) is excluded when given."""
    extra = 0 if self_index is None else 1
    k = min(k, clat.size - extra)
    if k <= 0:
        return np.zeros((lat.size, 0), dtype=np.int64), np.zeros((lat.size, 0))
    tree = cKDTree(_unit_xyz(clat, clon))
    chord, idx = tree.query(_unit_xyz(lat, lon), k=k + extra)
    chord, idx = chord.reshape(lat.size, -1), idx.reshape(lat.size, -1)
    if self_index is not None:
        # drop the query's own centroid (or, if ties hid it, the farthest of the k + 1)
        is_self = idx == self_index[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(lat.size), drop] = False
        idx, chord = idx[keep].reshape(lat.size, k), chord[keep].reshape(lat.size, k)
    dist = 2 * _EARTH_KM * np.arcsin(np.clip(chord / 2, 0.0, 1.0))
    return idx.astype(np.int64), dist


def _kernel_weights(dist: np.ndarray) -> np.ndarray:
    h = np.maximum(np.median(dist, axis=1, keepdims=True), 1.0)  # adaptive bandwidth, >= 1 km
    return np.exp(-dist / h)


@register("geospatial")
class GeospatialCalibrator(Calibrator):
    """Region-aware calibration (see module docstring for the model and the smoothing rule).

    Args:
        geo_level: 'city' | 'state' | 'country': the finest level given an offset.
        smoothing_neighbors: k nearest regions used for sparse regions and 'neighbors' fallback.
        min_samples_per_region: impressions below which a region borrows from its neighbours.
        fallback_strategy: 'parent' | 'neighbors' | 'global' for regions unseen at fit time.
        calibration_method: global map, 'temperature' | 'platt' | 'isotonic' | 'spline'.
        smoothing: prior precision on offsets; None estimates it (method of moments).
        seasonal: fit the hour / day_of_week term when that column is present.
        max_iter: backfitting passes.
    """

    # columns beyond the group fields that fit/transform read when present (coordinates and density
    # for the spatial smoothing, hour / day_of_week for the seasonal term); AdScorePredictor.group_columns
    # passes them, so the smoothing and seasonal steps are not silently skipped
    required_columns = ("latitude", "longitude", "population_density", *SEASON_KEYS)

    def __init__(
        self,
        geo_level: str = "city",
        smoothing_neighbors: int = 5,
        min_samples_per_region: int = 200,
        fallback_strategy: str = "parent",
        calibration_method: str = "temperature",
        smoothing: float | None = None,
        seasonal: bool = True,
        max_iter: int = 5,
    ) -> None:
        if geo_level not in GEO_CHAIN:
            raise ValueError(f"geo_level must be one of {list(GEO_CHAIN)}, got {geo_level!r}")
        if fallback_strategy not in ("parent", "neighbors", "global"):
            raise ValueError(f"fallback_strategy must be 'parent', 'neighbors' or 'global', got {fallback_strategy!r}")
        if int(smoothing_neighbors) < 1:
            raise ValueError(f"smoothing_neighbors must be >= 1, got {smoothing_neighbors}")
        if int(min_samples_per_region) < 0:
            raise ValueError(f"min_samples_per_region must be >= 0, got {min_samples_per_region}")
        make_base(calibration_method, "GeospatialCalibrator")
        self.geo_level = geo_level
        self.smoothing_neighbors = int(smoothing_neighbors)
        self.min_samples_per_region = int(min_samples_per_region)
        self.fallback_strategy = fallback_strategy
        self.calibration_method = calibration_method
        self.smoothing = None if smoothing is None else float(smoothing)
        self.seasonal = bool(seasonal)
        self.max_iter = int(max_iter)
        self.base_: Calibrator | None = None
        self.chain_: list[str] = []
        self.paths_: list[pd.MultiIndex] = []
        self.totals_: list[np.ndarray] = []  # cumulative offset per level (deepest = region, smoothed)
        self.region_n_ = np.zeros(0)
        self.region_lat_: np.ndarray | None = None
        self.region_lon_: np.ndarray | None = None
        self.region_smoothed_ = np.zeros(0, dtype=bool)
        self.season_key_: str | None = None
        self.season_values_: list[str] = []
        self.season_global_ = np.zeros(0)
        self.season_region_ = np.zeros((0, 0))

    # --- input handling ------------------------------------------------------------------------
    def _chain(self, regions: dict) -> list[str]:
        stop = GEO_CHAIN.index(self.geo_level)
        return [lv for lv in GEO_CHAIN[: stop + 1] if lv in regions]

    def _check_regions(self, regions: Any, n: int) -> dict[str, np.ndarray]:
        if not isinstance(regions, dict):
            raise ValueError("GeospatialCalibrator: regions must be a dict {column: array[N]} "
                             f"with at least {self.geo_level!r}, got {type(regions).__name__}")
        if self.geo_level not in regions:
            raise ValueError(f"GeospatialCalibrator: regions has no {self.geo_level!r} column "
                             f"(have {sorted(regions)}); pass it or set geo_level")
        out = {}
        for k, v in regions.items():
            a = np.asarray(v)
            if a.shape != (n,):
                raise ValueError(f"GeospatialCalibrator: regions[{k!r}] has shape {a.shape}, expected ({n},)")
            out[k] = a
        for k in ("latitude", "longitude", "population_density"):
            if k in out:
                out[k] = out[k].astype(np.float64)
                if not np.all(np.isfinite(out[k])):
                    raise ValueError(f"GeospatialCalibrator: regions[{k!r}] has NaN/inf; fill it or drop the column")
        return out

    def _season(self, regions: dict) -> str | None:
        return next((k for k in SEASON_KEYS if k in regions), None) if self.seasonal else None

    # --- fit ----------------------------------------------------------------------------------
    def fit(
        self, X: Any, y: Any, regions: dict | None = None, weight: Any = None, groups: dict | None = None
    ) -> GeospatialCalibrator:
        # `groups=` is the shared calibrator keyword; `regions` the name this class documents
        regions = regions if regions is not None else groups
        s = check_scores(X, "X")
        n = s.shape[0]
        clicks, imps = check_labels(y, n, weight)
        reg = self._check_regions(regions, n)
        self.chain_ = self._chain(reg)
        keys = [as_keys(reg[lv]) for lv in self.chain_]
        base = make_base(self.calibration_method, "GeospatialCalibrator")
        if self.calibration_method == "temperature":
            base = type(base)(fit_bias=True)  # offsets shrink to 0, so the base carries the overall rate
        self.base_ = base.fit(s, clicks, weight=imps if weight is not None else None)
        base_eta = self.base_.transform_logit(s)

        codes, self.paths_ = [], []
        for depth in range(len(keys)):
            c, uniq = pd.MultiIndex.from_arrays(keys[: depth + 1]).factorize()
            codes.append(c)
            self.paths_.append(uniq)
        offsets, _, _ = backfit(base_eta, clicks, imps, codes, [len(u) for u in self.paths_],
                                self.smoothing, self.max_iter, 1e-4)
        self.totals_ = []
        for depth, (c, off) in enumerate(zip(codes, offsets)):
            tot = off.copy()
            if depth > 0:
                parent = np.zeros(len(off), dtype=np.int64)
                parent[c] = codes[depth - 1]
                tot += self.totals_[-1][parent]
            self.totals_.append(tot)

        rc = codes[-1]
        n_reg = len(self.paths_[-1])
        self.region_n_ = np.bincount(rc, imps, n_reg)
        self.region_smoothed_ = np.zeros(n_reg, dtype=bool)
        if "latitude" in reg and "longitude" in reg:
            wsum = np.maximum(self.region_n_, 1e-12)
            self.region_lat_ = np.bincount(rc, imps * reg["latitude"], n_reg) / wsum
            self.region_lon_ = np.bincount(rc, imps * reg["longitude"], n_reg) / wsum
            dens = None
            if "population_density" in reg:
                dens = np.bincount(rc, imps * reg["population_density"], n_reg) / wsum
            self._smooth_sparse(dens)
        else:
            self.region_lat_ = self.region_lon_ = None

        self.season_key_ = self._season(reg)
        if self.season_key_ is not None:
            eta = base_eta + self.totals_[-1][rc]
            t_codes, t_uniq = pd.factorize(as_keys(reg[self.season_key_]))
            n_t = len(t_uniq)
            (glob, inter), _, _ = backfit(eta, clicks, imps, [t_codes, rc * n_t + t_codes],
                                          [n_t, n_reg * n_t], self.smoothing, self.max_iter, 1e-4)
            self.season_values_ = [str(v) for v in t_uniq]
            self.season_global_ = glob
            self.season_region_ = inter.reshape(n_reg, n_t)
        else:
            self.season_values_, self.season_global_ = [], np.zeros(0)
            self.season_region_ = np.zeros((n_reg, 0))
        self.fitted_ = True
        return self

    def _smooth_sparse(self, dens: np.ndarray | None) -> None:
        m = float(self.min_samples_per_region)
        sparse = np.flatnonzero(self.region_n_ < m)
        if sparse.size == 0 or len(self.region_n_) < 2:
            return
        own = self.totals_[-1]
        # neighbours exclude the region itself: its own estimate enters through the share n / m
        nb, dist = _knn(self.region_lat_[sparse], self.region_lon_[sparse], self.region_lat_,
                        self.region_lon_, self.smoothing_neighbors, self_index=sparse)
        w = _kernel_weights(dist)
        if dens is not None:
            ld = np.log1p(np.maximum(dens, 0.0))
            w *= np.exp(-np.abs(ld[sparse][:, None] - ld[nb]))
        w *= self.region_n_[nb] / (self.region_n_[nb] + m)
        wsum = w.sum(axis=1)
        ok = wsum > 0
        share = np.clip(self.region_n_[sparse] / m, 0.0, 1.0)
        nb_mean = np.where(ok, (w * own[nb]).sum(axis=1) / np.where(ok, wsum, 1.0), own[sparse])
        smoothed = own.copy()
        smoothed[sparse] = share * own[sparse] + (1 - share) * nb_mean
        self.totals_[-1] = smoothed
        self.region_smoothed_[sparse[ok]] = True

    # --- transform ----------------------------------------------------------------------------
    def _region_offsets(self, reg: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
        chain = [lv for lv in self.chain_ if lv in reg]
        if chain != self.chain_:
            raise ValueError(f"GeospatialCalibrator: regions needs columns {self.chain_} (fitted on them), "
                             f"got {sorted(reg)}")
        keys = [as_keys(reg[lv]) for lv in self.chain_]
        ridx = self.paths_[-1].get_indexer(pd.MultiIndex.from_arrays(keys))
        out = np.zeros(n)
        seen = ridx >= 0
        out[seen] = self.totals_[-1][ridx[seen]]
        unseen = np.flatnonzero(~seen)
        if unseen.size == 0 or self.fallback_strategy == "global":
            return out, ridx
        todo = unseen
        if (self.fallback_strategy == "neighbors" and self.region_lat_ is not None
                and "latitude" in reg and "longitude" in reg):
            nb, dist = _knn(reg["latitude"][todo], reg["longitude"][todo], self.region_lat_,
                            self.region_lon_, self.smoothing_neighbors)
            w = _kernel_weights(dist) * self.region_n_[nb] / (self.region_n_[nb] + self.min_samples_per_region)
            out[todo] = (w * self.totals_[-1][nb]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)
            return out, ridx
        # 'parent' (and 'neighbors' without coordinates): deepest seen ancestor
        for depth in range(len(self.chain_) - 2, -1, -1):
            if todo.size == 0:
                break
            pidx = self.paths_[depth].get_indexer(pd.MultiIndex.from_arrays([k[todo] for k in keys[: depth + 1]]))
            hit = pidx >= 0
            out[todo[hit]] = self.totals_[depth][pidx[hit]]
            todo = todo[~hit]
        return out, ridx

    def transform_logit(self, X: Any, regions: dict | None = None, groups: dict | None = None) -> np.ndarray:
        regions = regions if regions is not None else groups
        self._require_fitted()
        s = check_scores(X, "X")
        n = s.shape[0]
        reg = self._check_regions(regions, n)
        off, ridx = self._region_offsets(reg, n)
        eta = self.base_.transform_logit(s) + off
        if self.season_key_ is not None and self.season_values_:
            if self.season_key_ not in reg:
                raise ValueError(f"GeospatialCalibrator: fitted with a {self.season_key_!r} term; "
                                 f"pass regions[{self.season_key_!r}]")
            tidx = pd.Index(self.season_values_).get_indexer(as_keys(reg[self.season_key_]))
            ok_t = tidx >= 0
            eta[ok_t] += self.season_global_[tidx[ok_t]]
            both = ok_t & (ridx >= 0)
            eta[both] += self.season_region_[ridx[both], tidx[both]]
        return eta

    def transform(self, X: Any, regions: dict | None = None, groups: dict | None = None) -> np.ndarray:
        """Calibrated probabilities for logits X in `regions` ({column: array[N]}; `groups=` is the
        shared calibrator keyword for the same dict)."""
        return sigmoid(self.transform_logit(X, regions, groups))

    def fit_transform(self, X: Any, y: Any, regions: dict | None = None, weight: Any = None,
                      groups: dict | None = None) -> np.ndarray:
        return self.fit(X, y, regions, weight=weight, groups=groups).transform(X, regions, groups)

    # --- reporting ----------------------------------------------------------------------------
    def get_region_factors(self) -> dict[str, dict[str, Any]]:
        """Per region ("country/state/city"): logit offset, odds factor exp(offset), impressions,
        centroid and whether spatial smoothing changed it."""
        self._require_fitted()
        out = {}
        for i, path in enumerate(self.paths_[-1].tolist()):
            o = float(self.totals_[-1][i])
            out["/".join(path)] = {
                "offset": o, "factor": float(np.exp(o)), "n": float(self.region_n_[i]),
                "latitude": None if self.region_lat_ is None else float(self.region_lat_[i]),
                "longitude": None if self.region_lon_ is None else float(self.region_lon_[i]),
                "smoothed": bool(self.region_smoothed_[i]),
            }
        return out

    def plot_region_map(self, path: str | Path | None = None) -> Any:
        """Scatter of odds factors at region centroids (size ~ impressions, black edge: smoothed).
        Returns the matplotlib Figure, or writes a PNG to `path` and returns the path."""
        self._require_fitted()
        if self.region_lat_ is None:
            raise ValueError("plot_region_map: fitted without latitude/longitude; pass them in regions to map")
        from matplotlib.figure import Figure

        log_fac = self.totals_[-1]
        size = 10 + 90 * np.sqrt(self.region_n_ / max(self.region_n_.max(), 1.0))
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        lim = max(float(np.max(np.abs(log_fac))), 1e-3)
        sc = ax.scatter(self.region_lon_, self.region_lat_, c=log_fac, s=size, cmap="RdBu_r",
                        vmin=-lim, vmax=lim, edgecolors=np.where(self.region_smoothed_, "k", "none"))
        fig.colorbar(sc, ax=ax, label="log odds factor (edge: smoothed)")
        ax.set(xlabel="longitude", ylabel="latitude", title=f"Calibration factor by {self.geo_level}")
        return figure_or_file(fig, path)

    # --- serialisation ------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"geo_level": self.geo_level, "smoothing_neighbors": self.smoothing_neighbors,
                "min_samples_per_region": self.min_samples_per_region,
                "fallback_strategy": self.fallback_strategy, "calibration_method": self.calibration_method,
                "smoothing": self.smoothing, "seasonal": self.seasonal, "max_iter": self.max_iter}

    def _state(self) -> dict[str, Any]:
        return {
            "base": self.base_.to_dict(),
            "chain": self.chain_,
            "levels": [{"paths": [list(p) for p in paths.tolist()], "totals": tot.tolist()}
                       for paths, tot in zip(self.paths_, self.totals_)],
            "region_n": self.region_n_.tolist(),
            "region_lat": None if self.region_lat_ is None else self.region_lat_.tolist(),
            "region_lon": None if self.region_lon_ is None else self.region_lon_.tolist(),
            "region_smoothed": self.region_smoothed_.tolist(),
            "season_key": self.season_key_,
            "season_values": self.season_values_,
            "season_global": self.season_global_.tolist(),
            "season_region": self.season_region_.tolist(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.base_ = calibrator_from_dict(state["base"])
        self.chain_ = [str(c) for c in state["chain"]]
        if not self.chain_ or any(c not in GEO_CHAIN for c in self.chain_):
            raise ValueError(f"geospatial state: bad geo chain {self.chain_!r}")
        self.paths_, self.totals_ = [], []
        for depth, lv in enumerate(state["levels"]):
            paths = [tuple(str(k) for k in p) for p in lv["paths"]]
            if not paths or any(len(p) != depth + 1 for p in paths) or len(paths) != len(lv["totals"]):
                raise ValueError(f"geospatial state: level {depth} paths/totals are inconsistent")
            self.paths_.append(pd.MultiIndex.from_tuples(paths))
            self.totals_.append(np.asarray(lv["totals"], dtype=np.float64))
        self.region_n_ = np.asarray(state["region_n"], dtype=np.float64)
        self.region_lat_ = None if state["region_lat"] is None else np.asarray(state["region_lat"], float)
        self.region_lon_ = None if state["region_lon"] is None else np.asarray(state["region_lon"], float)
        self.region_smoothed_ = np.asarray(state["region_smoothed"], dtype=bool)
        self.season_key_ = state["season_key"]
        self.season_values_ = [str(v) for v in state["season_values"]]
        self.season_global_ = np.asarray(state["season_global"], dtype=np.float64)
        self.season_region_ = np.asarray(state["season_region"], dtype=np.float64).reshape(
            len(self.region_n_), len(self.season_values_))
