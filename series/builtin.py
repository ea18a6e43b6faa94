"""The built-in dataset: real ephemeris features of 13 bodies and 4 assets with planted drivers.

Celestial features come from PyEphem (LGPL-free, MIT-licensed), computed once per day at a
fixed clock time for an observer (default New York at 21:00 UTC, the NYSE close):
- Sun, Moon, Mercury ... Pluto: geocentric ecliptic longitude (as sin/cos), longitudinal speed
  (degrees/day, from the daily series), ecliptic latitude, distance (AU) and the angle to the Sun
  (sin/cos). The Sun has no latitude or angle to itself.
- North_Node / South_Node: the Moon's ascending / descending node, taken from the plane through
  two ephemeris positions of the Moon an hour apart (true node); longitude, speed, angle to Sun.
- Ascendant: the ecliptic degree rising at the observer, from ephem's local sidereal time and
  the obliquity (read from ephem by converting an ecliptic point); longitude, speed, angle to Sun.

Targets are log prices of four synthetic assets. Daily log return of asset a:
    r_a(t) = drift + beta_a * m(t) + strength_a * daily_vol * z_a(t - lag_a) + e_a(t)
where m is a shared market factor and e_a idiosyncratic noise, both Student-t (heavy tails)
scaled to `market_vol` / `idio_vol`, and z_a the standardised planted driver feature of one body
(a different body per asset). Knowing the drivers, learning and attention can be checked
against the truth. Usage: `python -m series.builtin --out data/x.csv [--start ...]`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ephem
import numpy as np

BODY_NAMES = ("Sun", "Moon", "Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus",
              "Neptune", "Pluto", "North_Node", "South_Node", "Ascendant")
_EPHEM_BODIES = {"Sun": ephem.Sun, "Moon": ephem.Moon, "Mercury": ephem.Mercury,
                 "Venus": ephem.Venus, "Mars": ephem.Mars, "Jupiter": ephem.Jupiter,
                 "Saturn": ephem.Saturn, "Uranus": ephem.Uranus, "Neptune": ephem.Neptune,
                 "Pluto": ephem.Pluto}


@dataclass
class PlantedDriver:
    target: str
    body: str
    feature: str          # a column suffix, e.g. "lon_sin" -> column "<body>_lon_sin"
    lag: int = 0          # days between the driver's value and its effect
    strength: float = 0.3  # effect per day, in units of the asset's daily volatility


def _default_drivers() -> list[PlantedDriver]:
    return [PlantedDriver("Asset_A", "Moon", "lon_sin", lag=2, strength=0.3),
            PlantedDriver("Asset_B", "Mars", "lon_cos", lag=5, strength=0.3),
            PlantedDriver("Asset_C", "Venus", "elong_sin", lag=3, strength=0.3),
            PlantedDriver("Asset_D", "Mercury", "speed", lag=1, strength=0.3)]


@dataclass
class BuiltinDataConfig:
    start_date: str = "1950-01-01"
    end_date: str = "2025-12-31"
    latitude: float = 40.7128
    longitude: float = -74.0060
    hour_utc: float = 21.0
    seed: int = 1234
    market_vol: float = 0.008
    idio_vol: float = 0.009
    tail_dof: float = 4.0
    drift: float = 0.0002
    betas: list[float] = field(default_factory=lambda: [1.0, 0.8, 1.2, 0.6])
    drivers: list[PlantedDriver] = field(default_factory=_default_drivers)

    def __post_init__(self) -> None:
        for name in ("start_date", "end_date"):
            try:
                np.datetime64(getattr(self, name), "D")
            except ValueError:
                raise ValueError(f"data.builtin.{name}: not a YYYY-MM-DD date: "
                                 f"{getattr(self, name)!r}") from None
        if np.datetime64(self.end_date) <= np.datetime64(self.start_date):
            raise ValueError("data.builtin.end_date must come after data.builtin.start_date")
        if len(self.betas) != len(self.drivers):
            raise ValueError(f"data.builtin.betas has {len(self.betas)} entries but there are "
                             f"{len(self.drivers)} drivers (one per asset)")
        for driver in self.drivers:
            if driver.body not in BODY_NAMES:
                raise ValueError(f"data.builtin.drivers: unknown body {driver.body!r}")
        if self.tail_dof <= 2:
            raise ValueError("data.builtin.tail_dof must be > 2 (finite variance)")

    @property
    def target_names(self) -> list[str]:
        return [d.target for d in self.drivers]

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def _daily_dates(config: BuiltinDataConfig) -> np.ndarray:
    return np.arange(np.datetime64(config.start_date, "D"),
                     np.datetime64(config.end_date, "D") + np.timedelta64(1, "D"))


def _ephem_date(day: np.datetime64, hour_utc: float) -> ephem.Date:
    return ephem.Date(str(day).replace("-", "/")) + hour_utc / 24.0


def _ecliptic_xyz(body) -> np.ndarray:
    ecl = ephem.Ecliptic(body)
    lon, lat = float(ecl.lon), float(ecl.lat)
    return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])


def _positions(config: BuiltinDataConfig, dates: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Longitude and latitude (degrees) and distance (AU) per body per day, from ephem."""
    observer = ephem.Observer()
    observer.lat, observer.lon = str(config.latitude), str(config.longitude)
    bodies = {name: cls() for name, cls in _EPHEM_BODIES.items()}
    n = len(dates)
    raw = {name: {"lon": np.empty(n), "lat": np.empty(n), "dist": np.empty(n)} for name in bodies}
    node_lon, asc_lon = np.empty(n), np.empty(n)
    moon_later = ephem.Moon()
    obliquity = float(ephem.Equatorial(ephem.Ecliptic("90", "0", epoch=ephem.J2000)).dec)
    for i, day in enumerate(dates):
        observer.date = _ephem_date(day, config.hour_utc)
        for name, body in bodies.items():
            body.compute(observer.date)
            ecl = ephem.Ecliptic(body)
            raw[name]["lon"][i], raw[name]["lat"][i] = math.degrees(ecl.lon), math.degrees(ecl.lat)
            raw[name]["dist"][i] = body.earth_distance
        moon_later.compute(ephem.Date(observer.date + 1 / 24))
        normal = np.cross(_ecliptic_xyz(bodies["Moon"]), _ecliptic_xyz(moon_later))
        node_lon[i] = math.degrees(math.atan2(normal[0], -normal[1]))
        ramc = float(observer.sidereal_time())
        asc_lon[i] = math.degrees(math.atan2(
            math.cos(ramc), -(math.sin(ramc) * math.cos(obliquity)
                              + math.tan(math.radians(config.latitude)) * math.sin(obliquity))))
    raw["North_Node"] = {"lon": node_lon % 360}
    raw["South_Node"] = {"lon": (node_lon + 180) % 360}
    raw["Ascendant"] = {"lon": asc_lon % 360}
    return raw


