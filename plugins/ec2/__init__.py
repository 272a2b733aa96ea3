"""The ec2 provider (being written)."""
