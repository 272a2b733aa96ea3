"""The ovirt provider (being written)."""