def _daily_speed(lon_deg: np.ndarray) -> np.ndarray:
    return np.gradient(np.degrees(np.unwrap(np.radians(lon_deg))))


def celestial_features(config: BuiltinDataConfig, dates: np.ndarray) -> dict[str, np.ndarray]:
    """Columns `<Body>_<feature>` for the 13 bodies, in BODY_NAMES order, one row per date.

    `dates` may be any strictly increasing days (e.g. trading days): the features are computed
    on every calendar day of their span and taken at those dates, so a speed is always degrees
    per calendar day and a date's values do not depend on which other dates are asked for.
    """
    days = np.arange(dates[0], dates[-1] + np.timedelta64(1, "D")).astype("datetime64[D]")
    rows = (np.asarray(dates, dtype="datetime64[D]") - days[0]).astype(np.int64)
    daily = _daily_features(config, days)
    return {name: values[rows] for name, values in daily.items()}


def _daily_features(config: BuiltinDataConfig, dates: np.ndarray) -> dict[str, np.ndarray]:
    raw = _positions(config, dates)
    sun_lon = np.radians(raw["Sun"]["lon"])
    columns: dict[str, np.ndarray] = {}
    for name in BODY_NAMES:
        lon = np.radians(raw[name]["lon"])
        columns[f"{name}_lon_sin"], columns[f"{name}_lon_cos"] = np.sin(lon), np.cos(lon)
        columns[f"{name}_speed"] = _daily_speed(raw[name]["lon"])
        if name not in ("Sun", "North_Node", "South_Node", "Ascendant"):
            columns[f"{name}_lat"] = raw[name]["lat"]
        if "dist" in raw[name]:
            columns[f"{name}_dist"] = raw[name]["dist"]
        if name != "Sun":
            columns[f"{name}_elong_sin"] = np.sin(lon - sun_lon)
            columns[f"{name}_elong_cos"] = np.cos(lon - sun_lon)
    return columns


def planted_log_prices(config: BuiltinDataConfig,
                       features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(config.seed)
    n = len(next(iter(features.values())))

    def student_t(vol: float, size) -> np.ndarray:
        scale = vol / math.sqrt(config.tail_dof / (config.tail_dof - 2))
        return rng.standard_t(config.tail_dof, size=size) * scale

    market = student_t(config.market_vol, n)
    daily_vol = math.sqrt(config.market_vol ** 2 + config.idio_vol ** 2)
    prices = {}
    for driver, beta in zip(config.drivers, config.betas):
        column = f"{driver.body}_{driver.feature}"
        if column not in features:
            raise ValueError(f"data.builtin.drivers: {driver.target} is driven by {column!r}, "
                             f"which is not a feature the dataset has")
        z = features[column]
        z = (z - z.mean()) / z.std()
        lagged = np.concatenate([np.zeros(driver.lag), z[:n - driver.lag]])
        returns = (config.drift + beta * market + driver.strength * daily_vol * lagged
                   + student_t(config.idio_vol, n))
        prices[driver.target] = math.log(100.0) + np.cumsum(returns)
    return prices


def write_builtin_csv(config: BuiltinDataConfig, path: Path) -> Path:
    """Generate the dataset and write it atomically as CSV (date, targets, body columns)."""
    dates = _daily_dates(config)
    features = celestial_features(config, dates)
    targets = planted_log_prices(config, features)
    return write_columns_csv(path, dates, {**targets, **features})


def write_columns_csv(path: Path, dates: np.ndarray, columns: dict[str, np.ndarray]) -> Path:
    """Write `date` and the columns (8 significant digits) as CSV, atomically (write, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["date", *columns])
        matrix = np.column_stack(list(columns.values()))
        for day, row in zip(dates, matrix):
            writer.writerow([str(day), *(f"{v:.8g}" for v in row)])
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in celestial dataset as CSV.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--start", default=BuiltinDataConfig.start_date)
    parser.add_argument("--end", default=BuiltinDataConfig.end_date)
    args = parser.parse_args(argv)
    try:
        config = BuiltinDataConfig(start_date=args.start, end_date=args.end)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {write_builtin_csv(config, args.out)}")


if __name__ == "__main__":
    main()
