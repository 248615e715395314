"""Run manifests: what produced an output (versions, config, seeds), written beside it."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

TRACKED_PACKAGES = ("r3v", "torch", "transformers", "peft", "datasets", "accelerate", "pillow", "vllm")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }
