"""Shared test set-up. Peer fixtures live in tests/fixtures/, one module per peer."""

pytest_plugins = [
    "tests.fixtures.vcsim",
    "tests.fixtures.openstack",
    "tests.fixtures.ovirt",
    "tests.fixtures.ec2",
    "tests.fixtures.baremetal",
    "tests.fixtures.foreman",
    "tests.fixtures.satellite",
    "tests.fixtures.puppet",
    "tests.fixtures.postgres",
    "tests.fixtures.dns",
    "tests.fixtures.prometheus",
]
