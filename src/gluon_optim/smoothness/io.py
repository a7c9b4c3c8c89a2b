r"""Files of the smoothness diagnostic: the probe's JSONL records and the fits as JSON.

The probe (:class:`~gluon_optim.smoothness.SmoothnessProbe`) appends one JSON line per
measurement of ``L_hat = ||g_{k+1} - g_k||_* / ||X^{k+1} - X^k||`` and ``||g_{k+1}||_*``;
:func:`read_records` reads such a file back. :func:`save_fits` / :func:`load_fits` store the
fitted constants of ``L_hat ~ L0 + L1 ||g||_*`` (Riabinin et al., "Gluon: Making Muon & Scion
Great Again!", arXiv 2505.13416, Section 5), the file that ``gluon-optim train --fit`` reads to
set Theorem 1's radii. Plain data only: no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gluon_optim.smoothness.fit import Fit

__all__ = ["load_fits", "read_records", "save_fits"]

_FITS_FORMAT = "gluon-optim/smoothness-fits"
_FITS_VERSION = 1


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a probe's JSONL sink back.

    A malformed last line (a run killed mid-write) is skipped; a malformed line elsewhere is
    an error naming the line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


def save_fits(
    path: str | Path, fits: Mapping[str, Fit], *, meta: Mapping[str, Any] | None = None
) -> None:
    """Write fits as JSON (atomically: a temporary file renamed into place).

    ``meta`` (plain data, e.g. the run and the penalty) is stored alongside. Read back with
    :func:`load_fits`.
    """
    path = Path(path)
    doc = {
        "format": _FITS_FORMAT,
        "version": _FITS_VERSION,
        "meta": dict(meta or {}),
        "fits": {str(k): dataclasses.asdict(f) for k, f in fits.items()},
    }
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_fits(path: str | Path) -> dict[str, Fit]:
    """Read fits written by :func:`save_fits`; a malformed file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FITS_FORMAT:
        raise ValueError(f"{path}: not a smoothness fits file (format {_FITS_FORMAT!r})")
    if doc.get("version") != _FITS_VERSION:
        raise ValueError(f"{path}: unsupported version {doc.get('version')!r}")
    raw = doc.get("fits")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: 'fits' must be an object")
    out: dict[str, Fit] = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: fit {key!r} must be an object")
        try:
            fit = Fit(
                l0=_opt_float(entry["l0"]),
                l1=_opt_float(entry["l1"]),
                mse_rel=_opt_float(entry["mse_rel"]),
                n_points=int(entry["n_points"]),
                note=str(entry.get("note", "")),
                role=str(entry.get("role", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: fit {key!r} is malformed ({err!r})") from None
        out[str(key)] = fit
    return out


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"expected a finite number or null, got {v!r}")
    return float(v)
