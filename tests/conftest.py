"""Shared test set-up. Peer fixtures live in tests/fixtures/, one module per peer."""

pytest_plugins = [
    "tests.fixtures.vcsim",
    "tests.fixtures.foreman",
    "tests.fixtures.satellite",
]
