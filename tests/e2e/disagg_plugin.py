"""pytest plugin: one disaggregated tritonserver for the whole session (``disagg_served``).

Test modules list it in ``pytest_plugins`` (and do not import it, so pytest can rewrite its
asserts): a second server would cost its start-up. Modules sharing it see each other's cached
prefixes, so each sends prompts the others never send.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from disagg_server import DisaggServer, serve_disaggregated


@pytest.fixture(scope="session")
def disagg_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaggServer]:
    yield from serve_disaggregated(tmp_path_factory.mktemp("disagg"))
