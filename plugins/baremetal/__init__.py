"""The baremetal provider (being written)."""
