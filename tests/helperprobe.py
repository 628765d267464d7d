"""A job for the disk helper that imports nothing itself: what the helper has loaded."""

import sys


def loaded_modules() -> list[str]:
    return sorted(sys.modules)
