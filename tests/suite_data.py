"""Skip markers for tests that need an offline suite's data installed by `make` (its data step)."""

import pytest

from epmq.suites import mini_text4


def _spamassassin_present() -> bool:
    try:
        mini_text4.tarball_path(mini_text4.load_config())
    except FileNotFoundError:
        return False
    return True


requires_spamassassin = pytest.mark.skipif(
    not _spamassassin_present(), reason="SpamAssassin tarball not fetched (scripts/fetch_spamassassin.sh)"
)
