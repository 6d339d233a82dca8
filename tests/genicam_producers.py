"""Simulated GenTL producers for the GenICam tests.

``viky.cti`` ships in the installed genicam 1.6.0 wheel (free-running, no trigger).  ``TLSimu.cti``
(software trigger) ships only in the genicam 1.5.0 wheel for Linux x86_64: it is downloaded from
PyPI once and its two files are kept in ``~/.cache/defect-appliance/genicam-1.5.0``.  TLSimu.cti
finds ``libVirtualFG.so`` through its ``$ORIGIN`` rpath, so no environment variable is needed.
Set ``GENICAM_TLSIMU_CTI`` to use a copy that is already on disk (an offline machine).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import genicam

VIKY_CTI = Path(genicam.__file__).with_name("viky.cti")
TLSIMU_VERSION = "1.5.0"
TLSIMU_FILES = ("TLSimu.cti", "libVirtualFG.so")


class ProducerUnavailable(RuntimeError):
    """The simulated producer could not be obtained; the message says why and what to do."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "defect-appliance" / f"genicam-{TLSIMU_VERSION}"


def tlsimu_cti() -> Path:
    """The path of TLSimu.cti, downloading the genicam 1.5.0 wheel the first time."""
    if override := os.environ.get("GENICAM_TLSIMU_CTI"):
        return Path(override)
    target = cache_dir()
    if all((target / name).is_file() for name in TLSIMU_FILES):
        return target / "TLSimu.cti"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise ProducerUnavailable(f"TLSimu.cti exists only for Linux x86_64, not {sys.platform} "
                                  f"{platform.machine()}; set GENICAM_TLSIMU_CTI to a copy")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"genicam=={TLSIMU_VERSION}", "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ProducerUnavailable(f"`{' '.join(command)}` took over 120 s") from exc
        wheels = list(Path(tmp).glob(f"genicam-{TLSIMU_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ProducerUnavailable(
                f"could not download genicam=={TLSIMU_VERSION} from PyPI (needed for TLSimu.cti, the "
                f"software-trigger simulator); `{' '.join(command)}` said:\n{done.stderr[-2000:]}\n"
                f"Fix the network, or set GENICAM_TLSIMU_CTI to an existing TLSimu.cti")
        staging = Path(tmp) / "producer"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in TLSIMU_FILES:
                member = f"genicam-{TLSIMU_VERSION}.data/purelib/genicam/{name}"
                with wheel.open(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                (staging / name).chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another test run may have won the race; its copy is as good
            if not all((target / name).is_file() for name in TLSIMU_FILES):
                raise
    return target / "TLSimu.cti"
