"""Skip markers for tests that need an offline suite's data installed by `make` (its data step)."""

import pytest

from epmq.suites.mini_text4.config import load_config
from epmq.suites.mini_text4.corpus import tarball_path


def _spamassassin_present() -> bool:
    try:
        tarball_path(load_config())
    except FileNotFoundError:
        return False
    return True


requires_spamassassin = pytest.mark.skipif(
    not _spamassassin_present(), reason="SpamAssassin tarball not fetched (scripts/fetch_spamassassin.sh)"
)
