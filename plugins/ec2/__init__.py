"""EC2 provider for governord: instances launched from an AMI, through boto3.

Needs the ``ec2`` extra (``pip install governord[ec2]``, which installs ``boto3``). boto3 is
imported only when the provider type is registered: importing this package never needs it, and
without it ``governord_register_providers`` raises ImportError naming boto3.

Configured as ``[providers.NAME]`` with ``type = "ec2"``::

    [providers.aws]
    type = "ec2"
    region = "eu-west-1"
    # endpoint_url = "https://ec2.eu-west-1.amazonaws.com"   # optional: a private or test endpoint
    access_key_id = "AKIA..."                                 # optional: both keys, or neither
    secret_access_key = { env = "GOVERNORD_EC2_SECRET" }      # or { file = "/etc/governord/ec2.key" }
    verify_tls = true                                         # ca_file = "/etc/governord/ec2-ca.pem"

Without ``access_key_id``/``secret_access_key`` boto3's standard credential chain is used
(``AWS_*`` environment variables, ``~/.aws`` of the daemon's user, the instance profile of the
management host), which is the better choice when governord itself runs on EC2.

A role's ``profile`` is ``{ image_id = "ami-...", instance_type = "m6i.large", subnet_id =
"subnet-...", security_group_ids = ["sg-..."], key_name = "ops", user_data = "...", tags = {
team = "paas" }, iam_instance_profile = "governord-node" }`` (``image_id`` and ``instance_type``
are required).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governord import hookimpl

if TYPE_CHECKING:
    from governord.providers import ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``ec2`` provider type known (boto3 is imported only here, on demand)."""
    from .provider import EC2Provider

    registry.add(EC2Provider)
