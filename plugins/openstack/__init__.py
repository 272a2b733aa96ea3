"""The openstack provider (being written)."""
